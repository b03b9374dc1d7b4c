"""Checksums of volume data files, sparse-aware, for scrubs and for copy completion.

A checksum is written "<kind>:<hex>". Its kinds:

- ``blake3-4m`` (what is recorded now): the BLAKE3 of the BLAKE3 digests (32 bytes each) of
  the file's 4 MiB blocks, in order (the last block may be shorter). A block that lies in a
  hole is never read and its digest is a constant computed once, so a mostly empty 1 TiB
  volume costs 262,144 seeks and small updates, not 1 TiB of hashing. Holes read as zeros and
  are hashed as zeros: a block of written zeros has the same digest as a hole, so the
  checksum is of the bytes, never of how the file system lays them out. Blocks also let a
  copy hash its destination while it writes it (copy/readback.py), block by block behind it.
  BLAKE3 (the `blake3` package: Rust, SIMD, the GIL released) hashes ~6.5 GiB/s on one core
  here against SHA-256's ~1.8 (docs/performance.md): the checksum costs less than the copy.
- ``sha256-4m`` (recorded by the versions before it): the same structure with SHA-256.
- ``sha256`` (the first versions): the SHA-256 of the whole file's bytes, holes as zeros.
- ``blake2b`` (asked for, never recorded): ovirt-imageio's block hash (its blkhash.py): the
  same structure with BLAKE2b of 32-byte digests, so that `ovirt_imageio.client.checksum` of
  a file equals the agent's answer for a volume holding it (Image.checksum).

The older kinds are still verified: a scrub hashes a volume with the kind of its record.
What a checksum does and does not protect against: docs/crash-model.md, "Checksums".

`on_chunk(offset, read)` is called after every piece (``read``: bytes actually read from
storage, 0 for a hole): the caller throttles, heartbeats and stops from there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading

import blake3

from agent.errors import OperationFailed
from agent.storage.copy.kernel import next_extent

MiB = 1 << 20
BLOCK = 4 * MiB
# Data is read in pieces small enough to stay in the CPU's cache between the read and the
# hash: ~10% faster than reading a whole block at once, measured (docs/performance.md).
READ = 256 * 1024
BLOCKS, SHA256_BLOCKS, WHOLE = "blake3-4m", "sha256-4m", "sha256"
IMAGEIO = "blake2b"
KINDS = (BLOCKS, SHA256_BLOCKS, WHOLE)
# The hash of each block-structured kind (the same one inside and outside).
_HASH = {BLOCKS: blake3.blake3, SHA256_BLOCKS: hashlib.sha256,
         IMAGEIO: functools.partial(hashlib.blake2b, digest_size=32)}
_PARALLEL = functools.partial(blake3.blake3, max_threads=blake3.blake3.AUTO)
_ZEROS = memoryview(bytes(BLOCK))
ZERO_RUN = 1 << 16  # zero blocks' digests handed to the outer hash at once (2 MiB of them)


def kind_of(checksum: str | None) -> str:
    """The kind a recorded checksum was made with; the current one for none (or unknown)."""
    kind = (checksum or "").partition(":")[0]
    return kind if kind in KINDS else BLOCKS


@functools.lru_cache(maxsize=8)
def _zero_digest(kind: str, n: int) -> bytes:
    return _HASH[kind](_ZEROS[:n]).digest()


def _extents(fd: int, start: int, end: int):
    """(start, end, is_data) pieces covering [start, end), in order."""
    offset = start
    while offset < end:
        data, stop = next_extent(fd, offset, end)
        if data > offset:
            yield offset, data, False
        if data < stop:
            yield data, stop, True
        offset = stop


class _Truncated(Exception):
    """The file ended before its size said: what is not there hashes as nothing."""


class BlockHasher:
    """The block-structured checksum (``blake3-4m`` unless told) of the file open at ``fd``,
    taken a block at a time as far as the caller says the bytes are final (`hash_until`)."""

    def __init__(self, fd: int, size: int, kind: str = BLOCKS):
        self.fd, self.size, self.kind = fd, size, kind
        self._hash = _HASH[kind]
        self.pos = 0  # every block below pos is hashed
        self._outer = self._hash()
        self._buf = memoryview(bytearray(READ))

    @property
    def finished(self) -> bool:
        return self.pos >= self.size

    def next_block_end(self) -> int:
        return min(self.pos + BLOCK, self.size)

    def hash_until(self, limit: int, on_chunk=None) -> None:
        """Hash every block that ends at or below ``limit`` (the file's end ends a block)."""
        while not self.finished and self.next_block_end() <= limit:
            start, end = self.pos, self.next_block_end()
            try:
                n = self._block(start, end)
            except _Truncated:
                self.pos = self.size
                return
            self.pos = end
            if on_chunk is not None:
                on_chunk(end, n)

    def _block(self, start: int, end: int) -> int:
        pieces = list(_extents(self.fd, start, end))
        if not any(is_data for _, _, is_data in pieces):
            self._outer.update(_zero_digest(self.kind, end - start))
            return 0
        inner, read = self._hash(), 0
        for s, e, is_data in pieces:
            if not is_data:
                inner.update(_ZEROS[:e - s])
                continue
            for pos in range(s, e, READ):
                view = self._buf[:min(READ, e - pos)]
                got = max(os.preadv(self.fd, [view], pos), 0)
                inner.update(view[:got])
                read += got
                if got < len(view):
                    self._outer.update(inner.digest())
                    raise _Truncated()
        self._outer.update(inner.digest())
        return read

    def hexdigest(self) -> str:
        return f"{self.kind}:{self._outer.hexdigest()}"


def _whole_sha256(fd: int, size: int, on_chunk=None) -> str:
    digest = hashlib.sha256()
    buf = memoryview(bytearray(BLOCK))
    for start, end, is_data in _extents(fd, 0, size):
        pos = start
        while pos < end:
            n = min(BLOCK, end - pos)
            if is_data:
                got = os.preadv(fd, [buf[:n]], pos)
                if got <= 0:  # truncated under us: what is not there hashes as nothing
                    return f"{WHOLE}:{digest.hexdigest()}"
                digest.update(buf[:got])
            else:
                got = n
                digest.update(_ZEROS[:got])
            pos += got
            if on_chunk is not None:
                on_chunk(pos, got if is_data else 0)
    return f"{WHOLE}:{digest.hexdigest()}"


def fd_checksum(fd: int, on_chunk=None, kind: str = BLOCKS) -> str:
    """The checksum of the whole file open at ``fd``, of the given kind."""
    size = os.fstat(fd).st_size
    if kind == WHOLE:
        return _whole_sha256(fd, size, on_chunk)
    hasher = BlockHasher(fd, size, kind)
    hasher.hash_until(size, on_chunk)
    return hasher.hexdigest()


def file_checksum(path: str, on_chunk=None, kind: str = BLOCKS) -> str:
    """A whole file read once (a scrub's): each piece's pages dropped once hashed, so that a
    scrub neither pushes the host's cache out nor grows it by fresh pages (which on a VM
    whose freed memory goes back to its host cost 3x the hashing: docs/performance.md)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    hashed = 0

    def dropped(offset: int, read: int) -> None:
        nonlocal hashed
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(fd, hashed, offset - hashed, os.POSIX_FADV_DONTNEED)
        hashed = offset
        if on_chunk is not None:
            on_chunk(offset, read)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd_checksum(fd, dropped, kind)
    finally:
        os.close(fd)


class StreamHasher:
    """The block-structured checksum of bytes handed over in order (`data`, `zeros`), for
    data that is not a local file: an image read through qemu. The same value as
    BlockHasher's for the same guest-visible bytes, so a raw and a qcow2 copy of one disk
    record one checksum."""

    def __init__(self, size: int, kind: str = BLOCKS, keep_blocks: bool = False):
        self.size, self.pos, self.kind = size, 0, kind
        # A block's bytes come in pieces of up to 4 MiB (a sparse block's zeros among them),
        # which BLAKE3 hashes on every core, to the same digest: 17 GiB/s here against 9 on
        # one (idle; 11 against 7 beside a test run). A 1 TiB qcow2 holding 1 GiB in 1 MiB
        # pieces hashes 3 GiB of zeros beside it, and its copy to raw went from 0.92x
        # convert's speed to 0.98x (docs/performance.md).
        self._hash = _PARALLEL if kind == BLOCKS else _HASH[kind]
        # BLAKE3 hashes one long input on several cores, to the same digest: the outer hash
        # of an empty 8 TiB disk is 64 MiB of zero blocks' digests, 26 ms on one core and
        # 10 on two, waited for at the copy's end. (Its 32-byte updates stay on one.)
        self._outer = blake3.blake3(max_threads=blake3.blake3.AUTO) if kind == BLOCKS \
            else self._hash()
        self._inner = None  # the current block's hash, once it has data (else all zeros)
        self.blocks: list[bytes] | None = [] if keep_blocks else None  # each block's digest

    def _room(self) -> int:
        return BLOCK - self.pos % BLOCK

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos % BLOCK == 0 or self.pos == self.size:
            start = self.pos - (self.pos % BLOCK or BLOCK)
            if self._inner is None:
                digest = _zero_digest(self.kind, self.pos - start)
            else:
                digest = self._inner.digest()
            self._outer.update(digest)
            if self.blocks is not None:
                self.blocks.append(digest)
            self._inner = None

    def data(self, view, done=None) -> None:
        """Hash `view`; then `done()`, if given: the caller may reuse its buffer."""
        view = memoryview(view)
        while len(view):
            n = min(len(view), self._room())
            if self._inner is None:
                self._inner = self._hash(_ZEROS[:self.pos % BLOCK])
            self._inner.update(view[:n])
            self._advance(n)
            view = view[n:]
        view.release()
        if done is not None:
            done()

    def zeros(self, n: int) -> None:
        while n:
            if self._inner is None and self.pos % BLOCK == 0 and n >= BLOCK:
                self._zero_blocks(n // BLOCK)
                n %= BLOCK
                continue
            k = min(n, self._room())
            if self._inner is not None:
                self._inner.update(_ZEROS[:k])
            self._advance(k)
            n -= k

    def _zero_blocks(self, count: int) -> None:
        """`count` whole blocks of zeros: each one's digest is the same constant, handed to
        the outer hash many at a time (an empty 8 TiB disk is two million blocks)."""
        digest = _zero_digest(self.kind, BLOCK)
        run = memoryview(digest * min(count, ZERO_RUN))  # made once, not once a piece
        while count:
            k = min(count, ZERO_RUN)
            self._outer.update(run[:k * len(digest)])
            if self.blocks is not None:
                self.blocks.extend([digest] * k)
            self.pos += k * BLOCK
            count -= k

    def known(self, digests: list[bytes]) -> None:
        """The next blocks, whose digests are known already (a layer's blocks that it holds
        nothing of are its parent's): from a block's start, the last block of the volume
        possibly among them."""
        if self.pos % BLOCK or self._inner is not None:
            raise OperationFailed(f"known blocks handed over at {self.pos}, inside a block")
        self._outer.update(b"".join(digests))
        if self.blocks is not None:
            self.blocks.extend(digests)
        self.pos = min(self.pos + len(digests) * BLOCK, self.size)

    def hexdigest(self) -> str:
        if self.pos != self.size:
            raise OperationFailed(f"hashed {self.pos} of {self.size} bytes")
        return f"{self.kind}:{self._outer.hexdigest()}"


class Tee:
    """Several hashers fed the same bytes in order (`data`, `zeros`)."""

    def __init__(self, *hashers):
        self.hashers = hashers

    def data(self, view, done=None) -> None:
        for h in self.hashers:
            h.data(view)
        if done is not None:
            done()

    def zeros(self, n: int) -> None:
        for h in self.hashers:
            h.zeros(n)


class StreamFollower:
    """A StreamHasher on a thread of its own, fed through a bounded queue: hashing (which
    releases the GIL) runs beside the copy's I/O instead of between it."""

    def __init__(self, size: int, depth: int = 8, keep_blocks: bool = False):
        import queue
        self._hasher = StreamHasher(size, keep_blocks=keep_blocks)
        self._queue = queue.Queue(maxsize=depth)
        self._zeros = 0  # zeros not handed over yet (see zeros)
        self._thread = threading.Thread(target=self._run, name="checksum", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, int):
                self._hasher.zeros(item)
            elif isinstance(item, list):
                self._hasher.known(item)
            else:
                self._hasher.data(*item)

    def data(self, view, done=None) -> None:
        """Hash `view` on the thread; `done()` is called there once it is hashed (the
        caller may then reuse the buffer, instead of allocating one per piece)."""
        self._hand_zeros()
        self._queue.put((view, done))

    def zeros(self, n: int) -> None:
        """Zeros, handed over ZERO_RUN blocks' worth at a time (or before what follows
        them): an empty disk's block status comes 4 GiB at a time, and its digests hashed in
        runs of 2 MiB use two cores where 32 KiB use one."""
        self._zeros += n
        if self._zeros >= ZERO_RUN * BLOCK:
            self._hand_zeros()

    def _hand_zeros(self) -> None:
        if self._zeros:
            self._queue.put(self._zeros)
            self._zeros = 0

    def known(self, digests: list[bytes]) -> None:
        self._hand_zeros()
        self._queue.put(list(digests))

    def result(self, beat=lambda: None) -> str:
        """The checksum, all handed over hashed; `beat()` meanwhile (huge disks' zeros)."""
        self._hand_zeros()
        self._queue.put(None)
        while self._thread.join(0.25) or self._thread.is_alive():
            beat()
        return self._hasher.hexdigest()

    def blocks(self) -> list[bytes] | None:
        """Each block's digest, once result() has returned (if kept)."""
        return self._hasher.blocks

    def cancel(self) -> None:
        if self._thread.is_alive():
            while True:  # make room for the end marker: the queue may be full
                try:
                    self._queue.put_nowait(None)
                    break
                except Exception:
                    with contextlib.suppress(Exception):
                        self._queue.get_nowait()
            self._thread.join()
