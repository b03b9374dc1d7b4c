"""Room kept for a domain's own bookkeeping, so that a full file system always has a way out.

A delete needs room for SQLite's rollback journal. Format leaves RESERVE_BYTES allocated in
`metadata.reserve` beside the database; a delete that finds no room gives the reserve back
and deletes (DomainDB.delete_volume), and the reserve is made again once the volume's data
is gone (agent/storage/volumes.py).
"""

from __future__ import annotations

import errno
import os

RESERVE_NAME = "metadata.reserve"
RESERVE_BYTES = 2 << 20  # room for a delete's journal on a full file system


def ensure_reserve(root: str) -> bool:
    """Make the domain's reserve file whole (RESERVE_BYTES, allocated); False if there is no
    room for it now (a later call makes it)."""
    path = os.path.join(root, RESERVE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_blocks * 512 >= RESERVE_BYTES:
            return True
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(fd, 0)  # a half-allocated reserve would promise room it lacks
                return False
            os.pwrite(fd, bytes(RESERVE_BYTES), 0)  # no fallocate here: write it
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def release_reserve(root: str) -> bool:
    """Give the reserve's room back to the file system; False if there was none."""
    path = os.path.join(root, RESERVE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        had = os.fstat(fd).st_blocks > 0
        os.ftruncate(fd, 0)
        return had
    finally:
        os.close(fd)
