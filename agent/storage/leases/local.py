"""Per-volume leases: the only exclusion there is (no central manager, no agent-wide lock).

A lease is a Linux open-file-description (OFD) write lock over the whole lease file. Why OFD
rather than flock() or classic POSIX locks:

- exclusive across processes, and on NFS (where the kernel forwards it to the server's lock
  manager) across hosts too; flock() is host-local on many NFS setups;
- the kernel frees it when the holder dies, even by SIGKILL, so a crash never leaves a lease
  that needs cleaning;
- unlike a classic POSIX lock it is owned by the open file description, not the process, so
  opening and closing the same file elsewhere in the process (a probe, a log reader, a library)
  does not silently drop it, and a second acquire in the same process conflicts as it should;
- F_OFD_GETLK tests for a lock without taking one, so a probe can never make a real acquirer
  fail the way a take-then-release test would.

The file also holds a JSON description of the holder (host, pid, task, since) so a probe from
any host can say who holds it. The content is advice for humans and the UI; only the lock is
authoritative. After a release or a crash the content stays as a record of the last holder.

The fd is O_CLOEXEC, so an exec'd child does not inherit the lease; a plain fork() does (the
child shares the open file description), which keeps the lease held until both have closed it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import time

from agent.errors import LeaseHeld, OperationFailed

# struct flock on x86_64 and aarch64: short l_type, short l_whence, 4 bytes pad, off_t l_start,
# off_t l_len, pid_t l_pid, 4 bytes pad. l_len 0 means "to the end of the file, however long".
_FLOCK = struct.Struct("=hh4xqqi4x")
assert _FLOCK.size == 32

# Readers stop here: a holder record is a few hundred bytes, anything bigger is not ours.
_MAX_RECORD = 64 * 1024


def _flock(l_type: int) -> bytes:
    # l_pid must be 0 for OFD requests, or the kernel answers EINVAL.
    return _FLOCK.pack(l_type, os.SEEK_SET, 0, 0, 0)


def _read_holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, _MAX_RECORD, 0))
    except (OSError, ValueError):
        # Empty (a writer between truncate and pwrite) or garbage: report no holder fields.
        return {}
    return record if isinstance(record, dict) else {}


def _is_locked(fd: int) -> bool:
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    l_type = _FLOCK.unpack(answer)[0]
    return l_type != fcntl.F_UNLCK


class Lease:
    """A held lease. release() (or leaving the with block) gives it up; a crash does too."""

    def __init__(self, path: str, fd: int, holder: dict):
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int:
        """The descriptor the lock lives on: a process that inherits it holds the lease too
        (an OFD lock belongs to the open file description), which is how a worker hands a
        lease to a longer-lived process without a gap."""
        return self._fd

    def release(self) -> None:
        # Closing the only fd of the open file description is what drops an OFD lock.
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lease {self.path} held={self.held}>"


def acquire(path: str, holder: dict) -> Lease:
    """Take the lease at ``path`` without waiting.

    Raises LeaseHeld (data: holder = what probe() reads) if anyone holds it, this process
    included. ``holder`` is recorded in the file with host_id, task_id, pid and since; keys the
    caller passes win over the defaults.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OperationFailed(f"cannot open lease {path}: {e.strerror}",
                              errno=errno.errorcode.get(e.errno, str(e.errno))) from None
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    except OSError as e:
        current = {**_read_holder(fd), "live": True}
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LeaseHeld("lease held", holder=current) from None
        raise OperationFailed(f"cannot lock lease {path}: {e.strerror}",
                              errno=errno.errorcode.get(e.errno, str(e.errno))) from None
    record = {"host_id": None, "task_id": None, "pid": os.getpid(), "since": time.time(),
              **holder}
    record.pop("live", None)  # reserved for probe(), which reads it from the lock itself
    try:
        data = json.dumps(record, sort_keys=True).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise OperationFailed(f"cannot record lease holder in {path}: {e.strerror}",
                                  errno=errno.errorcode.get(e.errno, str(e.errno))) from None
        raise
    return Lease(path, fd, record)


def probe(path: str) -> dict | None:
    """Who holds the lease, without taking it.

    None if the lease file does not exist; else ``{**holder fields, "live": bool}`` where live
    comes from the lock (the truth) and the holder fields from the file (the last holder's
    record; absent if the file is empty or unreadable).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        live = _is_locked(fd)
        return {**_read_holder(fd), "live": live}
    finally:
        # Safe: closing this unrelated open file description never drops a holder's OFD lock.
        os.close(fd)


class LocalLeases:
    """Leases as OFD locks on `leases/<volumeID>.lease` in the domain."""

    name = "local"

    def __init__(self, layout):
        self.layout = layout

    def acquire(self, volume_id: str, holder: dict) -> Lease:
        """Held until released; LeaseHeld (data.holder) if anyone holds it."""
        return acquire(self.layout.lease_path(volume_id), holder)

    def probe(self, volume_id: str) -> dict | None:
        """{holder fields..., live} or None if the volume never had a lease."""
        return probe(self.layout.lease_path(volume_id))
