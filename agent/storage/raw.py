"""The raw format: a volume's data is a sparse file of exactly its size.

A format answers for a volume's data file: what it is called, how it is made and how it
goes. A second format (qcow2, through qemu's tools) is one more module with these names.
"""

from __future__ import annotations

import contextlib
import os

from agent import errors
from agent.storage.layout import fsync_dir

NAME = "raw"
SUFFIX = ".raw"


def create(path: str, size: int) -> None:
    """A sparse data file of `size` bytes, durable (file and directory entry) on return."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        # EFBIG: larger than this file system allows: the size asked for, not a full disk.
        raise errors.from_os_error(exc, "cannot size the volume", "size") from None
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def remove(path: str) -> None:
    """The data file gone, durably; a missing one is gone already."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(os.path.dirname(path))
