"""The seed (groknroll==2.0.0), loaded from its wheel for comparison, never installed.

The wheel is fetched once with `pip download --no-deps` into bench/.seed/ (or taken from
RLM_BENCH_SEED_WHEEL). Only the stdlib-only modules we compare against are imported
(comms_utils, lm_handler, local_repl, docker_repl and what they import; its LiteLLM client,
whose only other import is litellm, which is ours too; its OpenAI client, which imports
`openai` and `dotenv`, ours too): the package's
`__init__` files, which pull in the seed's whole dependency tree, are bypassed with namespace
stubs, so the code that runs is the seed's own.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import zipfile
from collections.abc import Iterator
from http.server import HTTPServer
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


# The seed's modules by short name. "openai_client" (its OpenAIClient: needs the `openai`
# and `python-dotenv` packages, both ours too) is imported only when asked for.
MODULES = {
    "comms_utils": "groknroll.core.comms_utils",
    "types": "groknroll.core.types",
    "lm_handler": "groknroll.core.lm_handler",
    "base_lm": "groknroll.clients.base_lm",
    "litellm_client": "groknroll.clients.litellm",
    "local_repl": "groknroll.environments.local_repl",
    "docker_repl": "groknroll.environments.docker_repl",
    "openai_client": "groknroll.clients.openai",
}
DEFAULT_MODULES = tuple(name for name in MODULES if name != "openai_client")
_loaded: dict[str, Any] = {}


def _root() -> Path:
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
    return root


def load(*names: str) -> dict[str, Any]:
    """The seed's modules by short name (default: all but openai_client, so that no
    measurement imports what it does not use: "litellm_client" imports litellm)."""
    wanted = names or DEFAULT_MODULES
    missing = [name for name in wanted if name not in _loaded]
    if missing:
        _root()
        for name in missing:
            _loaded[name] = importlib.import_module(MODULES[name])
    return {name: _loaded[name] for name in wanted}


def absent() -> str | None:
    """Why the seed cannot be had here (its wheel could not be fetched), else None. Any other
    failure to load it is the measurement's: that row is then not measured (a failed run)."""
    try:
        _root()
    except SeedUnavailable as exc:
        return str(exc)[:300]
    except Exception:
        return None
    return None


# The seed's DockerREPL needs an image with python3: the sandbox image's base (self-built
# without a registry, else python:3.11-slim), whichever is here.
DOCKER_IMAGES = ("rlm-sandbox-base:bookworm", "python:3.11-slim")


def docker_image() -> str:
    """The image the seed's DockerREPL runs on here (RLM_BENCH_SEED_IMAGE overrides)."""
    if explicit := os.environ.get("RLM_BENCH_SEED_IMAGE"):
        return explicit
    import docker

    client = docker.from_env()
    try:
        for image in DOCKER_IMAGES:
            try:
                client.images.get(image)
                return image
            except docker.errors.ImageNotFound:
                continue
    finally:
        client.close()
    raise RuntimeError(f"none of {DOCKER_IMAGES} is here (`make sandbox-image` makes one)")


def _docker_repl_class() -> Any:
    base = load()["docker_repl"].DockerREPL

    class SeedDockerREPL(base):  # type: ignore[misc, valid-type]
        """The seed's setup() on an image without network, `python`, dill or requests:
        its LM proxy thread as it is; its container started as it starts it, but with no
        network, and a bind-mounted stub dir that adds `python` (-> python3) and an unused
        `requests` module in place of its `pip install dill requests`; without dill its
        script falls back to pickle (its own fallback). execute_code (one `docker exec
        python -c <script>` per block) is the seed's."""

        def setup(self) -> None:
            handler = type(
                "Handler",
                (load()["docker_repl"].LLMProxyHandler,),
                {
                    "lm_handler_address": self.lm_handler_address,
                    "pending_calls": self.pending_calls,
                    "lock": self._calls_lock,
                    "depth": self.depth,
                },
            )
            self.proxy_server = HTTPServer(("127.0.0.1", 0), handler)
            self.proxy_port = self.proxy_server.server_address[1]
            self.proxy_thread = threading.Thread(
                target=self.proxy_server.serve_forever, daemon=True
            )
            self.proxy_thread.start()
            stub = Path(self.temp_dir) / ".stub"
            (stub / "bin").mkdir(parents=True)
            (stub / "bin" / "python").symlink_to("/usr/bin/python3")
            (stub / "requests.py").write_text("def post(*a, **k):\n    raise OSError('none')\n")
            result = subprocess.run(
                [
                    "docker",
                    "run",
                    "-d",
                    "--rm",
                    "--network",
                    "none",
                    "-v",
                    f"{self.temp_dir}:/workspace",
                    "-e",
                    "PATH=/workspace/.stub/bin:/usr/local/bin:/usr/bin:/bin",
                    "-e",
                    "PYTHONPATH=/workspace/.stub",
                    "--label",
                    "rlm.bench=seed-docker-repl",
                    self.image,
                    "tail",
                    "-f",
                    "/dev/null",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"Failed to start container: {result.stderr}")
            self.container_id = result.stdout.strip()

    return SeedDockerREPL


@contextlib.contextmanager
def docker_repl(image: str) -> Iterator[Any]:
    """A started seed DockerREPL on `image` (its constructor starts it), cleaned up after.
    Its workspace is a temporary directory (the seed's default is ./.rlm_workspace)."""
    workspace = tempfile.mkdtemp(prefix="rlm-bench-seed-")
    previous = os.environ.get("RLM_DOCKER_WORKSPACE_DIR")
    os.environ["RLM_DOCKER_WORKSPACE_DIR"] = workspace
    try:
        repl = _docker_repl_class()(image=image)
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    finally:
        if previous is None:
            os.environ.pop("RLM_DOCKER_WORKSPACE_DIR", None)
        else:
            os.environ["RLM_DOCKER_WORKSPACE_DIR"] = previous
    try:
        yield repl
    finally:
        if repl.container_id:
            # Its cleanup's `docker stop` waits 10 s for `tail` (pid 1) to ignore SIGTERM.
            subprocess.run(["docker", "rm", "-f", repl.container_id], capture_output=True)
        repl.cleanup()
        shutil.rmtree(workspace, ignore_errors=True)
