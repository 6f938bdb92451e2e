"""`rlm-orchestrator serve` as a subprocess for the benchmarks: its config (scripted models
"root" and "sub"), its start (until LISTENING) and its stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def config(
    base_url: str, directory: Path, concurrency: int, name: str = "bench", *settings: str
) -> Path:
    """Both models served by the scripted LM at `base_url`, neither capped below
    `concurrency` (the default cap, 16, would queue the LM calls: the benchmarks measure the
    orchestrator); `settings` are more top-level TOML lines."""
    lines = [
        *settings,
        'listen = "127.0.0.1:0"',
        f"max_concurrent_completions = {2 * concurrency}",
        'root_model = "root"',
        'sub_model = "sub"',
    ]
    for model in ("root", "sub"):
        lines += [
            "[[models]]",
            f'name = "{model}"',
            f'api_base = "{base_url}"',
            'api_key_env = "OPENAI_API_KEY"',
            f"max_concurrency = {concurrency}",
            "retry_initial_delay = 0.01",
        ]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(config_path: Path) -> tuple[subprocess.Popen[str], str]:
    """The server process and its address, once it printed LISTENING (its router ready)."""
    env = {**os.environ, "OPENAI_API_KEY": "dummy", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    command = [sys.executable, "-m", "rlm_orchestrator.cli", "serve", "--config", str(config_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        stop(process)
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.split()[1]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout:
        process.stdout.close()
