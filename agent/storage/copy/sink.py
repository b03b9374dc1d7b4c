"""Where an image copy's writes go (agent/storage/copy/nbd.py): a destination qemu-nbd
(`NbdSink`, any format), or, for a raw destination, the file itself (`FileSink`).

A raw file's guest view is its bytes, so a second qemu-nbd between the copy and the file only
costs: every byte crosses a socket once more and is copied by another process (measured in
docs/performance.md). `FileSink` writes with pwrite from a few threads (the copy's poll loop
goes on reading meanwhile; os.pwrite lets the GIL go), O_DIRECT where offset, length and
buffer are aligned (the buffers are mmap's, page-aligned), as `cache=none` did; zeros are a
punched hole (or a zeroed range, to keep a preallocated file whole); a flush is fdatasync.

Both answer the same calls: buffer(n), write(piece) and zero(length, offset) return a cookie,
completed(cookie) says whether it is done (raising the agent error of its failure), flush(),
and wants() -> (fd, events) for the poll loop with ready() called when that fd is ready.
"""

from __future__ import annotations

import concurrent.futures
import errno
import mmap
import os
import select

from agent import system
from agent.storage.copy.kernel import fault_point, os_errors
from agent.storage.qemu_nbd import nbd_error

ALIGN = 4096  # what O_DIRECT asks of a write's offset, length and buffer here
WRITERS = 4   # threads writing a raw destination: the device's queue, not the GIL, limits


class NbdSink:
    """Writes through a writable export (agent/storage/qemu_nbd.py Export), in flight."""

    def __init__(self, exp, punch: bool = True):
        self.exp, self.h = exp, exp.h
        self.zero_flags = 0 if punch else _no_hole()

    def buffer(self, n: int):
        return bytearray(n)

    def write(self, piece):
        return self.h.aio_pwrite(piece.buf, piece.offset)

    def zero(self, length: int, offset: int):
        return self.h.aio_zero(length, offset, flags=self.zero_flags)

    def completed(self, cookie) -> bool:
        return self.h.aio_command_completed(cookie)

    def flush(self, at: int) -> None:
        import nbd
        try:
            self.h.flush()
        except nbd.Error as exc:
            raise nbd_error(exc, "flushing the destination", at, self.exp.log()) from None

    def log(self) -> str:
        return self.exp.log()


def _no_hole() -> int:
    import nbd
    return nbd.CMD_FLAG_NO_HOLE


class FileSink:
    """Writes a raw destination file directly (see the module's docstring); close() when
    done. Its writes are all completed or failed before flush() returns."""

    h = None

    def __init__(self, path: str, punch: bool = True, direct: bool = True):
        self.punch = punch
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.direct = None
        if direct:
            try:
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # tmpfs and others: through the page cache only
                pass
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.pool = concurrent.futures.ThreadPoolExecutor(WRITERS, "sink")
        self.pending: set = set()

    def buffer(self, n: int):
        return mmap.mmap(-1, n)

    def write(self, piece):
        view = memoryview(piece.view)[:piece.length]
        fd = self.fd
        if self.direct is not None and not (piece.offset % ALIGN or piece.length % ALIGN):
            fd = self.direct
        future = self.pool.submit(self._pwrite, fd, view, piece.offset)
        self.pending.add(future)
        # The poll loop is woken once the future is done, not before (from inside the write,
        # it could find it not done yet and sleep out its whole timeout).
        future.add_done_callback(self._woken)
        return future

    def _woken(self, future) -> None:
        os.eventfd_write(self.wake, 1)

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        """In a writer thread: its error becomes the agent's (NoSpace, OperationFailed), to
        be raised by completed() in the copy's own thread."""
        with os_errors(offset):
            fault_point("copy", offset)
            while len(view):
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n

    def zero(self, length: int, offset: int):
        """Zeros at once (fallocate does not move the bytes): a punched hole, or a zeroed
        range that stays allocated; written as zeros where the file system has neither."""
        mode = system.FALLOC_FL_KEEP_SIZE | (system.FALLOC_FL_PUNCH_HOLE if self.punch
                                             else system.FALLOC_FL_ZERO_RANGE)
        with os_errors(offset):
            try:
                system.fallocate(self.fd, mode, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._write_zeros(length, offset)
        return None

    def _write_zeros(self, length: int, offset: int) -> None:
        zeros = bytes(min(length, 4 << 20))
        for at in range(offset, offset + length, len(zeros)):
            os.pwrite(self.fd, zeros[:min(len(zeros), offset + length - at)], at)

    def completed(self, cookie) -> bool:
        if cookie is None:
            return True
        if not cookie.done():
            return False
        self.pending.discard(cookie)
        exc = cookie.exception()
        if exc is not None:
            raise exc
        return True

    def wants(self):
        return (self.wake, select.POLLIN) if self.pending else None

    def ready(self) -> None:
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass

    def flush(self, at: int) -> None:
        concurrent.futures.wait(list(self.pending))
        for cookie in list(self.pending):
            self.completed(cookie)
        with os_errors(at):
            fault_point("fsync", at)
            os.fdatasync(self.fd)

    def log(self) -> str:
        return ""

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in (self.fd, self.direct, self.wake):
            if fd is not None:
                os.close(fd)
