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

File system: a small tmpfs root (read-only once built) holding read-only binds, at their own
paths, of Python's prefixes, this package, /usr and /lib*, a few /etc entries, minimal /dev
nodes and the state dir; the work dir read-write; a fresh /proc of the new pid namespace; a
size-capped /tmp. C opens every source (O_PATH) while it still has the agent's uid, then
becomes the sandbox's user (files it creates in the new root must have a mapped owner) and
binds through those descriptors.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path
from typing import NamedTuple, NoReturn

from sandbox_agent import syscalls as sc

ISOLATED = "namespaces"
SANDBOX_UID = 1000  # the uid (and gid) user code sees inside
NEW_ROOT = "/tmp"  # mount point of the new root, in C's own mount namespace only
_NAMESPACES = (
    sc.CLONE_NEWUSER
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWNET
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWCGROUP
)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Not all of /etc: an orchestrator's own configuration (and its secrets) may live there.
ETC_ENTRIES = (
    "hosts",
    "nsswitch.conf",
    "localtime",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "alternatives",
    "mime.types",
    "protocols",
    "services",
    "os-release",
)
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "shm": "/tmp",  # POSIX shared memory and semaphores (multiprocessing) share /tmp's cap
}
PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    "sandbox:x:{uid}:{uid}:sandbox:{home}:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n"


class JailUnavailable(Exception):
    """The kernel refused a step of the jail (and nothing of it was kept)."""


class JailConfig(NamedTuple):
    workdir: Path
    state_dir: Path
    max_processes: int = 128
    tmp_size_mb: int = 256
    # Largest file user code may write (RLIMIT_FSIZE): the work dir is on the host's disk.
    max_file_mb: int = 1024
    # Who user code is outside, when the agent runs as root (otherwise: the agent's own uid).
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    # Descriptors the worker keeps (its pipes to the agent).
    keep_fds: tuple[int, ...] = ()


class _Entry(NamedTuple):
    path: str
    kind: str  # dir | file | dev | link
    writable: bool = False
    link: str = ""


_forward_to = 0  # where SIGINT goes: P forwards to C, C to W


def _forward(signum: int, frame: object) -> None:
    if _forward_to:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_forward_to, signum)


def enter(config: JailConfig) -> str:
    """Returns in the process that is to run user code: `ISOLATED` in W, or "none: <why>" in P
    when the kernel refused a step (P then runs the worker itself, as without isolation)."""
    try:
        return _start(config, _plan(config))
    except (OSError, JailUnavailable) as exc:
        return f"none: {exc}"


def share(path: Path, up_to: Path) -> None:
    """Lets the jailed worker read a file the agent wrote (a loaded value), when the agent runs
    as root: the file and its directories up to `up_to` get `up_to`'s owner (the sandbox's)."""
    if os.geteuid() != 0:
        return
    owner = os.stat(up_to)
    for target in (path, *path.parents):
        os.chown(target, owner.st_uid, owner.st_gid)
        if target == up_to or target == target.parent:
            break


def _plan(config: JailConfig) -> list[_Entry]:
    """What the jail shows, parents before children, each path once."""
    wanted: list[_Entry] = []
    for path in SYSTEM_PATHS:
        wanted += _entry(path)
    for name in ETC_ENTRIES:
        wanted += _entry(f"/etc/{name}")
    for name in DEVICES:
        wanted += _entry(f"/dev/{name}", device=True)
    package = Path(__file__).resolve().parent
    executable = Path(os.path.realpath(sys.executable))
    for path in {sys.base_prefix, sys.prefix, str(package), str(executable.parent.parent)}:
        for variant in {os.path.abspath(path), os.path.realpath(path)}:
            wanted += _entry(variant, follow=True)
    wanted.append(_Entry(str(config.state_dir.resolve()), "dir"))
    wanted.append(_Entry(str(config.workdir.resolve()), "dir", writable=True))
    planned: list[_Entry] = []
    for entry in sorted(wanted, key=lambda e: (e.path, not e.writable)):
        if entry.path in {e.path for e in planned}:
            continue
        covered = any(e.kind == "dir" and _under(entry.path, e.path) for e in planned)
        if not covered or entry.writable:
            planned.append(entry)
    return planned


def _entry(path: str, device: bool = False, follow: bool = False) -> list[_Entry]:
    if not os.path.lexists(path) or (follow and not os.path.exists(path)):
        return []
    if os.path.islink(path) and not follow:
        return [_Entry(path, "link", link=os.readlink(path))]
    if device:  # writes to /dev/null touch no file system: no read-only flag
        return [_Entry(path, "dev", writable=True)]
    return [_Entry(path, "dir" if os.path.isdir(path) else "file")]


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip("/") + "/")


def _start(config: JailConfig, entries: list[_Entry]) -> str:
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


def _child(config: JailConfig, entries: list[_Entry], go: int, report: int) -> None:
    """Builds the jail, starts W, and from then on only reaps. Returns in W alone."""
    global _forward_to
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.read(go, 1) != b"1":  # P died or gave up before mapping our ids
            os._exit(1)
        os.close(go)
        # Sources are opened here, in C's own mount namespace (a bind from another one is
        # refused) and before C becomes the sandbox's user (who cannot traverse /root).
        fds = {
            e.path: os.open(e.path, os.O_PATH | os.O_CLOEXEC) for e in entries if e.kind != "link"
        }
        _become_sandbox_user()
        sc.sethostname("sandbox")
        _build_root(config, entries, fds)
        for fd in fds.values():
            os.close(fd)
        _limit(config)
        sc.drop_capabilities()
        worker = os.fork()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(report, f"ERR {exc}\n".encode(errors="replace"))
        os._exit(1)
    if worker == 0:
        _become_worker(config, report)
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


def _build_root(config: JailConfig, entries: list[_Entry], fds: dict[str, int]) -> None:
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", NEW_ROOT, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=4m,mode=0755")
    # /tmp first: the work and state dirs usually live under the host's /tmp, and their binds
    # go on top of it, at the same paths.
    os.mkdir(NEW_ROOT + "/tmp")
    tmp_options = f"size={config.tmp_size_mb}m,mode=1777"
    sc.mount("tmpfs", NEW_ROOT + "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, tmp_options)
    for entry in entries:
        _place(entry, fds.get(entry.path))
    etc = NEW_ROOT + "/etc"
    os.makedirs(etc, exist_ok=True)
    home = str(config.workdir.resolve())
    for name, text in (
        ("passwd", PASSWD.format(uid=SANDBOX_UID, home=home)),
        ("group", GROUP.format(uid=SANDBOX_UID)),
        ("hostname", "sandbox\n"),
    ):
        _write(f"{etc}/{name}", text)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{NEW_ROOT}/dev/{name}")
    # A /proc of the new pid namespace: mounted by its pid 1, while the old root (with its
    # fully visible /proc, which the kernel requires) is still there.
    os.mkdir(NEW_ROOT + "/proc")
    sc.mount("proc", NEW_ROOT + "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    os.chdir(NEW_ROOT)
    sc.pivot_root(".", ".")  # the old root now sits on top of the new one, at "/"
    sc.umount(".", sc.MNT_DETACH)
    os.chdir("/")
    sc.mount(
        None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
    )
    os.chdir(home)


def _place(entry: _Entry, fd: int | None) -> None:
    target = NEW_ROOT + entry.path
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if entry.kind == "link":
        os.symlink(entry.link, target)
        return
    if entry.kind == "dir":
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    sc.mount(f"/proc/self/fd/{fd}", target, None, sc.MS_BIND)
    flags = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.kept_flags(target)
    if entry.kind != "dev":
        flags |= sc.MS_NODEV
    if not entry.writable:
        flags |= sc.MS_RDONLY
    sc.mount(None, target, None, flags)


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


def _become_worker(config: JailConfig, report: int) -> None:
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
