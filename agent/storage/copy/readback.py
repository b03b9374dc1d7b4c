"""The checksum of a copy's destination, read back behind the copy as it writes it (a
kernel copy's: workers/ops/image.py), block by block, so that recording it costs no second
pass over the data. The checksum is agent/storage/checksum.py's `blake3-4m`.
"""

from __future__ import annotations

import errno
import threading
import time

from agent.errors import OperationFailed
from agent.storage.checksum import BlockHasher


class _Cancelled(Exception):
    """Follower.cancel() was called: stop between blocks."""


def _read_error(e: OSError, what: str) -> OperationFailed:
    return OperationFailed(f"reading {what} back failed: {e.strerror or e}",
                           errno=errno.errorcode.get(e.errno, str(e.errno)))


class Follower:
    """Hashes a copy's destination in a thread, a block behind the copy, so that recording
    its checksum costs no second pass over the data: when the copy ends, only the last
    block or so is left to hash. The bytes are read back from the destination (from the
    page cache, mostly), so the checksum is of what was written, not of what was meant.

    ``advance(offset)`` says every byte below offset is written; `result()` waits for the
    rest and returns the checksum; `cancel()` stops the thread within a block; `hasher.pos`:
    how far it has read back and hashed. Hashing (pread, SHA-256) releases the GIL, so it
    runs on another core than the copy's kernel calls. ``written`` bytes are there from the
    start (a resumed copy's prefix, read back from disk): with ``rate`` (bytes a second, 0:
    unlimited) the thread reads no faster than that, like the copy itself, so a resume does
    not burst the prefix off the disk.
    """

    def __init__(self, fd: int, size: int, written: int = 0, rate: int = 0):
        self.hasher = BlockHasher(fd, size)
        self._limit = written
        self._rate = rate
        self._cancelled = threading.Event()
        self._error: OSError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checksum", daemon=True)
        self._thread.start()

    def advance(self, offset: int) -> None:
        with self._cond:
            if offset > self._limit:
                self._limit = offset
                if offset >= self.hasher.next_block_end():
                    self._cond.notify()

    def _run(self) -> None:
        began, read = time.monotonic(), 0

        def between_blocks(offset: int, n: int) -> None:
            nonlocal read
            read += n
            ahead = read / self._rate - (time.monotonic() - began) if self._rate else 0
            if ahead > 0:
                self._cancelled.wait(ahead)  # ahead of the rate: wait, unless cancelled
            if self._cancelled.is_set():
                raise _Cancelled()

        try:
            while True:
                with self._cond:
                    while not self._cancelled.is_set() and \
                            self.hasher.next_block_end() > self._limit:
                        self._cond.wait()
                    if self._cancelled.is_set():
                        return
                    limit = self._limit
                self.hasher.hash_until(limit, between_blocks)
                if self.hasher.finished:
                    return
        except _Cancelled:
            return
        except OSError as e:
            self._error = e

    def result(self, beat=lambda: None, what: str = "the destination") -> str:
        """The checksum, once every block is hashed: advance(size) first. ``beat()`` is
        called while waiting (heartbeats; it may raise to stop, see `cancel`)."""
        while self._thread.is_alive():
            self._thread.join(0.2)
            beat()
        if self._error is not None:
            raise _read_error(self._error, what)
        if not self.hasher.finished:
            raise OperationFailed(f"{what} was hashed only to offset {self.hasher.pos}")
        return self.hasher.hexdigest()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled.set()
            self._cond.notify()
        self._thread.join()
