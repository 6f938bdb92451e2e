"""`rlm-sandbox-agent` / `python -m sandbox_agent`: serve one sandbox over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sandbox_agent.executor import ExecutorConfig
from sandbox_agent.server import AgentConfig, run_until_signalled


def parse_args(argv: list[str] | None = None) -> tuple[AgentConfig, Path | None]:
    """The agent's config, and the temp dir it made for itself (removed at exit), if any."""
    parser = argparse.ArgumentParser(
        prog="rlm-sandbox-agent", description="Serve one RLM sandbox over gRPC."
    )
    parser.add_argument(
        "--listen", required=True, help="unix:/path/to/agent.sock, or HOST:PORT (port 0 = any)"
    )
    parser.add_argument("--workdir", type=Path, help="working directory of user code")
    parser.add_argument("--state-dir", type=Path, help="where loaded values are kept")
    parser.add_argument(
        "--exec-timeout", type=float, default=300.0, help="default seconds per block"
    )
    parser.add_argument(
        "--max-output-chars", type=int, default=1_000_000, help="per stream, per block"
    )
    parser.add_argument("--memory-limit-mb", type=int, default=0, help="worker address-space limit")
    parser.add_argument(
        "--token-env",
        default="RLM_AGENT_TOKEN",
        help="environment variable holding the bearer token callers must send (if set)",
    )
    parser.add_argument(
        "--reflection", action="store_true", help="serve gRPC reflection (about 12 MB more)"
    )
    parser.add_argument(
        "--fleet", action="store_true", help="fleet mode: leased by one session at a time"
    )
    parser.add_argument("--lease-ttl", type=float, default=60.0, help="fleet lease TTL (s)")
    parser.add_argument("--tls-cert", type=Path, help="TLS certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    args = parser.parse_args(argv)
    own_dir = None if args.workdir else Path(tempfile.mkdtemp(prefix="rlm-agent-"))
    workdir: Path = args.workdir or (own_dir / "work" if own_dir else Path("work"))
    state_dir: Path = args.state_dir or (own_dir or workdir.parent) / "state"
    config = AgentConfig(
        listen=args.listen,
        executor=ExecutorConfig(
            workdir=workdir,
            state_dir=state_dir,
            exec_timeout_seconds=args.exec_timeout,
            max_output_chars=args.max_output_chars,
            memory_limit_mb=args.memory_limit_mb,
        ),
        # Taken out of the environment: the worker (user code) does not inherit it.
        token=os.environ.pop(args.token_env, None) or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        reflection=args.reflection,
        fleet=args.fleet,
        lease_ttl_seconds=args.lease_ttl,
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return config, own_dir


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s agent %(levelname)s %(message)s")
    config, own_dir = parse_args(argv)
    try:
        asyncio.run(run_until_signalled(config))
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
