"""The raw format: a volume's data is a file of exactly its size, sparse or preallocated.

A format answers for a volume's data file: what it is called, how it is made and how it
goes (the other one is agent/storage/formats/cow.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

from agent import errors
from agent.storage.layout import SUFFIXES
from agent.system import fsync_dir

NAME = "raw"
SUFFIX = SUFFIXES[NAME]


def create(path: str, size: int, preallocation: str = "sparse", **_) -> None:
    """A data file of `size` bytes (allocated with fallocate if preallocated), durable (file
    and directory entry) on return."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if preallocation == "preallocated" and size:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    except OSError as exc:
        # EFBIG: larger than this file system allows: the size asked for, not a full disk.
        raise errors.from_os_error(exc, "cannot size the volume", "size") from None
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def remove(path: str, beat=None) -> None:
    """The data file gone, durably; a missing one is gone already. A file system frees the
    file's extents inside unlink (ext4 here: 5.7 s for a file of 100,000 extents, what a
    guest's scattered writes make of a sparse volume), so a worker passes its heartbeat as
    `beat`: the unlink then runs on a thread and `beat` is called meanwhile, which keeps the
    worker from being killed as silent (its task failed with the volume already gone)."""
    if beat is None:
        _unlink(path)
    else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unlink") as pool:
            unlinked = pool.submit(_unlink, path)
            while concurrent.futures.wait([unlinked], timeout=0.2).not_done:
                beat()
            unlinked.result()
    fsync_dir(os.path.dirname(path))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
