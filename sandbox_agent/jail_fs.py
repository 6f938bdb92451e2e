"""The file system a jailed worker sees (built by the jail's init, `jail.py`).

A small tmpfs root, read-only once built, holding read-only binds, at their own paths, of
Python's prefixes, the `sandbox_agent` package, /usr and /lib*, a few /etc entries, minimal
/dev nodes and the state dir; the work dir read-write; a fresh /proc of the new pid namespace;
a size-capped /tmp. The init opens every source (O_PATH) while it still has the agent's uid,
then becomes the sandbox's user (files it creates in the new root must have an owner mapped in
its namespace) and binds through those descriptors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from sandbox_agent import syscalls as sc

NEW_ROOT = "/tmp"  # mount point of the new root, in the init's own mount namespace only
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


class Entry(NamedTuple):
    path: str
    kind: str  # dir | file | dev | link
    writable: bool = False
    link: str = ""


def plan(workdir: Path, state_dir: Path) -> list[Entry]:
    """What the jail shows, parents before children, each path once (computed outside)."""
    wanted: list[Entry] = []
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
    wanted.append(Entry(str(state_dir.resolve()), "dir"))
    wanted.append(Entry(str(workdir.resolve()), "dir", writable=True))
    planned: list[Entry] = []
    for entry in sorted(wanted, key=lambda e: (e.path, not e.writable)):
        if entry.path in {e.path for e in planned}:
            continue
        covered = any(e.kind == "dir" and _under(entry.path, e.path) for e in planned)
        if not covered or entry.writable:
            planned.append(entry)
    return planned


def _entry(path: str, device: bool = False, follow: bool = False) -> list[Entry]:
    if not os.path.lexists(path) or (follow and not os.path.exists(path)):
        return []
    if os.path.islink(path) and not follow:
        return [Entry(path, "link", link=os.readlink(path))]
    if device:  # writes to /dev/null touch no file system: no read-only flag
        return [Entry(path, "dev", writable=True)]
    return [Entry(path, "dir" if os.path.isdir(path) else "file")]


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip("/") + "/")


def open_sources(entries: list[Entry]) -> dict[str, int]:
    """O_PATH descriptors of what is bound, opened in the init's own mount namespace (a bind
    from another namespace's mount is refused) and with the agent's uid (the sandbox's cannot
    traverse a directory such as /root)."""
    return {e.path: os.open(e.path, os.O_PATH | os.O_CLOEXEC) for e in entries if e.kind != "link"}


def build_root(
    entries: list[Entry], fds: dict[str, int], workdir: Path, tmp_size_mb: int, uid: int
) -> None:
    """Mounts the new root, pivots into it and leaves the cwd in the work dir."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", NEW_ROOT, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=4m,mode=0755")
    # /tmp first: the work and state dirs usually live under the host's /tmp, and their binds
    # go on top of it, at the same paths.
    os.mkdir(NEW_ROOT + "/tmp")
    tmp_options = f"size={tmp_size_mb}m,mode=1777"
    sc.mount("tmpfs", NEW_ROOT + "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, tmp_options)
    for entry in entries:
        _place(entry, fds.get(entry.path))
    etc = NEW_ROOT + "/etc"
    os.makedirs(etc, exist_ok=True)
    home = str(workdir.resolve())
    for name, text in (
        ("passwd", PASSWD.format(uid=uid, home=home)),
        ("group", GROUP.format(uid=uid)),
        ("hostname", "sandbox\n"),
    ):
        with open(f"{etc}/{name}", "w") as written:
            written.write(text)
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


def _place(entry: Entry, fd: int | None) -> None:
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
