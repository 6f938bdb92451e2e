"""`rlm-orchestrator run`'s work once its flags are read: here, or on a server (cli.py declares
the command and its flags). Slow imports stay inside the functions: a refused flag comes first.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from rlm_orchestrator.cli_support import (
    StartupStatus,
    configuration_error,
    fail,
    print_result,
    stderr,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from rlm_orchestrator import RLM
    from rlm_orchestrator.config.run import RunSettings
    from rlm_orchestrator.events import Event

# Flags that only `run` on this machine uses: the server's own config decides them.
LOCAL_ONLY = {
    "backend": "--backend",
    "api_base": "--api-base",
    "api_key": "--api-key",
    "environment": "--environment",
    "log_dir": "--log-dir",
    "config": "--config",
    "input_cost_per_token": "--input-cost-per-token",
    "output_cost_per_token": "--output-cost-per-token",
    "max_tokens": "--max-tokens",
    "context_window": "--context-window",
    "request_timeout_seconds": "--request-timeout",
}


def check_flags(
    flags: dict[str, Any], server: str | None, tls_ca: Path | None, token_flag: bool
) -> None:
    """A flag that means nothing in this mode is refused, not ignored."""
    from rlm_orchestrator.exceptions import ConfigurationError

    if server is not None:
        for name, flag in LOCAL_ONLY.items():
            if flags[name] is not None:
                raise ConfigurationError(
                    f"{flag} means nothing with --server: the server's own config decides it"
                )
        return
    for flag, given in (("--tls-ca", tls_ca is not None), ("--token", token_flag)):
        if given:
            raise ConfigurationError(f"{flag} means nothing without --server")


def run_local(settings: RunSettings, context: Any, query: str, quiet: bool, as_json: bool) -> None:
    status = StartupStatus(quiet)
    try:
        _run_local_rlm(settings, context, query, quiet, as_json, status)
    finally:
        status.done()


def _run_local_rlm(
    settings: RunSettings,
    context: Any,
    query: str,
    quiet: bool,
    as_json: bool,
    status: StartupStatus,
) -> None:
    from rlm_orchestrator import ConfigurationError, RLMError, UnpricedModelWarning, budget
    from rlm_orchestrator.console import EventPrinter

    printer = None if quiet else EventPrinter(stderr)

    def on_event(event: Event) -> None:
        status.done()
        if printer is not None:
            printer(event)

    lm_kwargs: dict[str, Any] = {"model_name": settings.model}
    if settings.api_base:
        lm_kwargs["api_base"] = settings.api_base
    if settings.api_key:
        lm_kwargs["api_key"] = settings.api_key
    if settings.transport != "auto":
        lm_kwargs["transport"] = settings.transport
    for price in ("input_cost_per_token", "output_cost_per_token"):
        if getattr(settings, price) is not None:
            lm_kwargs[price] = getattr(settings, price)
    lm_kwargs.update(settings.model_limits())
    sub_kwargs = {**lm_kwargs, "model_name": settings.sub_model} if settings.sub_model else None
    try:
        with warnings.catch_warnings():
            # Said as a console line instead, even with --quiet: the budget is not what it says.
            warnings.simplefilter("ignore", UnpricedModelWarning)
            rlm = _make_rlm(settings, lm_kwargs, sub_kwargs, on_event)
        reason = budget.unenforceable(rlm.max_cost, [rlm.root_config, *rlm.other_configs])
        if reason is not None:
            stderr.print("[bold yellow]warning:[/]", escape(reason), soft_wrap=True)
        result = rlm.completion(context, root_prompt=query)
    except ConfigurationError as exc:  # a setting (no key, a bad option): exit code 2
        configuration_error(exc)
    except RLMError as exc:
        raise fail(exc, as_json) from exc
    print_result(result, quiet, as_json)


def _make_rlm(
    settings: RunSettings,
    lm_kwargs: dict[str, Any],
    sub_kwargs: dict[str, Any] | None,
    on_event: Callable[[Event], None],
) -> RLM:
    from rlm_orchestrator import RLM, RLMLogger

    return RLM(
        backend=settings.backend,
        backend_kwargs=lm_kwargs,
        environment=settings.environment,
        environment_kwargs=settings.environment_kwargs,
        max_depth=settings.max_depth,
        max_iterations=settings.max_iterations,
        other_backends=[settings.backend] if sub_kwargs else None,
        other_backend_kwargs=[sub_kwargs] if sub_kwargs else None,
        logger=RLMLogger(settings.log_dir) if settings.log_dir else None,
        max_cost=settings.max_cost,
        timeout_seconds=settings.timeout_seconds,
        answer_convention=settings.answer_convention,
        code_fences=settings.code_fences,
        on_event=on_event,
    )


def run_remote(
    server: str,
    token: str | None,
    tls_ca: Path | None,
    context: Any,
    query: str,
    options: dict[str, Any],
    quiet: bool,
    as_json: bool,
) -> None:
    from rlm_orchestrator import RLMError
    from rlm_orchestrator.client import Client
    from rlm_orchestrator.console import EventPrinter

    chosen = {k: v for k, v in options.items() if v is not None}
    with Client(server, token=token, ca_file=tls_ca) as client:
        try:
            result = client.completion(
                context, query, on_event=None if quiet else EventPrinter(stderr), **chosen
            )
        except RLMError as exc:
            raise fail(exc, as_json) from exc
    print_result(result, quiet, as_json)
