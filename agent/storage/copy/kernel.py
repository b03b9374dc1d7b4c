"""The data mover of a volume copy: bytes only, no metadata.

copy_range() walks the source by data extents (SEEK_DATA / SEEK_HOLE) so holes stay holes in
the destination, moves each extent inside the kernel with copy_file_range(), and reports
through callbacks: progress() after every chunk, checkpoint() every so many bytes or seconds.
The caller turns those into metadata writes (a generation-fenced copy marker) and decides what
a stop or a superseded checkpoint means.

The one ordering rule: fdatasync() the destination BEFORE checkpoint(offset), so a marker never
claims bytes a power cut could take back. After a failed fdatasync (EIO) the kernel may already
have dropped the dirty pages, so nothing after the last good checkpoint can be trusted; the
error ends the copy and a retry resumes from that checkpoint, rewriting everything after it.

Page-cache advice (_Cache): each chunk written is handed to writeback at once
(POSIX_FADV_DONTNEED on dirty pages starts their writeback and drops nothing), so the device
writes while the next chunk is read and a checkpoint's fdatasync finds little left to do; the
source's pages are dropped once copied unless they were cached before, so a cold source does
not grow the page cache by its whole size. The destination's pages are kept until a
checkpoint has made them clean and the copy's checksum (agent/storage/copy/readback.py,
which reads them right behind the copy: `hashed()`) has read them, and are then dropped:
a copy holds about a checkpoint's worth of the page cache, not its whole size, and the next
chunks reuse the pages just let go. Fresh pages cost far more on a VM whose free memory goes
back to its host (free page reporting): a 2 GiB copy took 1.0 s or 2-3 s by how many of its
pages the host had taken back, 1.1 s every time with them dropped. Measured in
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

from agent.errors import (
    GenerationMismatch,
    InvalidParams,
    NoSpace,
    OperationFailed,
    VolumeTruncated,
)

MiB = 1 << 20

# I/O fault seam, for tests only. When set to a callable it is called as _fault(kind, offset)
# before every copy call ('copy') and every fdatasync ('fsync'); raising OSError(ENOSPC), EIO
# and so on from it exercises the error paths without a full or broken disk. None in production.
# Copies that write a raw file themselves (agent/storage/copy/sink.py) go through it too.
_fault = None

# The kernel or file system cannot do this kind of copy (across file systems, old kernels,
# special files): use the next simpler method from then on.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}

# The last resort copies through user space; no need for 64 MiB buffers there.
_PREAD_MAX = 4 * MiB


class CopyStopped(Exception):
    """should_stop() asked to stop; everything below ``offset`` is durable and checkpointed.

    Control flow, not an agent error: the caller decides whether it means aborted or paused.
    """

    def __init__(self, offset: int):
        super().__init__(f"copy stopped at offset {offset}")
        self.offset = offset


def fault_point(kind: str, offset: int) -> None:
    """The fault seam (`_fault`), where a write ('copy') or an fdatasync ('fsync') is due."""
    if _fault is not None:
        _fault(kind, offset)


@contextlib.contextmanager
def os_errors(offset: int):
    """Turn an OSError of our own I/O into an agent error that says where it happened."""
    try:
        yield
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left writing the destination at offset {offset}",
                          errno=name, offset=offset) from e
        raise OperationFailed(f"copy failed at offset {offset}: {e.strerror or e}",
                              errno=name, offset=offset) from e


class _Mover:
    """Copies one piece at a time, stepping down to a simpler method when the kernel refuses."""

    def __init__(self, src_fd: int, dst_fd: int):
        self.src, self.dst = src_fd, dst_fd
        self.method = "copy_file_range"

    def copy(self, pos: int, n: int) -> int:
        fault_point("copy", pos)
        if self.method == "copy_file_range":
            try:
                return os.copy_file_range(self.src, self.dst, n, pos, pos)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.method = "sendfile"
        if self.method == "sendfile":
            try:
                # sendfile() writes at the destination's file position, not at an offset.
                os.lseek(self.dst, pos, os.SEEK_SET)
                return os.sendfile(self.dst, self.src, pos, n)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.method = "pread"
        data = memoryview(os.pread(self.src, min(n, _PREAD_MAX), pos))
        done = 0
        while done < len(data):
            done += os.pwrite(self.dst, data[done:], pos + done)
        return done


def next_extent(fd: int, offset: int, size: int) -> tuple[int, int]:
    """The next data extent at or after ``offset``, clipped to ``size``; (size, size) if none."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after offset: the rest is a hole
            return size, size
        if e.errno == errno.EINVAL:  # no SEEK_DATA here: treat everything as data
            return offset, size
        raise
    if data >= size:
        return size, size
    # Never fails after a successful SEEK_DATA: end of file counts as a hole.
    return data, min(os.lseek(fd, data, os.SEEK_HOLE), size)


def _durable(dst_fd: int, offset: int) -> None:
    with os_errors(offset):
        fault_point("fsync", offset)
        os.fdatasync(dst_fd)


class _Cache:
    """Page-cache advice for one copy (see the module's docstring). Advice only: its errors
    are ignored."""

    def __init__(self, src_fd: int, dst_fd: int, start: int):
        self.src, self.dst = src_fd, dst_fd
        self._probe = bytearray(4096)
        self._kept = start  # the destination's pages from here on may still be cached

    @staticmethod
    def _advise(fd: int, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def cached(self, offset: int) -> bool:
        """Whether the source's page at offset is in the page cache (read without waiting)."""
        try:
            return os.preadv(self.src, [self._probe], offset, os.RWF_NOWAIT) > 0
        except OSError:  # EAGAIN: not cached; anything else: cannot tell, treat as not
            return False

    def copied(self, offset: int, n: int, src_was_cached: bool) -> None:
        self._advise(self.dst, offset, n)  # dirty: starts its writeback, drops nothing
        if not src_was_cached:
            self._advise(self.src, offset, n)

    def settled(self, end: int) -> None:
        """The destination below `end` is durable (clean) and hashed: its pages dropped."""
        if end > self._kept:
            self._advise(self.dst, self._kept, end - self._kept)
            self._kept = end


def _checkpoint(checkpoint, offset: int) -> None:
    if not checkpoint(offset):
        raise GenerationMismatch("copy superseded by a newer generation", offset=offset)


def copy_range(src_fd: int, dst_fd: int, start: int, size: int, *, checkpoint, progress,
               should_stop, chunk: int = 16 * MiB, checkpoint_bytes: int = 256 * MiB,
               checkpoint_seconds: float = 1.0, clock=time.monotonic, hashed=None) -> int:
    """Copy source bytes [start, size) to the same offsets of the destination.

    The destination must already be ``size`` long (ftruncate: sparse), since holes are skipped
    rather than written. ``checkpoint(offset) -> bool`` is called after fdatasync with every
    byte below offset durable; False means superseded: GenerationMismatch, nothing more is
    written. ``should_stop()`` is polled between chunks: CopyStopped(offset) after a last
    checkpoint. ``hashed()``: how much of the destination the checksum has read back (None:
    no checksum), so that no page is dropped before it is read (_Cache). Returns ``size``
    once everything is durable; completing is the caller's job.
    Raises NoSpace on ENOSPC/EDQUOT, OperationFailed on any other I/O error.
    """
    if not (isinstance(start, int) and isinstance(size, int) and 0 <= start <= size):
        raise InvalidParams("need 0 <= start <= size", field="start")
    if chunk <= 0 or checkpoint_bytes <= 0:
        raise InvalidParams("chunk and checkpoint_bytes must be positive", field="chunk")
    mover = _Mover(src_fd, dst_fd)
    cache = _Cache(src_fd, dst_fd, start)
    offset, saved_offset, saved_at, moved = start, start, clock(), 0
    while offset < size:
        with os_errors(offset):
            offset, extent_end = next_extent(src_fd, offset, size)
        while offset < extent_end:
            if should_stop():
                _durable(dst_fd, offset)
                _checkpoint(checkpoint, offset)
                raise CopyStopped(offset)
            was_cached = cache.cached(offset)
            with os_errors(offset):
                n = mover.copy(offset, min(chunk, extent_end - offset))
            if n <= 0:
                # End of file before the size is a short source, never a hole.
                raise VolumeTruncated(f"the source's data ends at offset {offset}, before "
                                      f"its size of {size}", offset=offset, size=size)
            cache.copied(offset, n, was_cached)
            offset, moved = offset + n, moved + n
            progress(offset, moved)
            due = clock() - saved_at >= checkpoint_seconds
            if offset - saved_offset >= checkpoint_bytes or due:
                _durable(dst_fd, offset)
                _checkpoint(checkpoint, offset)
                cache.settled(offset if hashed is None else min(offset, hashed()))
                saved_offset, saved_at = offset, clock()
    _durable(dst_fd, offset)
    return offset
