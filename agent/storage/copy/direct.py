"""A raw volume copied around the page cache (O_DIRECT), for a source that is not cached:
the mover that agent/storage/copy/kernel.py's copy_range drives in place of copy_file_range
(workers/ops/image.py chooses).

Each piece of a data extent is read straight into one of a few page-aligned buffers, written
from it by a writer thread while the next piece is read, and hashed from it on the checksum's
thread (checksum.StreamFollower, fed holes as zeros), the way `dd iflag=direct oflag=direct`
and `qemu-img convert -t none -T none` move data. Through the page cache, a cold source's
bytes were copied twice more (into the cache, from the source's pages to the destination's)
and read back once to be hashed, and every page was a fresh one: on a VM that returns its
free memory to the host, a 2 GiB copy ran at half of dd's speed when the host had taken
those pages back (docs/performance.md). A cached source still goes through copy_file_range,
which is faster when nothing is read from the disk.

The checksum is of the bytes handed to write(), from the buffer they were written from, where
the page-cache path reads the destination's pages back: the same bytes, as the lease keeps
every other writer out. A piece that is not aligned (a file's last, shorter block) is read and
written through the page cache; a file system that refuses O_DIRECT on a piece (EINVAL) gets
the page cache from then on. Buffers are reused only once written and hashed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import mmap
import os
import threading

from agent.errors import OperationFailed
from agent.storage.checksum import StreamFollower
from agent.storage.copy.kernel import cached, fault_point, next_extent, os_errors

ALIGN = 4096   # what O_DIRECT asks of offsets, lengths and buffers here
BUFFERS = 3    # one being read, one being written, one being hashed


def chosen(src_path: str, dst_path: str, src_fd: int, dst_fd: int, start: int, size: int,
           record: bool, chunk: int):
    """(a DirectMover, its checksum's StreamFollower or None), for a copy whose source is
    not cached where it begins; (None, None) for one that goes through the page cache: a
    cached source, a file system without O_DIRECT, or a resumed copy with a checksum (its
    prefix is read back from the destination: copy/readback.py)."""
    if start and record:
        return None, None
    first, _ = next_extent(src_fd, start, size)
    if first >= size or cached(src_fd, first):
        return None, None
    src_direct = _open_direct(src_path, os.O_RDONLY)
    dst_direct = None if src_direct is None else _open_direct(dst_path, os.O_WRONLY)
    if dst_direct is None:
        if src_direct is not None:
            os.close(src_direct)
        return None, None
    hasher = StreamFollower(size) if record else None
    return DirectMover(src_fd, dst_fd, src_direct, dst_direct, hasher, chunk), hasher


def _open_direct(path: str, flags: int) -> int | None:
    """`path` opened with O_DIRECT, or None where the file system refuses it (tmpfs)."""
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class DirectMover:
    """Moves one piece at a time (see the module's docstring): copy(pos, n) -> bytes read
    (0 at the source's end), hole(pos, n) for a range the copy skips, drain() before a
    flush. `src_direct` and `dst_direct`: O_DIRECT descriptors of the two files, closed by
    close() (`src_fd` and `dst_fd` are the caller's); `hasher`: data(view, done) and
    zeros(n), or None."""

    page_cache = False

    def __init__(self, src_fd: int, dst_fd: int, src_direct: int, dst_direct: int,
                 hasher, chunk: int):
        self.src, self.dst = src_fd, dst_fd
        self.fds = (src_direct, dst_direct)
        self.direct = self.fds  # None once refused
        self.hasher = hasher
        self.free = collections.deque(mmap.mmap(-1, chunk) for _ in range(BUFFERS))
        self.busy: collections.deque = collections.deque()  # (buffer, write, hashed), in order
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "direct-writer")

    def copy(self, pos: int, n: int) -> int:
        buf = self._buffer()
        view = memoryview(buf)[:min(n, len(buf))]
        aligned = self.direct is not None and not (pos % ALIGN or len(view) % ALIGN)
        try:
            got = os.preadv(self.direct[0] if aligned else self.src, [view], pos)
        except OSError as exc:
            if not aligned or exc.errno != errno.EINVAL:
                self.free.append(buf)
                raise
            self.direct = None
            got = os.preadv(self.src, [view], pos)
        if got <= 0:
            self.free.append(buf)
            return got
        view = view[:got]
        hashed = threading.Event()
        write = self.pool.submit(self._write, view, pos, aligned and got % ALIGN == 0)
        if self.hasher is None:
            hashed.set()
        else:
            self.hasher.data(view, done=hashed.set)
        self.busy.append((buf, write, hashed))
        return got

    def hole(self, pos: int, n: int) -> None:
        if self.hasher is not None and n:
            self.hasher.zeros(n)

    def _write(self, view: memoryview, pos: int, aligned: bool) -> None:
        """On the writer thread; what it raises is raised by the next _buffer() or drain()
        in the copy's own thread, as the agent's error (os_errors)."""
        with os_errors(pos):
            fault_point("copy", pos)
            direct = self.direct
            fd = direct[1] if aligned and direct is not None else self.dst
            while len(view):
                try:
                    k = os.pwrite(fd, view, pos)
                except OSError as exc:
                    if fd == self.dst or exc.errno != errno.EINVAL:
                        raise
                    self.direct, fd = None, self.dst
                    continue
                view, pos = view[k:], pos + k

    def _buffer(self):
        """A free buffer: the oldest one's write and hash waited for, when none is free."""
        while not self.free:
            self._retire()
        return self.free.popleft()

    def _retire(self) -> None:
        buf, write, hashed = self.busy.popleft()
        write.result()
        while not hashed.wait(0.5):
            if not self.hasher.running():
                raise OperationFailed("the checksum's thread ended before the data")
        self.free.append(buf)

    def drain(self) -> None:
        """Every write issued is on the file (or has raised its error here)."""
        while self.busy:
            self._retire()

    def close(self) -> None:
        """Waits for the writes in flight (their errors are dropped: the copy has failed).
        A buffer the checksum's thread may still read stays mapped while it holds a view."""
        self.pool.shutdown(wait=True)
        self.busy.clear()
        self.free.clear()
        for fd in self.fds:
            os.close(fd)
