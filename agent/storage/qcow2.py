"""A qcow2 header read by the agent itself, before any qemu process opens the file.

The bytes of a volume's file are not trusted (an upload, a guest, anyone who can write the
file): a header can name files for qemu to open (a backing file, an external data file),
ask for features the agent does not handle (encryption), or carry enough metadata to make a
qemu tool grow without bound (internal snapshots). qemu opens what a header names as soon as
it opens the image (even `qemu-img info` opens an external data file), so these are decided
here, from the bytes, with the reason of the check that failed (ImageInvalid, data.reason):

    not-qcow2     no qcow2 magic, or a header too short to be one
    unsupported   a version or an incompatible feature qemu would need and we do not allow
    corrupt       marked corrupt by qemu, or a header whose fields cannot be right
    encrypted     AES or LUKS encryption (the agent holds no keys)
    data-file     an external data file: qemu would read the guest's data from another file
    limits        more internal snapshots than MAX_SNAPSHOTS, or more persistent dirty bitmaps
                  (or a larger bitmap directory) than MAX_BITMAPS (MAX_BITMAP_DIRECTORY):
                  metadata qemu's tools load whole

`bitmaps` reads the persistent dirty bitmaps' directory (names, flags, granularity) from the
bytes, within the same bounds, so that what the image says of them is checked against the
agent's metadata without a qemu process opening it (agent/storage/tracking.py).

The layout (docs/interop/qcow2.txt in qemu): a big-endian header, then header extensions
(type, length, data padded to 8 bytes) up to the end of the first cluster.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from agent import errors

MAGIC = b"QFI\xfb"
V2_HEADER = 72
MAX_SNAPSHOTS = 1000  # qemu allows 65,536; a header of that many made `info` grow to 490 MiB
MAX_BACKING_NAME = 1023  # qemu's own bound on a backing file name
MAX_BITMAPS = 256  # qemu allows 65,535; an engine keeps a few checkpoints a disk
MAX_BITMAP_DIRECTORY = 1 << 20  # bytes; qemu allows 64 MiB
MAX_L1_ENTRIES = (32 << 20) // 8  # qemu's QCOW_MAX_L1_SIZE: a 32 MiB table
BITMAPS_CONSISTENT = 1  # autoclear bit 0: the bitmaps extension was kept by a qemu that knows it
IN_USE, AUTO = 1, 2  # a bitmap directory entry's flags

# incompatible_features bits
DIRTY, CORRUPT, DATA_FILE, COMPRESSION_TYPE, EXTENDED_L2 = (1 << i for i in range(5))
KNOWN_INCOMPATIBLE = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2
# header extension types
EXT_END, EXT_BACKING_FORMAT, EXT_FEATURES = 0x00000000, 0xE2792ACA, 0x6803F857
EXT_BITMAPS, EXT_ENCRYPTION, EXT_DATA_FILE = 0x23852875, 0x0537BE77, 0x44415441


@dataclass(frozen=True)
class Header:
    version: int
    cluster_size: int
    virtual_size: int
    backing: str | None  # the backing file name as written (never opened here)
    backing_format: str | None  # the backing format extension, if any
    extended_l2: bool
    dirty: bool
    snapshots: int
    file_size: int
    bitmaps: int = 0  # persistent dirty bitmaps in the directory
    bitmap_directory: tuple[int, int] = (0, 0)  # (offset, size) in the file
    bitmaps_consistent: bool = True  # the autoclear bit qemu clears when it could not keep them
    l1: tuple[int, int] = (0, 0)  # the L1 table's (offset, entries) in the file


@dataclass(frozen=True)
class Bitmap:
    name: str
    in_use: bool  # a writer opened the image and has not stored the bitmap since
    auto: bool  # enabled: qemu records writes into it whenever it writes the image
    granularity: int


def _invalid(reason: str, message: str, volume_id: str | None, **data) -> errors.ImageInvalid:
    return errors.ImageInvalid(message, volumeID=volume_id, reason=reason, **data)


def read(path: str, volume_id: str | None = None) -> Header:
    """The header of the qcow2 at `path`: ImageInvalid (with the reason above) if the agent
    must not hand the file to qemu. Reads at most one cluster (2 MiB) of it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, 4096, 0)
        if len(head) < V2_HEADER or head[:4] != MAGIC:
            raise _invalid("not-qcow2", "the volume's file is not a qcow2 image", volume_id)
        (version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
         l1_offset, _refcount_offset, _refcount_clusters, snapshots,
         _snapshots_offset) = struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
        if version not in (2, 3):
            raise _invalid("unsupported", f"qcow2 version {version} is not supported",
                           volume_id, version=version)
        if not 9 <= cluster_bits <= 21:
            raise _invalid("corrupt", "the qcow2 header's cluster size is impossible",
                           volume_id)
        cluster = 1 << cluster_bits
        incompatible = autoclear = 0
        header_length = V2_HEADER
        if version == 3:
            if len(head) < 104:
                raise _invalid("corrupt", "the qcow2 header is cut short", volume_id)
            incompatible, _compatible, autoclear, _refcount_order, header_length = \
                struct.unpack_from(">QQQII", head, 72)
            if not 104 <= header_length <= cluster:
                raise _invalid("corrupt", "the qcow2 header's length is impossible", volume_id)
        first = os.pread(fd, cluster, 0)
    finally:
        os.close(fd)
    if crypt:
        raise _invalid("encrypted", "the image is encrypted", volume_id)
    if incompatible & CORRUPT:
        raise _invalid("corrupt", "the image is marked corrupt", volume_id)
    if incompatible & DATA_FILE or autoclear & 0x2:
        raise _invalid("data-file", "the image keeps its data in an external data file",
                       volume_id)
    if incompatible & ~KNOWN_INCOMPATIBLE:
        raise _invalid("unsupported", "the image needs a qcow2 feature that is not supported",
                       volume_id, incompatible_features=incompatible)
    if snapshots > MAX_SNAPSHOTS:
        raise _invalid("limits", f"the image holds {snapshots} internal snapshots (at most "
                       f"{MAX_SNAPSHOTS})", volume_id, limit="internal snapshots",
                       found=snapshots, allowed=MAX_SNAPSHOTS)
    backing_format, bitmap_ext = _extensions(first, header_length, cluster, volume_id)
    backing = None
    if backing_offset:
        if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > len(first):
            raise _invalid("corrupt", "the image's backing file name is out of bounds",
                           volume_id)
        backing = first[backing_offset:backing_offset + backing_size].decode(
            "utf-8", errors="replace")
    return Header(version=version, cluster_size=cluster, virtual_size=size, backing=backing,
                  backing_format=backing_format, extended_l2=bool(incompatible & EXTENDED_L2),
                  dirty=bool(incompatible & DIRTY), snapshots=snapshots, file_size=file_size,
                  bitmaps=bitmap_ext[0], bitmap_directory=bitmap_ext[1:],
                  bitmaps_consistent=bool(autoclear & BITMAPS_CONSISTENT),
                  l1=(l1_offset, l1_size))


def maps_nothing(path: str, header: Header) -> bool:
    """Whether the image maps no cluster at all: its L1 table is all zeros, so it has no L2
    table, and no cluster of data or of zeros (a layer that reads as its backing file
    throughout). A table out of the file's bounds, or larger than qemu allows, answers
    no: qemu would refuse the image, and the copy's own path says so."""
    offset, entries = header.l1
    if entries > MAX_L1_ENTRIES or offset + entries * 8 > header.file_size:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone since its check: the copy's own path names it
        return False
    try:
        table = os.pread(fd, entries * 8, offset)
    finally:
        os.close(fd)
    return len(table) == entries * 8 and not table.strip(b"\0")


def _extensions(first: bytes, offset: int, cluster: int, volume_id):
    """Walk the header extensions; the backing format named, if any, and the bitmaps
    extension's (count, directory offset, directory size)."""
    backing_format, bitmaps = None, (0, 0, 0)
    end = min(len(first), cluster)
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", first, offset)
        offset += 8
        if kind == EXT_END:
            return backing_format, bitmaps
        if offset + length > end:
            raise _invalid("corrupt", "a qcow2 header extension runs past the header",
                           volume_id)
        data = first[offset:offset + length]
        if kind == EXT_DATA_FILE:
            raise _invalid("data-file", "the image names an external data file", volume_id)
        if kind == EXT_ENCRYPTION:
            raise _invalid("encrypted", "the image is encrypted", volume_id)
        if kind == EXT_BACKING_FORMAT:
            backing_format = data.decode("ascii", errors="replace")
        if kind == EXT_BITMAPS:
            bitmaps = _bitmaps_extension(data, volume_id)
        offset += (length + 7) & ~7
    return backing_format, bitmaps


def _bitmaps_extension(data: bytes, volume_id) -> tuple[int, int, int]:
    if len(data) < 24:
        raise _invalid("corrupt", "the qcow2 bitmaps extension is cut short", volume_id)
    count, _reserved, size, offset = struct.unpack_from(">IIQQ", data)
    if count > MAX_BITMAPS or size > MAX_BITMAP_DIRECTORY:
        raise _invalid("limits", f"the image holds {count} dirty bitmaps in a directory of "
                       f"{size} bytes (at most {MAX_BITMAPS} in {MAX_BITMAP_DIRECTORY})",
                       volume_id, limit="bitmaps", found=count, allowed=MAX_BITMAPS)
    return count, offset, size


def bitmaps(path: str, header: Header, volume_id: str | None = None) -> list[Bitmap]:
    """The image's persistent dirty bitmaps as its directory lists them (read from the
    bytes, bounded by the header's checks): ImageInvalid reason corrupt if the directory
    does not parse."""
    if not header.bitmaps:
        return []
    offset, size = header.bitmap_directory
    if offset % 8 or offset + size > header.file_size:
        raise _invalid("corrupt", "the image's bitmap directory is out of bounds", volume_id)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    out, at = [], 0
    for _ in range(header.bitmaps):
        if at + 24 > len(data):
            raise _invalid("corrupt", "the image's bitmap directory is cut short", volume_id)
        (_table, _table_size, flags, _kind, granularity_bits, name_size,
         extra) = struct.unpack_from(">QIIBBHI", data, at)
        name_at = at + 24 + extra
        if name_at + name_size > len(data) or not 9 <= granularity_bits <= 31:
            raise _invalid("corrupt", "a bitmap directory entry is impossible", volume_id)
        name = data[name_at:name_at + name_size].decode("utf-8", errors="replace")
        out.append(Bitmap(name=name, in_use=bool(flags & IN_USE), auto=bool(flags & AUTO),
                          granularity=1 << granularity_bits))
        at = (name_at + name_size + 7) & ~7
    return out
