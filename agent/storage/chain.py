"""An image's chain as the metadata says it is, checked against the images' own bytes and
described to qemu explicitly.

The chain (base first) comes from the volumes' parent links, never from a header: qemu is
given every layer's file and driver (`--image-opts` with nested `backing.` keys), so nothing
a guest or a stranger wrote into a header decides what qemu opens. Every opener of a chain
(a copy's source, a resumed destination, a snapshot's parent, a scrub, every verb to come)
first calls `inspect`, which reads each qcow2's header itself (agent/storage/qcow2.py: no
qemu process has opened the file yet) and refuses, with the reason of the check that failed:
a backing file outside the image (backing-outside) or not the parent's (chain), a size that
is not the volume's (size), and what qcow2.py refuses (data-file, encrypted, limits, ...).
With `structure`, each qcow2 is then checked by `qemu-img check` (its backing not opened):
an image qemu finds damaged, clusters past its end included, is refused (corrupt), and a raw
base shorter than its size is VolumeTruncated: neither may ever be copied into a LEGAL volume.
"""

from __future__ import annotations

import concurrent.futures
import os

from agent import errors
from agent.storage import qcow2, qemu_img
from agent.storage.layout import SUFFIXES

SECTOR = 512  # qemu sizes images in sectors
CHECKERS = 4  # qemu-img checks of a chain's layers at once


def file_name(row: dict) -> str:
    """A volume's data file name inside its image directory (a child's backing file)."""
    return row["volume_id"] + SUFFIXES[row["format"]]


def _outside(name: str) -> bool:
    """Whether a backing name leaves the image's directory (a path, a protocol, a json:)."""
    return os.path.basename(name) != name or name in ("", ".", "..") or ":" in name


def inspect(layout, rows: list[dict], beat=lambda: None, structure: bool = False,
            checks: dict | None = None) -> dict:
    """ImageInvalid (or VolumeTruncated) unless every layer of the chain (base first) is what
    the metadata says and safe to hand to qemu; see the module's docstring. Returns each
    qcow2 layer's header by volume ID. With `structure`, each qcow2 layer's qemu-img check
    report goes into `checks` (by volume ID), if given: what it found allocated bounds the
    data a copy of it can write (workers/ops/copying/qemu.py, check_room)."""
    headers = {}
    for i, row in enumerate(rows):
        vid = row["volume_id"]
        path = layout.data_path(row)
        if row["format"] != "cow":
            if i:
                raise errors.ImageInvalid("a raw volume can only be a chain's base",
                                          volumeID=vid, reason="chain")
            if structure and os.stat(path).st_size < row["size"]:
                raise errors.VolumeTruncated("the base's data file is shorter than its size",
                                             volumeID=vid, size=row["size"],
                                             data_bytes=os.stat(path).st_size)
            continue
        head = headers[vid] = qcow2.read(path, vid)
        want = file_name(rows[i - 1]) if i else None
        named = head.backing
        if named is not None and named != want:
            outside = _outside(named)
            raise errors.ImageInvalid(
                "the image's backing file is outside its image directory" if outside else
                "the image's backing file is not its parent's", volumeID=vid,
                reason="backing-outside" if outside else "chain", expected=want,
                **({} if outside else {"backing": named}))
        if named is None and want is not None:
            raise errors.ImageInvalid("the image names no backing file, but has a parent",
                                      volumeID=vid, reason="chain", expected=want)
        if want is not None and head.backing_format not in (
                None, qemu_img.driver(rows[i - 1]["format"])):
            raise errors.ImageInvalid("the image's backing format is not its parent's",
                                      volumeID=vid, reason="chain")
        if head.virtual_size != row["size"]:
            raise errors.ImageInvalid("the image's virtual size is not the volume's",
                                      volumeID=vid, reason="size",
                                      found=head.virtual_size, expected=row["size"])
    if structure:
        found = _check_layers(layout, [row for row in rows if row["format"] == "cow"], beat)
        if checks is not None:
            checks.update(found)
    return headers


def _check_layers(layout, rows: list[dict], beat) -> dict:
    """qemu-img check of each layer, CHECKERS at a time (each a process of its own: most
    of its time is qemu-img's start, so a chain's checks overlap); the first error, base
    first, is the one raised. The caller's heartbeat is called from here only (a worker's
    is not thread-safe). Returns each layer's report by volume ID."""
    def check(row, beat=lambda: None):
        return qemu_img.check(image_opts(layout, [row], direct=False, layer_only=True),
                              layout.data_path(row), beat=beat)
    if len(rows) < 2:
        return {row["volume_id"]: check(row, beat) for row in rows}
    with concurrent.futures.ThreadPoolExecutor(min(CHECKERS, len(rows))) as pool:
        futures = [pool.submit(check, row) for row in rows]
        while concurrent.futures.wait(futures, timeout=0.25).not_done:
            beat()
    return {row["volume_id"]: future.result() for row, future in zip(rows, futures)}


def require_legal(rows: list[dict]) -> None:
    """VolumeIllegal unless every layer of the chain is LEGAL: a layer being written (a
    copy's or a transfer's destination, a merge's base or top) is nobody's to read."""
    for row in rows:
        if row["legality"] != "LEGAL":
            raise errors.VolumeIllegal("a volume of the chain is not LEGAL (a copy, a transfer "
                                       "or a merge is writing it)", volumeID=row["volume_id"])


def image_opts(layout, rows: list[dict], *, direct: bool, layer_only: bool = False,
               share: bool = False, overlay: str | None = None) -> str:
    """qemu's --image-opts for the chain's top (rows[-1]), every backing layer spelled out.
    ``layer_only``: the top without its backing (reads of its unallocated parts: zeros).
    ``share``: the backing layers opened without taking qemu's image locks, for a merge,
    whose commit writes into a backing layer that this reader reads only where the commit
    never writes (agent/storage/merges.py). ``overlay``: a private qcow2 on top of the chain
    (a backup's export: it holds the bitmap served, never data)."""
    keys: dict[str, str] = {}
    chain = rows[-1:] if layer_only else rows
    prefix = ""
    if overlay is not None:
        keys.update({"driver": "qcow2", "file.driver": "file", "file.filename": overlay})
        prefix = "backing."
    for i, row in enumerate(reversed(chain)):
        path = layout.data_path(row)
        keys[prefix + "driver"] = qemu_img.driver(row["format"])
        keys[prefix + "file.driver"] = "file"
        keys[prefix + "file.filename"] = path
        # Threads, as qemu-img's own -t none: with aio=native a qcow2 destination's
        # allocating writes went one at a time (the kernel's AIO waits in io_submit for them)
        # and a copy to qcow2 ran 30 % slower, and each qemu-nbd took 30-40 ms to exit
        # (io_destroy), measured side by side (docs/performance.md).
        keys[prefix + "file.aio"] = "threads"
        keys[prefix + "cache.direct"] = "on" if direct else "off"
        if share and prefix:
            keys[prefix + "force-share"] = "on"
        if row["format"] == "cow" and (layer_only or i == len(chain) - 1):
            keys[prefix + "backing"] = ""  # null: no backing opened (a base, or a lone layer)
        prefix += "backing."
    return ",".join(f"{k}={qemu_img.escape(v)}" for k, v in keys.items())


def reclaim_leaks(layout, row: dict, beat, pause, on_wait=lambda: None) -> None:
    """What a killed writer left in one qcow2 layer (its header already inspected): checked
    by `qemu-img check -r leaks` (its backing not opened), damage refused, leaked clusters
    reclaimed; the lock the writer's qemu-nbd may still hold waited out first
    (qemu_img.lock_waited: `pause`, `on_wait`)."""
    opts = image_opts(layout, [row], direct=False, layer_only=True)
    qemu_img.lock_waited(lambda: qemu_img.check(opts, layout.data_path(row),
                                                repair_leaks=True, beat=beat),
                         pause, on_wait=on_wait)
