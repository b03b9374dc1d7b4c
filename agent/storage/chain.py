"""An image's chain as the metadata says it is, checked against the images' headers and
described to qemu explicitly.

The chain (base first) comes from the volumes' parent links, never from a header: qemu is
given every layer's file and driver (`--image-opts` with nested `backing.` keys), so nothing
a guest or a stranger wrote into a header decides what qemu opens. Headers are still read
(qemu-img info, which does not open backing files) and must agree: a qcow2 whose backing
file names anything but its parent's file in its own image directory is refused
(ImageInvalid, reason backing-outside) and never opened.
"""

from __future__ import annotations

import os

from agent import errors
from agent.storage import qemu_img
from agent.storage.layout import SUFFIXES


def file_name(row: dict) -> str:
    """A volume's data file name inside its image directory (a child's backing file)."""
    return row["volume_id"] + SUFFIXES[row["format"]]


def check_headers(layout, rows: list[dict], beat=lambda: None) -> None:
    """ImageInvalid unless every qcow2 of the chain names exactly its parent (or nothing,
    for a base) as its backing file, with its parent's format."""
    for i, row in enumerate(rows):
        if row["format"] != "cow":
            if i:
                raise errors.ImageInvalid("a raw volume can only be a chain's base",
                                          volumeID=row["volume_id"], reason="chain")
            continue
        path = layout.data_path(row)
        head = qemu_img.info(path, "cow", beat)
        if head.get("format-specific", {}).get("data", {}).get("corrupt"):
            raise errors.ImageInvalid("the image is marked corrupt", volumeID=row["volume_id"],
                                      reason="corrupt")
        named = head.get("backing-filename")
        want = file_name(rows[i - 1]) if i else None
        if named is not None and (os.path.basename(named) != named or named != want):
            raise errors.ImageInvalid(
                "the image's backing file is not its parent in its own image directory",
                volumeID=row["volume_id"], reason="backing-outside", backing=named[:512],
                expected=want)
        if named != want:
            raise errors.ImageInvalid("the image's backing file is not its parent's",
                                      volumeID=row["volume_id"], reason="chain",
                                      backing=named, expected=want)
        if want is not None and head.get("backing-filename-format") not in (
                None, qemu_img.driver(rows[i - 1]["format"])):
            raise errors.ImageInvalid("the image's backing format is not its parent's",
                                      volumeID=row["volume_id"], reason="chain")
        if head.get("virtual-size") != row["size"]:
            raise errors.ImageInvalid("the image's virtual size is not the volume's",
                                      volumeID=row["volume_id"], reason="size",
                                      found=head.get("virtual-size"), expected=row["size"])


def image_opts(layout, rows: list[dict], *, direct: bool, layer_only: bool = False) -> str:
    """qemu's --image-opts for the chain's top (rows[-1]), every backing layer spelled out.
    ``layer_only``: the top without its backing (reads of its unallocated parts: zeros)."""
    keys: dict[str, str] = {}
    chain = rows[-1:] if layer_only else rows
    prefix = ""
    for i, row in enumerate(reversed(chain)):
        path = layout.data_path(row)
        keys[prefix + "driver"] = qemu_img.driver(row["format"])
        keys[prefix + "file.driver"] = "file"
        keys[prefix + "file.filename"] = path
        keys[prefix + "file.aio"] = "native" if direct else "threads"
        keys[prefix + "cache.direct"] = "on" if direct else "off"
        if row["format"] == "cow" and (layer_only or i == len(chain) - 1):
            keys[prefix + "backing"] = ""  # null: no backing opened (a base, or a lone layer)
        prefix += "backing."
    return ",".join(f"{k}={qemu_img.escape(v)}" for k, v in keys.items())
