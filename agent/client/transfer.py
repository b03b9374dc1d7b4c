"""Moving a disk's guest view between a local file and an agent's export, over NBD.

The two ends are agent/client/ends.py's: the export's unix socket (Export.start), and the
local file (raw: its bytes, read and written by the kernel; qcow2: through a private
qemu-nbd, its format given, never probed, which dies with this process). The work is cut in
4 MiB blocks, the block of the agent's checksums; each block's extents come from block
status (SEEK_DATA for a raw file), so zeros and holes are never sent: on a fresh destination
a zero range is left alone, on one that may hold something else it becomes a write-zeroes.
Each block's BLAKE3 digest is taken as it passes, so a transfer ends knowing the blake3-4m
checksum the agent records, and the agent's finish checks it. A resumed transfer compares
both ends' block digests (the agent's from Image.checksum, computed on its side) and moves
only the blocks that differ. Several connections move blocks at once.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import queue
import threading
import time
from dataclasses import dataclass, field

import blake3

from agent.client.ends import BLOCK, ZEROS

# An upload flushes the export this often (one flush covers the image, whichever connection
# asks): unflushed writes (a qcow2's tables in qemu-nbd's cache) die with a killed agent, and
# a resume sends again what they held. Each flush costs an fdatasync on the agent's side.
FLUSH_SECONDS = 1.0
THREADS = 4  # connections moving blocks at once (and one more reading block status)


@functools.lru_cache(maxsize=8)
def zero_digest(n: int) -> bytes:
    return blake3.blake3(ZEROS[:n]).digest()


def checksum(digests: list[bytes]) -> str:
    """The blake3-4m checksum of a guest view whose blocks have these digests."""
    return "blake3-4m:" + blake3.blake3(b"".join(digests)).hexdigest()


def blocks(h, size: int, wanted: set[int] | None = None):
    """(index, [(offset, length, zero), ...]) for each 4 MiB block (of `wanted` only) of the
    handle's guest view."""
    current, pieces = 0, []
    for at, length, zero in h.extents(0, size):
        while length:
            index = at // BLOCK
            if index != current:
                if pieces and (wanted is None or current in wanted):
                    yield current, pieces
                current, pieces = index, []
            n = min(length, (index + 1) * BLOCK - at)
            pieces.append((at, n, zero))
            at, length = at + n, length - n
    if pieces and (wanted is None or current in wanted):
        yield current, pieces


@dataclass
class Stats:
    """Bytes moved: read (data read from the source), sent (data written to the
    destination), zeroed (write-zeroes asked of it), skipped (blocks both ends held)."""

    read: int = 0
    sent: int = 0
    zeroed: int = 0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"read": self.read, "sent": self.sent, "zeroed": self.zeroed,
                "skipped": self.skipped}


class Pacer:
    """At most `rate` bytes a second over all threads (0: unlimited)."""

    def __init__(self, rate: int = 0):
        self.rate, self.began, self.done = rate, time.monotonic(), 0
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.done += n
            due = self.began + self.done / self.rate
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class _Movers:
    """`threads` threads, each with its own connections, taking blocks from a queue; the
    first failure stops them all (every one still takes its end marker)."""

    def __init__(self, src_connect, dst_connect, fresh: bool, stats: Stats, pacer: Pacer,
                 on_block, threads: int, flush_every: float | None, hasher=blake3.blake3):
        self.src_connect, self.dst_connect, self.fresh = src_connect, dst_connect, fresh
        self.flush_every, self.flushed = flush_every, time.monotonic()
        self.lock = threading.Lock()
        self.stats, self.pacer, self.on_block, self.hasher = stats, pacer, on_block, hasher
        self.work: queue.Queue = queue.Queue(maxsize=threads * 2)
        self.digests: dict[int, bytes] = {}
        self.failures: list[BaseException] = []
        self.pool = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.pool:
            t.start()

    def _run(self) -> None:
        src = dst = None
        buf = mmap.mmap(-1, BLOCK)  # page-aligned: a local file may be written O_DIRECT
        try:
            src = self.src_connect()
            dst = self.dst_connect() if self.dst_connect else None
        except BaseException as exc:
            self.failures.append(exc)
        while (item := self.work.get()) is not None:  # taken to the end, failed or not
            if self.failures:
                continue
            try:
                index, pieces = item
                self.digests[index] = _block(src, dst, pieces, self.fresh, self.stats,
                                             self.pacer, buf, self.hasher)
                if dst is not None and self._flush_due():
                    dst.flush()  # what a crash of the far end keeps: a resume skips it
                if self.on_block is not None:
                    self.on_block(index, sum(p[1] for p in pieces))
            except BaseException as exc:
                self.failures.append(exc)
        try:
            if dst is not None and not self.failures:
                dst.flush()
        except BaseException as exc:
            self.failures.append(exc)
        for h in (src, dst):
            if h is not None:
                with contextlib.suppress(Exception):
                    h.shutdown()

    def _flush_due(self) -> bool:
        """Whether this thread is the one to flush now (one a period, for all of them)."""
        if self.flush_every is None:
            return False
        with self.lock:
            now = time.monotonic()
            if now - self.flushed < self.flush_every:
                return False
            self.flushed = now
            return True

    def join(self) -> None:
        for _ in self.pool:
            self.work.put(None)
        for t in self.pool:
            t.join()
        if self.failures:
            raise self.failures[0]


def run_blocks(src_connect, dst_connect, size: int, *, fresh: bool,
               wanted: set[int] | None = None, threads: int = THREADS, on_block=None,
               stats: Stats | None = None, should_stop=lambda: False,
               rate: int = 0, flush_every: float | None = None,
               extents_of=None, digests: bool = True) -> dict[int, bytes]:
    """Move (or, without `dst_connect`, only hash) the blocks of the source's guest view
    (those in `wanted`, else all); returns each block's digest by index. `on_block(index,
    length)` after each; at most `rate` bytes of data a second. The destination is flushed
    every `flush_every` seconds (by one connection: one flush covers the image), and each
    connection at its end. `extents_of`: the connection whose extents say what to move
    (a backup's dirty ones; default a source connection's, the whole guest view): a block
    then moves only its pieces, and its digest is of them alone."""
    movers = _Movers(src_connect, dst_connect, fresh, stats or Stats(), Pacer(rate),
                     on_block, threads, flush_every, blake3.blake3 if digests else _Unhashed)
    try:
        head = (extents_of or src_connect)()
        try:
            for item in blocks(head, size, wanted):
                if movers.failures or should_stop():
                    break
                movers.work.put(item)
        finally:
            head.shutdown()
    finally:
        movers.join()
    if should_stop():
        raise KeyboardInterrupt
    return movers.digests


class _Unhashed:
    """A hasher that hashes nothing (digests nobody reads cost a core's time)."""

    def update(self, data) -> None:
        pass

    def digest(self) -> bytes:
        return b""


def _block(src, dst, pieces, fresh: bool, stats: Stats, pacer: Pacer, buf,
           hasher=blake3.blake3) -> bytes:
    """One block moved (or only hashed), read into `buf` (the thread's own, reused)."""
    if all(zero for _, _, zero in pieces):
        length = sum(p[1] for p in pieces)
        if dst is not None and not fresh:
            dst.zero(length, pieces[0][0])
            stats.add(zeroed=length)
        return zero_digest(length) if hasher is not _Unhashed else b""
    h = hasher()
    for at, length, zero in pieces:
        if zero:
            h.update(ZEROS[:length])
            if dst is not None and not fresh:
                dst.zero(length, at)
                stats.add(zeroed=length)
            continue
        pacer.take(length)
        with memoryview(buf)[:length] as data:
            src.pread_into(data, at)
            stats.add(read=length)
            h.update(data)
            if dst is not None:
                dst.pwrite(data, at)
                stats.add(sent=length)
    return h.digest()


def differing(local: dict[int, bytes], remote: dict[int, bytes], count: int) -> set[int]:
    """The block indices whose digests differ between the two ends (or are missing)."""
    return {i for i in range(count) if local.get(i) is None or local.get(i) != remote.get(i)}


def bytes_of(indices: set[int], size: int) -> int:
    """The bytes the blocks of these indices cover (the last block may be short)."""
    return sum(min(BLOCK, size - i * BLOCK) for i in indices)


def block_count(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK
