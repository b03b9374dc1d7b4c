"""The cow format: a volume's data is a qcow2 (compat 1.1), made by qemu-img.

A snapshot's qcow2 names its parent's file as its backing file, relative to the image
directory, with the parent's format recorded; the chain qemu opens is still the metadata's
(agent/storage/chain.py).
"""

from __future__ import annotations

import os

from agent.storage import chain, qemu_img
from agent.storage.formats import raw
from agent.storage.layout import SUFFIXES
from agent.system import fsync_dir, fsync_path

NAME = "cow"
SUFFIX = SUFFIXES[NAME]


def create(path: str, size: int, preallocation: str = "sparse", parent: dict | None = None,
           cluster_size: int | None = None, extended_l2: bool = False,
           beat=lambda: None) -> None:
    """A qcow2 of virtual size `size`, durable on return; `parent` is the parent's row."""
    backing = chain.file_name(parent) if parent is not None else None
    qemu_img.create(path, NAME, size, backing=backing,
                    backing_fmt=parent["format"] if parent else None,
                    preallocation=preallocation, cluster_size=cluster_size,
                    extended_l2=extended_l2, beat=beat)
    fsync_path(path)
    fsync_dir(os.path.dirname(path))


remove = raw.remove
