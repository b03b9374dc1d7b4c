"""The raw format: a volume's data is a file of exactly its size, sparse or preallocated.

A format answers for a volume's data file: what it is called, how it is made and how it
goes (the other one is agent/storage/formats/cow.py).
"""

from __future__ import annotations

import contextlib
import os

from agent import errors
from agent.storage.layout import SUFFIXES
from agent.system import fsync_dir, while_beating

NAME = "raw"
SUFFIX = SUFFIXES[NAME]


def create(path: str, size: int, preallocation: str = "sparse", beat=lambda: None,
           **_) -> None:
    """A data file of `size` bytes (allocated with fallocate if preallocated, while `beat`
    is called: system.while_beating), durable (file and directory entry) on return."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if preallocation == "preallocated" and size:
            while_beating(beat, os.posix_fallocate, fd, 0, size)
        os.fsync(fd)
    except OSError as exc:
        # EFBIG: larger than this file system allows: the size asked for, not a full disk.
        raise errors.from_os_error(exc, "cannot size the volume", "size") from None
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def remove(path: str, beat=lambda: None) -> None:
    """The data file gone, durably; a missing one is gone already. The file system frees
    its extents inside unlink, which `beat` is called beside (system.while_beating): a
    large sparse volume a guest wrote in scattered pieces takes seconds to a minute."""
    while_beating(beat, _unlink, path)
    fsync_dir(os.path.dirname(path))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
