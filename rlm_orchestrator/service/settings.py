"""Server configuration: flags > RLM_SERVER_* variables > a TOML file (`--config`, or
RLM_SERVER_CONFIG).

The server's file is its own: a `[run]` table (`rlm-orchestrator run`'s settings) is refused,
as is any unknown key or RLM_SERVER_* variable. `environment` + `environment_kwargs` validate
into the same SandboxConfig as RLM's, with one exception: `exec_timeout_seconds` is set at the
top level (the ceiling of what a request may ask for), never in environment_kwargs.

Secrets: a model's key is read from the environment variable it names (`api_key_env`), so
config files can be committed. The bearer token may come from the environment
(RLM_SERVER_AUTH_TOKEN) or the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from rlm_orchestrator.config.fences import DEFAULT_CODE_FENCES, CodeFences
from rlm_orchestrator.config.journal import JournalSettings
from rlm_orchestrator.config.limits import (
    DEFAULT_EXEC_TIMEOUT_SECONDS,
    DEFAULT_MAX_ANSWER_CHARS,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ITERATIONS,
    MaxDepth,
    MaxIterations,
    Seconds,
    Usd,
)
from rlm_orchestrator.config.lm import DEFAULT_MAX_TOKENS, LMClientConfig, TokenPrice, Transport
from rlm_orchestrator.config.loading import (
    env_layer,
    file_layer,
    flag_layer,
    load,
    read_toml,
)
from rlm_orchestrator.config.sandbox import SandboxSettings
from rlm_orchestrator.exceptions import ConfigurationError

CONFIG_ENV = "RLM_SERVER_CONFIG"
# RLM_SERVER_* variables that are no setting: the file's name, and the token `run --server`
# sends (a client's, which may well be set where a server runs).
OTHER_VARIABLES = {CONFIG_ENV, "RLM_SERVER_TOKEN"}
# environment_kwargs the server does not take, and where they go instead.
REFUSED_SANDBOX_KEYS = {
    "exec_timeout_seconds": (
        "set it at the top level: exec_timeout_seconds is the ceiling a request may ask for, "
        "default_exec_timeout_seconds what a request that sets none gets"
    )
}
# The CompletionOptions that are limits: each has a ceiling and a default_ setting.
LIMIT_OPTIONS = (
    "max_iterations",
    "max_depth",
    "exec_timeout_seconds",
    "timeout_seconds",
    "iteration_timeout_seconds",
    "max_cost",
)


class ModelSettings(BaseModel):
    """One model the server offers, under `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    backend: str = "openai"
    # The provider's model id; defaults to `name`.
    model_name: str | None = None
    api_base: str | None = None
    # Name of the environment variable holding the key (preferred over `api_key`).
    api_key_env: str | None = None
    api_key: SecretStr | None = None
    max_concurrency: int = Field(LMClientConfig.max_concurrency, ge=1)
    max_retries: int = Field(LMClientConfig.max_retries, ge=0)
    retry_initial_delay: float = Field(LMClientConfig.retry_initial_delay, ge=0)
    # USD per token, for a model litellm's price table does not know (a local one): what
    # max_cost counts. Set, they replace litellm's price.
    input_cost_per_token: TokenPrice | None = None
    output_cost_per_token: TokenPrice | None = None
    # The limits of one call: output tokens (0: none sent), the window in tokens (for local or
    # unknown models; else litellm's table, else learned), and the seconds one call may take.
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=0)
    context_window: int | None = Field(None, gt=0)
    request_timeout_seconds: float | None = Field(None, gt=0)
    # Anything else litellm takes (temperature, api_version, ...).
    extra: dict[str, Any] = Field(default_factory=dict)
    # "auto": OpenAI-compatible models without litellm-only settings skip litellm (a direct
    # HTTP client); "litellm" forces litellm; "http" forces the direct client.
    transport: Transport = "auto"

    def client_config(self) -> LMClientConfig:
        key = self.api_key.get_secret_value() if self.api_key else None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key is None:
                raise ConfigurationError(
                    f"model {self.name!r}: environment variable {self.api_key_env} is not set"
                )
        kwargs: dict[str, Any] = {
            "model_name": self.model_name or self.name,
            "max_concurrency": self.max_concurrency,
            "max_retries": self.max_retries,
            "retry_initial_delay": self.retry_initial_delay,
            "transport": self.transport,
            "max_tokens": self.max_tokens,
            **self.extra,
        }
        if self.context_window is not None:
            kwargs["context_window"] = self.context_window
        if self.request_timeout_seconds is not None:
            kwargs["timeout"] = self.request_timeout_seconds
        for field in ("api_base", "input_cost_per_token", "output_cost_per_token"):
            if getattr(self, field) is not None:
                kwargs[field] = getattr(self, field)
        if key is not None:
            kwargs["api_key"] = key
        config = LMClientConfig.from_backend(self.backend, kwargs)
        # Registered under the server's name for it, whatever the provider calls it.
        return LMClientConfig(**{**config.__dict__, "model_name": self.name})


class TenantSettings(BaseModel):
    """A client of the server with a token of its own: it sees and controls only its own
    completions and sessions, within its share of the server's capacity."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # Name of the environment variable holding its token (preferred over `token`).
    token_env: str | None = None
    token: SecretStr | None = None
    # Its share of the server's capacity (None: up to the server's own limit).
    max_concurrent_completions: int | None = Field(None, ge=1)
    max_sessions: int | None = Field(None, ge=0)

    def token_value(self) -> str:
        value = os.environ.get(self.token_env) if self.token_env else None
        if value is None and self.token is not None:
            value = self.token.get_secret_value()
        if not value:
            where = f"environment variable {self.token_env}" if self.token_env else "token"
            raise ConfigurationError(f"tenant {self.name!r}: {where} is not set")
        return value


class TLSSettings(BaseModel):
    """Server certificate; with `client_ca_file`, clients must present a certificate (mTLS)."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class ServerSettings(SandboxSettings):
    """The server's settings. `environment_kwargs` as RLM's (the backend's keys and the limits
    of its sandboxes: startup_timeout_seconds, max_output_chars, memory_limit_mb), but for
    exec_timeout_seconds (top level: the ceiling of the requests') and setup_code."""

    model_config = SettingsConfigDict(
        env_prefix="RLM_SERVER_", env_nested_delimiter="__", extra="forbid"
    )

    listen: str = "127.0.0.1:50051"
    # Required in call metadata as `authorization: Bearer <token>` when set.
    auth_token: SecretStr | None = None
    tls: TLSSettings | None = None
    # Clients with tokens of their own (`auth_token`, when set, is one more: "default").
    tenants: list[TenantSettings] = Field(default_factory=list)
    # Durable completions (`[journal]`: store, lease_seconds, retention): none unless set.
    journal: JournalSettings | None = None
    models: list[ModelSettings] = Field(default_factory=list)
    # Which models serve depth 0 and depth >= 1 when a request names none (default: first).
    root_model: str | None = None
    sub_model: str | None = None
    # Sandboxed code is a tenant's, written by a model: by default the server refuses to start
    # sandboxes that would run it with the server's privileges (`local` where the kernel has
    # no user namespaces, or with isolation = "off"). True accepts that risk.
    allow_unisolated_sandboxes: bool = False
    # Anyone who can reach the server can run code and spend its model keys: by default it
    # refuses to listen beyond loopback with no authentication (no auth_token, no client
    # certificates). True accepts that (e.g. behind a proxy that authenticates).
    allow_unauthenticated: bool = False
    # Ceilings of the limits a request may set (CompletionOptions of the same names): a request
    # may ask for less, never more (INVALID_ARGUMENT names the ceiling). None: no ceiling.
    max_iterations: MaxIterations = DEFAULT_MAX_ITERATIONS
    max_depth: MaxDepth = DEFAULT_MAX_DEPTH
    exec_timeout_seconds: Seconds = DEFAULT_EXEC_TIMEOUT_SECONDS
    timeout_seconds: Seconds = 3600.0
    iteration_timeout_seconds: Seconds | None = None
    max_cost: Usd | None = None
    # What a request that sets none of these gets (None: the ceiling).
    default_max_iterations: MaxIterations | None = None
    default_max_depth: MaxDepth | None = None
    default_exec_timeout_seconds: Seconds | None = None
    default_timeout_seconds: Seconds | None = None
    default_iteration_timeout_seconds: Seconds | None = None
    default_max_cost: Usd | None = None
    # Admission, counted when a call is accepted (RESOURCE_EXHAUSTED names the limit): running
    # (or uploading) completions; open sessions; live sandboxes (sessions', completions' and
    # rlm_query children's: a child refused one fails as a sub-call error).
    max_concurrent_completions: int = Field(64, ge=1)
    max_sessions: int = Field(64, ge=0)
    max_sandboxes: int = Field(128, ge=1)
    # Largest context accepted, in bytes (RESOURCE_EXHAUSTED above it).
    max_context_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # Longest final answer: read from the sandbox (a longer FINAL_VAR is refused and the model
    # told) and sent in 1 Mi-character parts (a longer FINAL fails with ANSWER_TOO_LARGE).
    max_answer_chars: int = Field(DEFAULT_MAX_ANSWER_CHARS, ge=1)
    # Text fields of progress events keep their head and tail up to this many characters.
    event_excerpt_chars: int = Field(65_536, ge=256)
    # Events waiting for a slow client, per completion; beyond it output and sub-call events
    # are dropped (with a marker), never the answer, `finished`/`failed` or usage.
    max_buffered_event_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    session_ttl_seconds: float = Field(1800.0, gt=0)
    # HTTP/2 bandwidth-delay probing grows every stream's receive window, read or not: with it,
    # a stream the server has not read yet (an anonymous one about to be refused, when the
    # server is busy) can make it buffer megabytes (measured: 170-650 MB for 40 anonymous 16 MiB
    # messages refused after 1 s; 4 MB without). Off, a stream receives 64 KiB ahead of what the
    # server reads: fast on a LAN (a 50 MiB upload took the same time here), slower uploads on
    # long-latency links. Turn it on for those when every client is trusted.
    http2_bdp_probe: bool = False
    # On SIGTERM: how long running completions may go on before they are cancelled.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    log_dir: Path | None = None
    # The completion viewer (`rlm-orchestrator ui`'s page) on this HOST:PORT, over the trace
    # store (RLM_TRACE_STORE), behind auth_token: service/viewer.py. None: not served.
    ui_listen: str | None = None
    # A Prometheus scrape endpoint (text format at http://HOST:PORT/metrics), e.g.
    # "127.0.0.1:9464": the metrics of telemetry/metrics.py. None: no endpoint (OTLP export
    # still follows OTEL_METRICS_EXPORTER). It has no authentication: keep it on loopback or a
    # network only the scraper reaches.
    metrics_listen: str | None = Field(None, pattern=r"^\S*:\d+$")
    # The fenced blocks that run for a request that sets no code_fences: ```repl (the contract);
    # ["repl", "python"] also runs ```python blocks. Not a limit: a request may set its own.
    code_fences: CodeFences = DEFAULT_CODE_FENCES

    takes_setup_code = False
    refused_sandbox_keys = REFUSED_SANDBOX_KEYS

    @model_validator(mode="after")
    def _check_tenants(self) -> ServerSettings:
        names = [t.name for t in self.tenants] + (["default"] if self.auth_token else [])
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique (auth_token is 'default'): {names}")
        return self

    @model_validator(mode="after")
    def _check_models(self) -> ServerSettings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        for role in (self.root_model, self.sub_model):
            if role is not None and role not in names:
                raise ValueError(f"{role!r} is not one of the models {names}")
        return self

    @model_validator(mode="after")
    def _check_defaults(self) -> ServerSettings:
        for name in LIMIT_OPTIONS:
            ceiling, default = getattr(self, name), getattr(self, f"default_{name}")
            if ceiling is not None and default is not None and default > ceiling:
                raise ValueError(f"default_{name}={default} is above its ceiling {name}={ceiling}")
        return self

    def limit_default(self, name: str) -> Any:
        """What a request that does not set the limit `name` gets."""
        default = getattr(self, f"default_{name}")
        return getattr(self, name) if default is None else default


def load_server_settings(config_file: Path | None = None, **flags: Any) -> ServerSettings:
    """Settings from the flags given (None: not given), RLM_SERVER_* variables, and the file
    (`config_file`, else RLM_SERVER_CONFIG); a one-line ConfigurationError naming the key and
    where it came from when one is wrong."""
    layers = [
        flag_layer(flags, {name: f"--{name.replace('_', '-')}" for name in flags}),
        env_layer(ServerSettings, allowed=OTHER_VARIABLES),
    ]
    named = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if named is not None:
        values = read_toml(named)
        if "run" in values:
            raise ConfigurationError(
                f"{named}: run: a [run] table holds `rlm-orchestrator run`'s settings; the "
                "server's file is its own (top-level keys)"
            )
        layers.append(file_layer(named, values))
    return load(ServerSettings, layers)
