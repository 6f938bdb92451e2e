"""The jail of a local sandbox's worker: namespaces, a read-only view of the system, limits.

The agent spawns the worker as usual; with `--isolation`, the worker's `main()` calls `enter()`
before anything else, and only the process that comes back out of it runs user code:

    agent ── P   the spawned process; stays outside: forwards SIGINT, mirrors how W ended
             └── C   pid 1 of a new pid namespace (and new user, mount, network, IPC, UTS and
                 │   cgroup namespaces): builds the file system view, then only reaps
                 └── W   pid 2: the worker, uid 1000 inside (nobody outside when the agent is
                         root), no capabilities, no network, its own /proc, /tmp and limits

User code never runs as pid 1 (a pid 1 ignores signals it has no handler for, even SIGKILL
sent from inside: `os.kill(os.getpid(), SIGKILL)` must still kill the worker). When W ends, C
exits, and the kernel kills every process left in the namespace, `setsid()` or not; the agent's
SIGKILL to P's process group reaches C (from an ancestor namespace) with the same effect.

C is created by the raw clone(2) system call, so that P never changes: as root it can map the
sandbox's uid to nobody, and where the kernel refuses any step (no user namespaces, a seccomp
profile, a masked /proc) C reports why and P runs the worker itself ("none: <why>").

What the jailed worker sees of the file system: `jail_fs.py`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from pathlib import Path
from typing import NamedTuple, NoReturn

from sandbox_agent import jail_fs
from sandbox_agent import syscalls as sc
from sandbox_agent.limits import DEFAULT_MAX_PROCESSES, DEFAULT_TMP_SIZE_MB, NOBODY_UID

ISOLATED = "namespaces"
SANDBOX_UID = 1000  # the uid (and gid) user code sees inside
_NAMESPACES = (
    sc.CLONE_NEWUSER
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWNET
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWCGROUP
)


class JailUnavailable(Exception):
    """The kernel refused a step of the jail (and nothing of it was kept)."""


class JailConfig(NamedTuple):
    workdir: Path
    state_dir: Path
    max_processes: int = DEFAULT_MAX_PROCESSES
    tmp_size_mb: int = DEFAULT_TMP_SIZE_MB
    # Largest file user code may write (RLIMIT_FSIZE): the work dir is on the host's disk.
    max_file_mb: int = 1024
    # Who user code is outside, when the agent runs as root (otherwise: the agent's own uid).
    sandbox_uid: int = NOBODY_UID
    sandbox_gid: int = NOBODY_UID
    # Descriptors the worker keeps (its pipes to the agent).
    keep_fds: tuple[int, ...] = ()


_forward_to = 0  # where SIGINT goes: P forwards to C, C to W


def _forward(signum: int, frame: object) -> None:
    if _forward_to:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_forward_to, signum)


def enter(config: JailConfig) -> str:
    """Returns in the process that is to run user code: `ISOLATED` in W, or "none: <why>" in P
    when the kernel refused a step (P then runs the worker itself, as without isolation)."""
    try:
        return _start(config, jail_fs.plan(config.workdir, config.state_dir))
    except (OSError, JailUnavailable) as exc:
        return f"none: {exc}"


def share(path: Path, up_to: Path) -> None:
    """Lets the jailed worker read a file the agent wrote (a loaded value), when the agent runs
    as root: the file and its directories up to `up_to` get `up_to`'s owner (the sandbox's)."""
    if os.geteuid() != 0 or not path.is_relative_to(up_to):
        return
    owner = os.stat(up_to)
    for target in (path, *path.parents):
        os.chown(target, owner.st_uid, owner.st_gid)
        if target == up_to or target == target.parent:
            break


def _start(config: JailConfig, entries: list[jail_fs.Entry]) -> str:
    global _forward_to
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    previous = signal.signal(signal.SIGINT, _forward)  # no-op until W runs
    try:
        child = sc.clone_namespaces(_NAMESPACES)
    except OSError as exc:
        for fd in (go_read, go_write, report_read, report_write):
            os.close(fd)
        signal.signal(signal.SIGINT, previous)
        raise JailUnavailable(_why_no_namespaces(exc)) from exc
    if child == 0:
        os.close(go_write)
        os.close(report_read)
        _child(config, entries, go_read, report_write)  # returns in W only
        return ISOLATED
    os.close(go_read)
    os.close(report_write)
    try:
        _map_ids(child, config)
        # Without a cgroup, memory is capped per process only: if the machine runs out, the
        # kernel kills the sandbox's processes first, not the orchestrator. (Written by P:
        # as root, that is also a floor that user code cannot lower.)
        _write(f"/proc/{child}/oom_score_adj", "1000")
        if os.geteuid() == 0:  # the sandbox's uid writes the work dir and reads the state dir
            for directory in (config.workdir, config.state_dir):
                os.chown(directory, config.sandbox_uid, config.sandbox_gid)
        os.write(go_write, b"1")
        os.close(go_write)
        answer = _read_line(report_read)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(go_write)
        os.kill(child, signal.SIGKILL)  # not reaped yet: the pid is still ours
        _reap(child)
        os.close(report_read)
        signal.signal(signal.SIGINT, previous)
        raise
    if answer != b"OK":
        _reap(child)  # C exits by itself after an error
        os.close(report_read)
        signal.signal(signal.SIGINT, previous)
        raise JailUnavailable(
            answer.removeprefix(b"ERR ").decode(errors="replace")
            or "the jail's init process died while starting"
        )
    _forward_to = child
    # P keeps its copies of the worker's pipes until it exits: the agent, which kills the
    # worker's process group when its frames end, then sees their end only after P took W's
    # exit status (a kill before would replace it with SIGKILL).
    _supervise(child, report_read)


def _why_no_namespaces(exc: OSError) -> str:
    hint = {
        1: "not permitted (a container's seccomp profile, an AppArmor policy, or "
        "kernel.unprivileged_userns_clone=0)",
        28: "user namespaces are disabled (user.max_user_namespaces = 0) or exhausted",
        22: "this kernel lacks a namespace type",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"new namespaces refused: {hint}"


def _map_ids(child: int, config: JailConfig) -> None:
    """Root maps the sandbox's uid to nobody (a uid mapped to root would still own root's
    files); another user can only map itself, and must give up setgroups(2) for that."""
    root = os.geteuid() == 0
    uid = config.sandbox_uid if root else os.geteuid()
    gid = config.sandbox_gid if root else os.getegid()
    if not root:
        _write(f"/proc/{child}/setgroups", "deny")
    _write(f"/proc/{child}/uid_map", f"{SANDBOX_UID} {uid} 1\n")
    _write(f"/proc/{child}/gid_map", f"{SANDBOX_UID} {gid} 1\n")


def _write(path: str, text: str) -> None:
    with open(path, "w") as target:
        target.write(text)


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\n")


def _reap(child: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)


def _supervise(child: int, report: int) -> NoReturn:
    """P from now on: wait for C, then end as W ended (the agent words the worker's death)."""
    _, status = os.waitpid(child, 0)
    line = _read_line(report)
    code = os.waitstatus_to_exitcode(status)
    if line.startswith(b"W "):
        code = os.waitstatus_to_exitcode(int(line[2:]))
    _end_like(code)


def _end_like(code: int) -> NoReturn:
    if code < 0:
        signum = -code
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        code = 128 + signum  # a signal whose default is not to terminate
    os._exit(code)


# -- C: the namespace's init ------------------------------------------------------------------


def _child(config: JailConfig, entries: list[jail_fs.Entry], go: int, report: int) -> None:
    """Builds the jail, starts W, and from then on only reaps. Returns in W alone."""
    global _forward_to
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.read(go, 1) != b"1":  # P died or gave up before mapping our ids
            os._exit(1)
        os.close(go)
        fds = jail_fs.open_sources(entries)
        _become_sandbox_user()
        sc.sethostname("sandbox")
        jail_fs.build_root(entries, fds, config.workdir, config.tmp_size_mb, SANDBOX_UID)
        for fd in fds.values():
            os.close(fd)
        _limit(config)
        sc.drop_capabilities()
        worker = os.fork()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            message = " ".join(str(exc).split())
            os.write(report, f"ERR {message}\n".encode(errors="replace"))
        os._exit(1)
    if worker == 0:
        try:
            _become_worker(config)
        except BaseException as exc:  # jailed already: never run on as if unjailed
            os.write(2, f"the jailed worker could not start: {exc}\n".encode(errors="replace"))
            os._exit(1)
        return
    _forward_to = worker
    with contextlib.suppress(OSError):
        sc.prctl(sc.PR_SET_DUMPABLE, 0)  # W (same uid) cannot ptrace its init
    _close_all_but(report)
    with contextlib.suppress(OSError):
        os.write(report, b"OK\n")
    _init_loop(worker, report)


def _become_sandbox_user() -> None:
    with contextlib.suppress(PermissionError):
        os.setgroups([])  # root's group 0 must not stay (refused, and moot, for non-root)
    os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)


def _limit(config: JailConfig) -> None:
    # RLIMIT_NPROC counts per user namespace (Linux >= 5.14): it caps this sandbox alone.
    for limit, value in (
        (resource.RLIMIT_NPROC, config.max_processes),
        (resource.RLIMIT_FSIZE, config.max_file_mb * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
    ):
        _, hard = resource.getrlimit(limit)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, value))


def _close_all_but(*keep: int) -> None:
    """Closes every descriptor above 2 but `keep` (close_range: no scan of /proc/self/fd);
    0 and 1 become /dev/null unless kept."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        if fd not in keep:
            os.dup2(null, fd)
    os.close(null)


def _become_worker(config: JailConfig) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    _close_all_but(*config.keep_fds)
    os.environ["TMPDIR"] = "/tmp"
    os.environ["HOME"] = str(config.workdir.resolve())
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _init_loop(worker: int, report: int) -> NoReturn:
    """Reaps every orphan of the namespace; ends when the worker ends, telling P how."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            with contextlib.suppress(OSError):
                os.write(report, f"W {status}\n".encode())
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def probe(workdir: Path, state_dir: Path) -> str:
    """What isolation a worker would get here (run as `python -m sandbox_agent.jail`)."""
    return enter(JailConfig(workdir=workdir, state_dir=state_dir, keep_fds=(1,)))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="report the isolation a sandbox gets here")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    arguments = parser.parse_args()
    print(probe(arguments.workdir, arguments.state_dir), flush=True)
