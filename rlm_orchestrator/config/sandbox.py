"""`environment` + `environment_kwargs` -> a `SandboxConfig`: a backend's config and limits.

environment_kwargs is flat, as in the original library: the keys every sandbox shares
(`SandboxLimits`) beside the backend's own (backends.py). Both parts are validated here, and
their errors keep the key the user wrote: ("environment_kwargs", "image"), never the model's
own path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from rlm_orchestrator.config.backends import BACKENDS, BackendName, LocalConfig, SandboxBackend
from rlm_orchestrator.config.limits import SandboxLimits
from rlm_orchestrator.config.loading import LayeredSettings

LIMIT_KEYS = tuple(SandboxLimits.model_fields)
_BACKEND: TypeAdapter[SandboxBackend] = TypeAdapter(SandboxBackend)


class SandboxConfig(BaseModel):
    """What `environment` and `environment_kwargs` say: a sandbox backend, and the limits of
    the sandboxes it starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: SandboxBackend = Field(default_factory=LocalConfig)
    limits: SandboxLimits = Field(default_factory=SandboxLimits)

    @classmethod
    def from_kwargs(
        cls,
        environment: str,
        kwargs: Mapping[str, Any],
        *,
        refused: Mapping[str, str] | None = None,
    ) -> SandboxConfig:
        """Validated; a ValidationError's locations are ("environment",) or
        ("environment_kwargs", key, ...). `refused`: keys this surface does not take, and why."""
        if environment not in BACKENDS:
            raise _invalid(
                ("environment",),
                environment,
                f"{environment!r} is not a sandbox backend (one of: {', '.join(BACKENDS)})",
            )
        if not isinstance(kwargs, Mapping):
            raise _invalid(("environment_kwargs",), kwargs, "must be a table (a dict) of keys")
        errors: list[InitErrorDetails] = []
        for key, why in (refused or {}).items():
            if key in kwargs:
                errors.append(_error(("environment_kwargs", key), kwargs[key], why))
        own = {k: v for k, v in kwargs.items() if k not in LIMIT_KEYS}
        if "type" in own:
            errors.append(
                _error(
                    ("environment_kwargs", "type"),
                    own.pop("type"),
                    f"unknown key (the backend is `environment`, here {environment!r})",
                )
            )
        backend: Any = None
        try:
            backend = _BACKEND.validate_python({**own, "type": environment})
        except ValidationError as exc:
            errors += [_rebased(e, environment) for e in exc.errors()]
        limits: Any = None
        try:
            limits = SandboxLimits.model_validate(
                {k: v for k, v in kwargs.items() if k in LIMIT_KEYS and k not in (refused or {})}
            )
        except ValidationError as exc:
            errors += [_rebased(e, None) for e in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return cls(backend=backend, limits=limits)


def rlm_environment(
    environment: str, kwargs: Mapping[str, Any]
) -> tuple[SandboxConfig, str | None]:
    """RLM's environment_kwargs (and `run`'s): a SandboxConfig, and the original library's
    `setup_code` (code run in every new sandbox), which is no backend's key."""
    rest = dict(kwargs) if isinstance(kwargs, Mapping) else kwargs
    setup_code = rest.pop("setup_code", None) if isinstance(rest, dict) else None
    if setup_code is not None and not isinstance(setup_code, str):
        raise _invalid(("environment_kwargs", "setup_code"), setup_code, "must be a str of code")
    return SandboxConfig.from_kwargs(environment, rest), setup_code


class SandboxSettings(LayeredSettings):
    """Settings that choose a sandbox backend as RLM's arguments do: `environment` and a flat
    `environment_kwargs`, validated into `sandbox` (a SandboxConfig)."""

    environment: BackendName = "local"
    environment_kwargs: dict[str, Any] = Field(default_factory=dict)

    # Whether environment_kwargs may carry RLM's `setup_code`; keys refused here, and why.
    takes_setup_code: ClassVar[bool] = True
    refused_sandbox_keys: ClassVar[Mapping[str, str]] = {}
    _sandbox: SandboxConfig = PrivateAttr(default_factory=SandboxConfig)

    @model_validator(mode="after")
    def _check_sandbox(self) -> SandboxSettings:
        if self.takes_setup_code:
            self._sandbox, _ = rlm_environment(self.environment, self.environment_kwargs)
        else:
            self._sandbox = SandboxConfig.from_kwargs(
                self.environment, self.environment_kwargs, refused=self.refused_sandbox_keys
            )
        return self

    @property
    def sandbox(self) -> SandboxConfig:
        return self._sandbox


def _known_keys(environment: str) -> str:
    own = [k for k in BACKENDS[environment].model_fields if k != "type"]
    return f"{environment} sandboxes take {', '.join(own)}; every sandbox {', '.join(LIMIT_KEYS)}"


def _error(loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    # "config_" types are ours: errors.problem() shows their message as it is.
    return {
        "type": PydanticCustomError("config_refused", "{why}", {"why": message}),
        "loc": loc,
        "input": value,
    }


def _invalid(loc: tuple[str | int, ...], value: Any, message: str) -> ValidationError:
    return ValidationError.from_exception_data(
        SandboxConfig.__name__, [_error(loc, value, message)]
    )


def _rebased(error: Any, environment: str | None) -> InitErrorDetails:
    """An error of the backend's model (its loc starts with the `type` tag) or of the limits,
    at the key the user wrote."""
    loc = tuple(error["loc"][1:] if environment is not None else error["loc"])
    if environment is not None and error["type"] == "extra_forbidden":
        return _error(
            ("environment_kwargs", *loc),
            error["input"],
            f"unknown key ({_known_keys(environment)})",
        )
    details: InitErrorDetails = {
        "type": error["type"],
        "loc": ("environment_kwargs", *loc),
        "input": error["input"],
    }
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details
