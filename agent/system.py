"""The operating system behind one thin seam: clocks, signals, reaping, process control.

The supervisor calls only these for anything that touches processes or time, so a unit test
can drive its loop with a fake; the integration tests use this real one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = None


def _prctl(option: int, value: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (os.posix_fallocate has none): punching holes, zeroing
    ranges. OSError as the kernel says (EOPNOTSUPP where the file system cannot)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper() -> None:
    """Orphaned descendants (our double-forked workers) become our children to reap."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    _prctl(PR_SET_PDEATHSIG, sig)


def write_atomic(path, obj) -> None:
    """Replace `path` with `obj` as JSON so that, after a crash at any moment, the file holds
    either the old or the new whole: a fsynced temporary file renamed over it, then the
    directory fsynced so the rename itself is on disk before anyone is told."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk's half-written file is not left to hold its blocks
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def makedirs(path: str, mode: int = 0o777) -> None:
    """os.makedirs(path, mode, exist_ok=True) without its recursion: a client's path of
    thousands of names is the OS's to refuse (ENAMETOOLONG), never a RecursionError."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            if not os.path.isdir(p):
                raise


def fsync_dir(path: str) -> None:
    """Make a directory entry change (create, rename, unlink) survive a power cut."""
    fsync_path(path, os.O_DIRECTORY)


def fsync_path(path: str, flags: int = 0) -> None:
    """Make a file's data (written by anyone, through any descriptor) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def while_beating(beat, fn, *args, patience: float | None = None, **kwargs):
    """`fn(*args, **kwargs)`, run on a thread while `beat()` is called every 0.2 s; its
    result, or what it raised. For a call the system can make long, which no worker may sit
    in silent past its deadline: ext4 frees a fragmented file's extents inside unlink (5.7 s
    for 100,000 here), fallocate allocates every page of a tmpfs (1.1 s for 4 GiB) or
    writes a whole file where the file system has no fallocate (glibc's fallback), a
    sanlock acquire watches a silent owner. With `patience`, the wait ends after that many
    seconds with None, and `fn` goes on on its (daemon) thread."""
    import threading  # here: the command line imports this module for fsync_path
    out: list = []

    def run():
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed back to the caller's thread
            out.append((False, exc))

    thread = threading.Thread(target=run, name="beating", daemon=True)
    thread.start()
    deadline = None if patience is None else time.monotonic() + patience
    thread.join(0.2)
    while thread.is_alive():
        if deadline is not None and time.monotonic() >= deadline:
            return None
        beat()
        thread.join(0.2)
    ok, value = out[0]
    if not ok:
        raise value
    return value


# qemu allocates each request's buffer whole (4 MiB for a copy's reads and writes), past
# glibc's threshold for mmap: every request mapped fresh memory, faulted in and zeroed its
# 1,024 pages, and unmapped them. Kept on the heap instead (up to 32 MiB, glibc's most),
# a qemu-nbd serving 4 GiB of a qcow2 in 4 MiB reads took 1.3 s of CPU where it took 2.8
# (docs/performance.md). What the heap keeps is bounded by the tool's address space limit.
QEMU_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def keep_buffers_on_heap() -> None:
    """In a qemu tool's child, between fork and exec: QEMU_MALLOC added to its tunables."""
    have = os.environ.get("GLIBC_TUNABLES")
    os.putenv("GLIBC_TUNABLES", f"{have}:{QEMU_MALLOC}" if have else QEMU_MALLOC)


def describe_status(status: int) -> dict:
    """How a process ended, as data: {"signal": "SIGKILL"} or {"exit_code": 3}."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"SIG{sig}"
        return {"signal": name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


class System:
    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    @staticmethod
    def kill(pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    @staticmethod
    def reap() -> list[tuple[int, int]]:
        """Every child that has ended, expected or not: (pid, raw status)."""
        ended = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return ended
            if pid == 0:
                return ended
            ended.append((pid, status))
