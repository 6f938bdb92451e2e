"""Where configuration lives: one model per concern, each defined once with its defaults and
bounds, and strict (an unknown key or a value out of range is refused where it is given).

- limits.py: `SandboxLimits` (what every sandbox gets) and `CompletionLimits` (what one
  completion may use), with the bounded types the server's ceilings use too;
- backends.py: one config per sandbox backend (`type`: local, docker, modal, fleet,
  kubernetes) and their union `SandboxBackend`;
- sandbox.py: `SandboxConfig`, what `environment` + `environment_kwargs` say (RLM's
  arguments, run's settings and the server's all go through it);
- run.py: `rlm-orchestrator run`'s settings (flags, RLM_RUN_*, the [run] table of its file);
- journal.py: `JournalSettings`, where durable completions are journaled, and `open_store`;
- loading.py, errors.py: reading layers (file, environment, flags) and one-line refusals.

The server's settings (service/settings.py) use the same types and loader.
"""

from rlm_orchestrator.config.backends import (
    BACKENDS,
    DockerConfig,
    FleetConfig,
    KubernetesConfig,
    LocalConfig,
    ModalConfig,
    PodConfig,
    SandboxBackend,
)
from rlm_orchestrator.config.journal import JournalSettings, open_store
from rlm_orchestrator.config.limits import CompletionLimits, SandboxLimits
from rlm_orchestrator.config.run import RunSettings, load_run_settings
from rlm_orchestrator.config.sandbox import SandboxConfig

__all__ = [
    "BACKENDS",
    "CompletionLimits",
    "DockerConfig",
    "FleetConfig",
    "JournalSettings",
    "KubernetesConfig",
    "LocalConfig",
    "ModalConfig",
    "PodConfig",
    "RunSettings",
    "SandboxBackend",
    "SandboxConfig",
    "SandboxLimits",
    "load_run_settings",
    "open_store",
]
