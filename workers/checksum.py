"""Checksums of volume data files, sparse-aware, for scrubs and for copy completion.

The checksum is the SHA-256 of the file's bytes, 0 to its end, written as "sha256:<hex>".
Data extents are found with SEEK_DATA / SEEK_HOLE and read; holes are hashed as the zeros
they read as, without reading them, so a mostly empty 1 TiB volume costs CPU, not I/O.
`on_chunk(offset, read)` is called after every piece (``read``: bytes actually read from
storage, 0 for a hole): the caller throttles, heartbeats and stops from there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time

from agent.errors import OperationFailed

MiB = 1 << 20
PREFIX = "sha256:"
CHUNK = 4 * MiB
_ZEROS = memoryview(bytes(CHUNK))


def _extents(fd: int, size: int):
    """(start, end, is_data) pieces covering [0, size), in order."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                data = size
            elif e.errno == errno.EINVAL:  # no SEEK_DATA on this file system: all data
                yield offset, size, True
                return
            else:
                raise
        data = min(data, size)
        if data > offset:
            yield offset, data, False
        if data >= size:
            return
        end = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, end, True
        offset = end


def sparse_sha256(fd: int, on_chunk=None, chunk: int = CHUNK) -> str:
    """"sha256:<hex>" of the whole file open at ``fd``, reading only its data extents."""
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    for start, end, is_data in _extents(fd, size):
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            if is_data:
                got = os.preadv(fd, [view[:n]], pos)
                if got <= 0:  # truncated under us: what is not there hashes as nothing
                    return _done(digest)
                digest.update(view[:got])
            else:
                got = min(n, len(_ZEROS))
                digest.update(_ZEROS[:got])
            pos += got
            if on_chunk is not None:
                on_chunk(pos, got if is_data else 0)
    return _done(digest)


def _done(digest) -> str:
    return PREFIX + digest.hexdigest()


def file_sha256(path: str, on_chunk=None) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return sparse_sha256(fd, on_chunk)
    finally:
        os.close(fd)


def checksum_in_worker(ctx, path: str, rate: int = 0) -> str:
    """file_sha256 from a worker: heartbeats, stops when asked (runtime.Stopped), and reads no
    faster than ``rate`` bytes a second (0: unlimited)."""
    began, read = time.monotonic(), 0

    def on_chunk(offset: int, n: int) -> None:
        nonlocal read
        read += n
        ctx.check()
        if rate and (ahead := read / rate - (time.monotonic() - began)) > 0:
            ctx.wait(ahead)

    try:
        return file_sha256(path, on_chunk)
    except OSError as e:
        raise OperationFailed(f"reading {os.path.basename(path)} back failed: {e.strerror or e}",
                              errno=errno.errorcode.get(e.errno, str(e.errno))) from e
