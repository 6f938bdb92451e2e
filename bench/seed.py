"""The seed (groknroll==2.0.0), loaded from its wheel for comparison, never installed.

The wheel is fetched once with `pip download --no-deps` into bench/.seed/ (or taken from
RLM_BENCH_SEED_WHEEL). Only the stdlib-only modules we compare against are imported
(comms_utils, lm_handler, local_repl, docker_repl and what they import; its LiteLLM client,
whose only other import is litellm, which is ours too): the package's
`__init__` files, which pull in the seed's whole dependency tree, are bypassed with namespace
stubs, so the code that runs is the seed's own.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

SEED = "groknroll==2.0.0"
CACHE = Path(__file__).resolve().parent / ".seed"
_PACKAGES = ("groknroll", "groknroll.core", "groknroll.clients", "groknroll.environments")


class SeedUnavailable(RuntimeError):
    pass


def _wheel() -> Path:
    if explicit := os.environ.get("RLM_BENCH_SEED_WHEEL"):
        return Path(explicit)
    found = sorted(CACHE.glob("groknroll-2.0.0-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(exist_ok=True)
    # The project venv has no pip (uv-managed); any pip can download a wheel.
    candidates = [[sys.executable, "-m", "pip"], ["python3", "-m", "pip"]]
    if shutil.which("pip"):
        candidates.append(["pip"])
    errors = []
    for pip in candidates:
        try:
            done = subprocess.run(
                [*pip, "download", "--quiet", "--no-deps", SEED, "-d", str(CACHE)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        if done.returncode == 0:
            found = sorted(CACHE.glob("groknroll-2.0.0-*.whl"))
            if found:
                return found[0]
        errors.append(done.stderr.strip()[-300:])
    raise SeedUnavailable(f"could not download {SEED}: {' | '.join(errors)}")


_loaded: dict[str, Any] | None = None


def load() -> dict[str, Any]:
    """The seed's modules by short name: comms_utils, lm_handler, types, base_lm,
    litellm_client, local_repl, docker_repl."""
    global _loaded
    if _loaded is not None:
        return _loaded
    wheel = _wheel()
    root = CACHE / "src"
    if not (root / "groknroll").is_dir():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root)
    for name in _PACKAGES:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = stub
    _loaded = {
        "comms_utils": importlib.import_module("groknroll.core.comms_utils"),
        "types": importlib.import_module("groknroll.core.types"),
        "lm_handler": importlib.import_module("groknroll.core.lm_handler"),
        "base_lm": importlib.import_module("groknroll.clients.base_lm"),
        "litellm_client": importlib.import_module("groknroll.clients.litellm"),
        "local_repl": importlib.import_module("groknroll.environments.local_repl"),
        "docker_repl": importlib.import_module("groknroll.environments.docker_repl"),
    }
    return _loaded


def absent() -> str | None:
    """Why the seed cannot be had here (its wheel could not be fetched), else None. Any other
    failure to load it is the measurement's: that row is then not measured (a failed run)."""
    try:
        load()
    except SeedUnavailable as exc:
        return str(exc)[:300]
    except Exception:
        return None
    return None
