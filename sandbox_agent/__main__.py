"""`rlm-sandbox-agent` / `python -m sandbox_agent`: serve one sandbox over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from sandbox_agent import TOKEN_ENV, __version__
from sandbox_agent.executor import ExecutorConfig, WorkerError
from sandbox_agent.limits import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_MAX_PROCESSES,
    DEFAULT_TMP_SIZE_MB,
    NOBODY_UID,
)
from sandbox_agent.server import AgentConfig, ListenError, run_until_signalled
from sandbox_agent.template_client import TemplateClient


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, where it has one (not "None" for an unset one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(
    argv: list[str] | None = None, worker_template: TemplateClient | None = None
) -> tuple[AgentConfig, Path | None]:
    """The agent's config, and the temp dir it made for itself (removed at exit), if any."""
    parser = argparse.ArgumentParser(
        prog="rlm-sandbox-agent",
        description="Serve one RLM sandbox over gRPC.",
        formatter_class=_ShowDefaults,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--listen", required=True, help="unix:/path/to/agent.sock, or HOST:PORT (port 0 = any)"
    )
    parser.add_argument("--workdir", type=Path, help="working directory of user code")
    parser.add_argument("--state-dir", type=Path, help="where loaded values are kept")
    # No --exec-timeout: every Execute call carries its block's timeout (the orchestrator's
    # exec_timeout_seconds); a call that sets none gets DEFAULT_EXEC_TIMEOUT_SECONDS.
    parser.add_argument(
        "--max-output-chars",
        type=int,
        default=DEFAULT_MAX_OUTPUT_CHARS,
        help="per stream, per block, when a call sets none",
    )
    parser.add_argument("--memory-limit-mb", type=int, default=0, help="worker address-space limit")
    parser.add_argument(
        "--isolation",
        choices=("off", "auto", "required"),
        default="off",
        help="run the worker in a jail of namespaces (local sandboxes; a container needs none): "
        "auto = when the kernel allows it, required = fail without",
    )
    parser.add_argument(
        "--max-processes",
        type=int,
        default=DEFAULT_MAX_PROCESSES,
        help="processes (and threads) in the jail",
    )
    parser.add_argument(
        "--tmp-size-mb", type=int, default=DEFAULT_TMP_SIZE_MB, help="size of the jail's /tmp"
    )
    parser.add_argument(
        "--sandbox-uid",
        type=int,
        default=NOBODY_UID,
        help="uid (and gid) of user code outside the jail when the agent runs as root",
    )
    parser.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default="666",  # a string: argparse parses it (as octal), and --help shows it so
        help="permissions of the unix socket (octal): 666 where the directory keeps others out "
        "(a container's), 600 for an agent of the orchestrator's own user",
    )
    parser.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        help="environment variable holding the bearer token callers must send (if set)",
    )
    parser.add_argument("--token-fd", type=int, help=argparse.SUPPRESS)  # set by _hide_token
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="stop (as on SIGTERM) when this process (the orchestrator that started us) dies",
    )
    parser.add_argument(
        "--orphan-timeout",
        type=float,
        default=AgentConfig.orphan_timeout_seconds,
        help="stop once no orchestrator has held an Attach stream for this many seconds (0: never)",
    )
    parser.add_argument(
        "--reflection", action="store_true", help="serve gRPC reflection (about 12 MB more)"
    )
    parser.add_argument(
        "--fleet", action="store_true", help="fleet mode: leased by one session at a time"
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=AgentConfig.lease_ttl_seconds,
        help="fleet lease TTL (s)",
    )
    parser.add_argument("--tls-cert", type=Path, help="TLS certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    parser.add_argument(
        "--health-listen",
        help="HOST:PORT of a plaintext listener serving grpc.health.v1 only (kubelet probes)",
    )
    args = parser.parse_args(argv)
    own_dir = None if args.workdir else Path(tempfile.mkdtemp(prefix="rlm-agent-"))
    workdir: Path = args.workdir or (own_dir / "work" if own_dir else Path("work"))
    state_dir: Path = args.state_dir or (own_dir or workdir.parent) / "state"
    config = AgentConfig(
        listen=args.listen,
        executor=ExecutorConfig(
            workdir=workdir,
            state_dir=state_dir,
            max_output_chars=args.max_output_chars,
            memory_limit_mb=args.memory_limit_mb,
            isolation=args.isolation,
            max_processes=args.max_processes,
            tmp_size_mb=args.tmp_size_mb,
            sandbox_uid=args.sandbox_uid,
            worker_template=worker_template,
        ),
        socket_mode=args.socket_mode,
        token=_read_token(args.token_fd) if args.token_fd is not None else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        reflection=args.reflection,
        fleet=args.fleet,
        lease_ttl_seconds=args.lease_ttl,
        health_listen=args.health_listen,
        orphan_timeout_seconds=args.orphan_timeout,
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return config, own_dir


def _read_token(fd: int) -> str | None:
    with os.fdopen(fd, "rb") as source:
        return source.read().decode() or None


def _hide_token(argv: list[str], token_env: str) -> None:
    """Start again without the token in the environment: os.environ.pop would leave it in
    /proc/<pid>/environ, which user code could read. It comes back through a pipe."""
    token = os.environ.pop(token_env, None)
    if not token:
        return
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # a token is far below a pipe's buffer
    os.close(write_end)
    os.set_inheritable(read_end, True)
    os.execv(
        sys.executable, [sys.executable, "-m", "sandbox_agent", *argv, "--token-fd", str(read_end)]
    )


def _flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _watch_parent(parent_pid: int) -> int:
    """A descriptor that becomes readable when the orchestrator's *process* ends (PDEATHSIG
    would fire when the thread that started us ends: a worker thread of a persistent RLM)."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        pidfd = -1
    if pidfd < 0 or os.getppid() != parent_pid:  # it died before we looked
        raise SystemExit(f"the orchestrator (pid {parent_pid}) is gone")
    return pidfd


async def _serve(config: AgentConfig, parent_pidfd: int | None) -> None:
    if parent_pidfd is not None:
        import signal

        loop = asyncio.get_running_loop()

        def parent_gone() -> None:
            # Stop as on SIGTERM: the same clean shutdown (worker and jail killed, socket gone).
            loop.remove_reader(parent_pidfd)
            os.kill(os.getpid(), signal.SIGTERM)

        loop.add_reader(parent_pidfd, parent_gone)
    await run_until_signalled(config)


def _hide_environment() -> None:
    """The token left os.environ, but /proc/<agent>/environ still has it: make the agent's
    /proc entries unreadable to user code (same uid) by making the process non-dumpable."""
    import ctypes

    pr_set_dumpable = 4
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_dumpable, 0)


def main(
    argv: list[str] | None = None,
    worker_template: TemplateClient | None = None,
    parent_pidfd: int | None = None,
) -> None:
    """Also run, with a worker template and the orchestrator's pidfd, in an agent forked from
    the local fork server (forkserver.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s agent %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "--token-fd" not in argv:
        token_env = argv[argv.index("--token-env") + 1] if "--token-env" in argv else TOKEN_ENV
        _hide_token(argv, token_env)
    config, own_dir = parse_args(argv, worker_template)
    parent = _flag_value(argv, "--parent-pid")
    try:
        if parent_pidfd is None and parent:
            parent_pidfd = _watch_parent(int(parent))
        if config.token:
            _hide_environment()
        asyncio.run(_serve(config, parent_pidfd))
    except (WorkerError, ListenError) as exc:
        # Its worker said why on stderr (the log): one line more, no traceback to bury it.
        sys.exit(f"the sandbox agent could not start: {exc}")
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
