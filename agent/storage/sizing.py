"""A volume's size: growing its data file (Volume.extend, and a merge's base grown to its
top's size), measuring what its chain needs in a format (Volume.measure), and bounding
what a sparse copy of it can hold from what its checks found (a copy's room check).

A grow writes the data file first and the caller records the new size after, so a crash in
between leaves the file larger than the row says: the metadata is the truth, and the next
grow (under the same lease) starts by cutting the file back to the row's size. What lies
past the row's end is never shown to a guest: a raw file is truncated to the row's size
before it is extended (its new end reads as zeros whatever an earlier life left there), and
a qcow2 whose header says more than the row is shrunk back first.
"""

from __future__ import annotations

import os

from agent import errors
from agent.storage import chain, qcow2, qemu_img
from agent.storage.copy.kernel import next_extent
from agent.system import fsync_path, while_beating


def preallocation_of(path: str, row: dict) -> str:
    """How the volume was made, as recorded; else (a copy's, an older one) a raw volume
    whose every byte is allocated is preallocated, and the rest sparse."""
    if row.get("preallocation"):
        return row["preallocation"]
    if row["format"] != "raw":
        return "sparse"
    st = os.stat(path)
    return "preallocated" if row["size"] and st.st_blocks * 512 >= row["size"] else "sparse"


def grow(layout, row: dict, size: int, preallocation: str | None = None,
         beat=lambda: None) -> None:
    """The data file of volume ``row`` made ``size`` bytes of virtual size, durable; the
    range past the row's size reads as zeros. ``preallocation`` None: as the volume is."""
    path = layout.data_path(row)
    how = preallocation or preallocation_of(path, row)
    if row["format"] == "raw":
        _grow_raw(path, row["size"], size, how, beat)
        return
    opts = chain.image_opts(layout, [row], direct=False, layer_only=True)
    found = qcow2.read(path, row["volume_id"]).virtual_size
    if found != size:
        if found > row["size"]:  # an earlier grow that was not recorded: back to the row's
            qemu_img.resize(opts, row["size"], path, shrink=True, beat=beat)
        elif found < row["size"]:
            raise errors.ImageInvalid("the image's virtual size is not the volume's",
                                      volumeID=row["volume_id"], reason="size", found=found,
                                      expected=row["size"])
        if size != row["size"]:
            qemu_img.resize(opts, size, path, preallocation=how, beat=beat)
    fsync_path(path)


def grown_unrecorded(layout, row: dict) -> bool:
    """Whether a cow volume's header says more than its row: a grow a crash cut short."""
    if row["format"] != "cow":
        return False
    return qcow2.read(layout.data_path(row), row["volume_id"]).virtual_size > row["size"]


def _grow_raw(path: str, old: int, size: int, how: str, beat) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, old)  # what lies past the volume's end is not the guest's
        os.ftruncate(fd, size)
        if how == "preallocated" and size > old:
            while_beating(beat, os.posix_fallocate, fd, old, size - old)
        os.fsync(fd)
    except OSError as exc:
        raise errors.from_os_error(exc, "cannot grow the volume", "size") from None
    finally:
        os.close(fd)


def measure(layout, rows: list[dict], fmt: str, beat=lambda: None) -> dict:
    """What a copy of the chain's guest view (rows, base first) needs in format ``fmt``, by
    `qemu-img measure` of the chain as the metadata says it is (checked first, as every
    opener of a chain does): {required, fully_allocated} in bytes."""
    chain.inspect(layout, rows, beat)
    found = qemu_img.measure(fmt, chain.image_opts(layout, rows, direct=False), beat)
    return {"required": found.get("required", 0),
            "fully_allocated": found.get("fully-allocated", 0)}


SLACK = 1 << 20  # a bound's margin: file system blocks, a header, a bitmap directory
RAW_EXTENTS_MAX = 4096  # data extents of a raw layer counted before measure is left to say
CLUSTER = 65536  # qemu's cluster size for a qcow2 it makes (a raw source's qcow2 copy)


def data_bound(layout, row: dict, header, check: dict | None, grain: int = 1) -> int | None:
    """At most how many bytes a copy's destination allocates for the guest data a layer
    holds itself, in whole `grain`s (a qcow2 destination's clusters: a write anywhere in one
    allocates it; 1 for raw), from what is already known of the layer: a qcow2's allocated
    clusters as its qemu-img check counted them (compressed ones at their full size), each
    inside one grain or covering whole ones (both powers of two); a raw file's data extents
    as qemu finds them (SEEK_DATA: never its allocated blocks, which a compressing file
    system counts compressed), each widened to whole grains. None if the check does not
    say, or the raw file has more than RAW_EXTENTS_MAX extents."""
    if row["format"] == "raw":
        return _raw_data(layout.data_path(row), row["size"], grain)
    if header is None or not check or "total-clusters" not in check:
        return None  # (qemu leaves allocated-clusters out when there are none)
    return check.get("allocated-clusters", 0) * max(header.cluster_size, grain)


def holds_nothing(layout, rows: list[dict], headers: dict, checks: dict) -> bool:
    """Whether the chain's guest view is all zeros by what its checks found (chain.inspect's
    `headers` and `checks`, by volume ID): no qcow2 layer with a cluster of data, compressed
    or zero-allocated, and no data extent in a raw base. Unknown is not empty."""
    for row in rows:
        if row["format"] == "raw":
            try:  # (a file gone since its check: the copy's own checks say so, by name)
                fd = os.open(layout.data_path(row), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                if next_extent(fd, 0, row["size"])[0] < row["size"]:
                    return False
            finally:
                os.close(fd)
        elif data_bound(layout, row, headers.get(row["volume_id"]),
                        checks.get(row["volume_id"])) != 0:
            return False
    return True


def sparse_bound(data: int, size: int, fmt: str, cluster: int = CLUSTER) -> int:
    """At most what a sparse destination of `size` bytes takes on storage, its data
    allocating `data` bytes (data_bound's, in its clusters): raw, the data; qcow2 (`cluster`
    bytes a cluster), its tables too, each at its worst: an L2 table of 16-byte entries for
    every data cluster, an L1 covering the whole size, 64-bit refcounts for every cluster of
    the file. Never less than what qemu writes; used to skip `qemu-img measure`, whose walk
    over a huge disk's tables costs per byte of its virtual size, when the room is plainly
    there."""
    if fmt == "raw":
        return data + SLACK
    c = max(cluster, 512)
    clusters = -(-data // c)
    tables = -(-size // (c * (c // 16)))  # L2 tables that cover the whole disk
    l1 = -(-tables * 8 // c) * c
    host = clusters * c + min(clusters, tables) * c + l1 + 4 * c  # + header, reftable, slack
    refblocks = -(-(host // c) * 8 // c) + 1
    return host + (refblocks + -(-refblocks * 8 // c)) * c + SLACK


def _raw_data(path: str, size: int, grain: int) -> int | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held, offset = 0, 0
        for _ in range(RAW_EXTENTS_MAX):
            start, end = next_extent(fd, offset, size)
            if start >= size:
                return held
            held += -(-end // grain) * grain - start // grain * grain
            offset = end
        return None
    finally:
        os.close(fd)
