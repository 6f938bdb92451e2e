"""OpenTelemetry metrics of completions, LM calls and sandboxes, beside the traces.

On when `OTEL_METRICS_EXPORTER` names exporters (`otlp`, `console`; protocol and endpoint from
the standard OTEL_EXPORTER_OTLP_* variables, the interval from OTEL_METRIC_EXPORT_INTERVAL) or
when `serve` has `metrics_listen` (a Prometheus scrape endpoint). Otherwise nothing is set up:
each recording function below is one global read and a return, and the SDK is never imported.

The modules where things happen call one function each (`completion`, `turn`, `code_block`,
`sub_call`, `lm_usage`, `sandbox_acquired` / `sandbox_released`, `warm_pool_take`); the
instruments and their names live here only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rlm_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

    from rlm_orchestrator.types import ModelUsageSummary

__all__ = [
    "METER_NAME",
    "code_block",
    "completion",
    "configure",
    "enabled",
    "flush",
    "lm_usage",
    "sandbox_acquired",
    "sandbox_released",
    "shutdown",
    "sub_call",
    "turn",
    "warm_pool_take",
    "watch_warm_pool",
]

log = logging.getLogger(__name__)

METER_NAME = "rlm_orchestrator"
# Seconds: sub-calls and sandbox starts take from milliseconds to minutes (the SDK's default
# buckets are for milliseconds).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

_lock = threading.Lock()
_state: dict[str, Any] = {"configured": False, "provider": None, "prometheus": None}
# The instruments, or None while metrics are off (read by every recording function).
_on: _Instruments | None = None
# Warm pools: owner -> (backend, how to count its idle sandboxes), read when the pool-size
# gauge is collected. Registered whether metrics are on or not (a weak dict add), so a pool
# made before `configure` counts; an owner that is gone drops out.
_pools: weakref.WeakKeyDictionary[Any, tuple[str, Callable[[Any], int]]] = (
    weakref.WeakKeyDictionary()
)
# Sandboxes acquired and not yet released (id -> backend): a release seen twice counts once.
_alive: dict[str, str] = {}
_backends: set[str] = set()


class _Instruments:
    def __init__(self, meter: Meter) -> None:
        counter, seconds = meter.create_counter, SECONDS_BUCKETS
        self.started = counter("rlm.completions.started", "{completion}", "Completions started")
        self.finished = counter(
            "rlm.completions.finished", "{completion}", "Completions ended, by outcome"
        )
        self.turns = counter("rlm.turns", "{turn}", "Root-model turns")
        self.blocks = counter("rlm.code_blocks", "{block}", "Code blocks run, by status")
        self.sub_calls = counter("rlm.sub_calls", "{call}", "llm_query / rlm_query calls")
        self.sub_call_duration = meter.create_histogram(
            "rlm.sub_call.duration", "s", "Sub-call latency",
            explicit_bucket_boundaries_advisory=seconds,
        )  # fmt: skip
        self.lm_calls = counter("rlm.lm.calls", "{call}", "LM calls answered")
        self.tokens = counter("rlm.lm.tokens", "{token}", "LM tokens, by type (input/output)")
        self.cost = counter("rlm.lm.cost_usd", "{USD}", "LM cost in US dollars")
        self.acquire_duration = meter.create_histogram(
            "rlm.sandbox.acquire.duration", "s", "Time to get a sandbox",
            explicit_bucket_boundaries_advisory=seconds,
        )  # fmt: skip
        self.pool_requests = counter(
            "rlm.sandbox.warm_pool.requests", "{request}", "Warm-pool takes, by result (hit/miss)"
        )
        meter.create_observable_gauge(
            "rlm.sandbox.warm_pool.size", [_pool_sizes], "{sandbox}", "Idle sandboxes in warm pools"
        )
        meter.create_observable_up_down_counter(
            "rlm.sandboxes.alive", [_alive_counts], "{sandbox}", "Sandboxes acquired, not released"
        )


def _pool_sizes(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    sizes: dict[str, int] = {}
    for owner, (backend, size) in list(_pools.items()):
        sizes[backend] = sizes.get(backend, 0) + size(owner)
    return [Observation(n, {"rlm.sandbox.backend": b}) for b, n in sizes.items()]


def _alive_counts(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    counts = dict.fromkeys(_backends, 0)  # a backend whose sandboxes are all gone reads 0
    for backend in list(_alive.values()):
        counts[backend] = counts.get(backend, 0) + 1
    return [Observation(n, {"rlm.sandbox.backend": b}) for b, n in counts.items()]


def configure(prometheus_listen: str | None = None) -> bool:
    """Set up the meter provider once, from the environment (and `serve`'s metrics_listen).
    True when metrics are on."""
    global _on
    with _lock:
        if _state["configured"]:
            return _on is not None
        _state["configured"] = True
        names = [n.strip() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",")]
        names = [n for n in names if n and n != "none"]
        if not names and not prometheus_listen:
            return False
        from opentelemetry import metrics as metrics_api
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        readers: list[MetricReader] = [PeriodicExportingMetricReader(_exporter(n)) for n in names]
        if prometheus_listen:
            readers.append(_prometheus(prometheus_listen))
        service = os.environ.get("OTEL_SERVICE_NAME", "rlm-orchestrator")
        resource = Resource.create({"service.name": service, "process.pid": os.getpid()})
        provider = MeterProvider(metric_readers=readers, resource=resource)
        metrics_api.set_meter_provider(provider)
        _state["provider"] = provider
        _on = _Instruments(provider.get_meter(METER_NAME))
        return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ConfigurationError(
            f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r} (otlp, console)"
        )
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return OTLPMetricExporter()


def _prometheus(listen: str) -> Any:
    """The Prometheus reader, and its scrape endpoint (text format at /metrics) started."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise ConfigurationError(
            "metrics_listen needs the Prometheus exporter: "
            "pip install 'rlm-orchestrator[prometheus]'"
        ) from exc
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"metrics_listen {listen!r}: {exc}") from exc
    _state["prometheus"] = (server, thread)
    return PrometheusMetricReader()


def prometheus_port() -> int | None:
    """The scrape endpoint's port (useful with metrics_listen port 0); None without one."""
    served = _state["prometheus"]
    return int(served[0].server_address[1]) if served else None


def enabled() -> bool:
    return _on is not None


def flush(timeout_millis: int = 5000) -> None:
    provider = _state["provider"]
    if provider is not None:
        provider.force_flush(timeout_millis)


def shutdown() -> None:
    """Export what is left and stop (what the SDK would otherwise do at interpreter exit)."""
    global _on
    provider, served = _state["provider"], _state["prometheus"]
    _on, _state["provider"], _state["prometheus"] = None, None, None
    if provider is not None:
        provider.shutdown()
    if served is not None:
        served[0].shutdown()
        served[0].server_close()


# -- recording: called where things happen; a return when metrics are off ------------------


@contextlib.contextmanager
def completion(counted: bool = True) -> Iterator[None]:
    """Around one completion (`counted`: a top-level one; a child RLM is a sub-call): started,
    then finished by outcome ("finished", the failure kind of the exception that ended it, or
    "cancelled")."""
    on = _on
    if on is None or not counted:
        yield
        return
    on.started.add(1)
    outcome = "finished"
    try:
        yield
    except BaseException as exc:
        from rlm_orchestrator.failures import failure_kind

        outcome = "cancelled" if not isinstance(exc, Exception) else failure_kind(exc)
        raise
    finally:
        on.finished.add(1, {"rlm.outcome": outcome})


def turn(depth: int) -> None:
    if _on is not None:
        _on.turns.add(1, {"rlm.depth": depth})


def code_block(status: str, depth: int) -> None:
    if _on is not None:
        _on.blocks.add(1, {"rlm.exec.status": status, "rlm.depth": depth})


def sub_call(kind: str, model: str, ok: bool, seconds: float) -> None:
    """One llm_query / rlm_query answered (ok) or failed; `model` is the one that served it."""
    if _on is not None:
        attributes = {"rlm.sub_call.kind": kind, "gen_ai.request.model": model}
        _on.sub_calls.add(1, {**attributes, "rlm.sub_call.ok": ok})
        _on.sub_call_duration.record(seconds, attributes)


def lm_usage(model: str, usage: ModelUsageSummary) -> None:
    """One LM call's tokens and cost (what the usage summary adds up)."""
    if _on is not None:
        model_attribute = {"gen_ai.request.model": model}
        _on.lm_calls.add(1, model_attribute)
        _on.tokens.add(usage.total_input_tokens, {**model_attribute, "gen_ai.token.type": "input"})
        _on.tokens.add(
            usage.total_output_tokens, {**model_attribute, "gen_ai.token.type": "output"}
        )
        _on.cost.add(usage.total_cost, model_attribute)


def sandbox_acquired(backend: str, sandbox_id: str, seconds: float) -> None:
    if _on is not None:
        _on.acquire_duration.record(seconds, {"rlm.sandbox.backend": backend})
        _alive[sandbox_id] = backend
        _backends.add(backend)


def sandbox_released(sandbox_id: str) -> None:
    if _on is not None:
        _alive.pop(sandbox_id, None)


def watch_warm_pool(owner: Any, backend: str, size: Callable[[Any], int] = len) -> None:
    """Count `size(owner)` idle sandboxes in the pool-size gauge while `owner` exists
    (`size` must not hold `owner` itself, or it never goes)."""
    _pools[owner] = (backend, size)


def warm_pool_take(backend: str, hit: bool) -> None:
    if _on is not None:
        _on.pool_requests.add(
            1, {"rlm.sandbox.backend": backend, "result": "hit" if hit else "miss"}
        )
