"""The data mover of an image copy through qemu: NBD from a source export to a destination
export, holes and zeros by block status, several requests in flight.

What each range of the source becomes (`plan`), from NBD block status:
- collapse (the guest view of a chain into one volume): data is read and written; a zero or
  unallocated range is not written to a fresh destination, and becomes a write-zeroes (which
  may punch a hole) over a destination an earlier life may have written;
- layer (one layer of a chain onto its parent's copy, qemu:allocation-depth): only what the
  layer itself holds is written (its zeros too: they hide the backing's data); the rest is
  left unallocated so the destination's backing shows through, and read only to be hashed.
Every range is handed to the checksum in order, so the checksum is of the guest view. A layer
whose parent was copied just before it by the same worker is handed its parent's block digests
(`inherited`): a whole block the layer holds nothing of (read or hole throughout) is its
parent's, so it is not read at all and its digest is the parent's (KNOWN).

The ordering rule of agent/storage/copy/kernel.py holds: a checkpoint is recorded only after
an NBD flush of the destination has returned with every write below it completed.
"""

from __future__ import annotations

import collections
import functools
import select
import time

from agent.errors import GenerationMismatch, OperationFailed
from agent.storage.checksum import BLOCK
from agent.storage.copy.kernel import CopyStopped
from agent.storage.qemu_nbd import DEPTH, nbd_error

MiB = 1 << 20
# Bytes asked of one block status request: NBD's length is 32 bits; a hole is one request
# per 4 GiB (an empty 8 TiB disk: 2,048 round trips, not 8,192).
STATUS_MAX = (1 << 32) - (1 << 20)
ZERO_MAX = 1 << 30    # bytes of one write-zeroes request
DATA, READ, ZERO, HOLE, KNOWN = "data", "read", "zero", "hole", "known"


# Block status requests in flight ahead of the one awaited: each is a round trip, and an empty
# 8 TiB disk's 2,048 of them, asked in turn, took 0.17 s here; 16 at a time, 0.03 s.
STATUS_AHEAD = 16


class _Status:
    """An export's block status from an offset on, asked ahead: the requests for the next
    STATUS_MAX-byte spans are in flight while the copy works through the one it has. A
    request whose answer does not reach the offset wanted (an answer may stop short, or go
    past its request) is set aside and the offset asked on its own."""

    def __init__(self, h, end: int, depth: bool):
        self.h, self.end, self.depth = h, end, depth
        self.asked: list[list] = []  # [start, length, cookie, found], by start
        self.stale: list = []  # cookies of requests no longer wanted, retired once done

    def _ask(self, at: int) -> list:
        import nbd
        found: dict = {}

        def extent(context, start, entries, err):
            runs, pos = [], start
            for i in range(0, len(entries), 2):
                runs.append((pos, pos + entries[i], entries[i + 1]))
                pos += entries[i]
            found[context] = runs
            return 0

        length = min(self.end - at, STATUS_MAX)
        try:
            cookie = self.h.aio_block_status(length, at, extent)
        except nbd.Error as exc:
            raise nbd_error(exc, "asking the source's block status", at) from None
        request = [at, length, cookie, found]
        self.asked.append(request)
        self.asked.sort(key=lambda r: r[0])
        return request

    def _retire(self, cookie) -> bool:
        import nbd
        try:
            return self.h.aio_command_completed(cookie)
        except nbd.Error:
            return True  # a request no longer wanted: its failure does not matter

    def _answer(self, request: list, offset: int) -> dict | None:
        """The answer of `request` once it has come, if it reaches past `offset`."""
        import nbd
        self.asked.remove(request)
        at, _, cookie, found = request
        try:
            while not self.h.aio_command_completed(cookie):
                self.h.poll(-1)
        except nbd.Error as exc:
            raise nbd_error(exc, "asking the source's block status", at) from None
        base = found.get("base:allocation") or [(at, self.end, 0)]  # no answer: all data
        deep = (found.get(DEPTH) or [(at, self.end, 1)]) if self.depth else \
            [(at, self.end, 1)]
        return {"base": base, "deep": deep} if min(base[-1][1], deep[-1][1]) > offset \
            else None

    def at(self, offset: int) -> list[tuple[int, int, int, int]]:
        """Block status from offset: [(start, end, flags, depth)], covering at least one
        byte."""
        self.stale = [c for c in self.stale if not self._retire(c)]
        for r in [r for r in self.asked if r[0] + r[1] <= offset]:
            self.asked.remove(r)
            self.stale.append(r[2])
        request = next((r for r in self.asked if r[0] <= offset), None) or self._ask(offset)
        reach = max(r[0] + r[1] for r in self.asked)
        while len(self.asked) < STATUS_AHEAD and reach < self.end:
            reach = sum(self._ask(reach)[:2])
        answer = self._answer(request, offset)
        if answer is None and request[0] != offset:  # stopped short of it: ask it alone
            answer = self._answer(self._ask(offset), offset)
        if answer is None:  # an answer that covers nothing would loop for ever
            raise OperationFailed("the source's block status covers nothing", offset=offset)
        base, deep = answer["base"], answer["deep"]
        stop = min(base[-1][1], deep[-1][1], self.end)
        cuts = sorted({offset, stop} | {e for _, e, _ in base + deep if offset < e < stop})
        out = []
        for a, b in zip(cuts, cuts[1:]):
            flags = next(f for s, e, f in base if s <= a < e)
            level = next(f for s, e, f in deep if s <= a < e)
            out.append((a, b, flags, level))
        return out


def plan(h, start: int, end: int, *, layer: bool, fresh: bool):
    """(offset, length, kind) pieces covering [start, end), merged, in order."""
    pending = None
    offset = start
    status = _Status(h, end, layer)
    while offset < end:
        for a, b, flags, level in status.at(offset):
            zero = bool(flags & 2)
            if layer and level != 1:
                kind = HOLE if zero else READ
            elif zero:
                kind = ZERO if (layer or not fresh) else HOLE
            else:
                kind = DATA
            if pending and pending[2] == kind and pending[0] + pending[1] == a:
                pending = (pending[0], pending[1] + b - a, kind)
            else:
                if pending:
                    yield pending
                pending = (a, b - a, kind)
            offset = b
    if pending:
        yield pending


def with_known(ranges, start: int, size: int, known: int):
    """`ranges` (plan's, of a layer), with every whole block at or past `start` and below
    `known` that the layer holds nothing of (READ or HOLE throughout) made KNOWN: its digest
    is its parent's. `known`: where the parent's digests stop being this layer's (its size
    if both sizes are the same, else the whole blocks below the smaller one). A run of
    them, however long, stays one range."""
    run: list = []
    for r in ranges:
        if r[2] in (READ, HOLE):
            run.append(r)
            continue
        yield from _known_in(run, start, size, known)
        run = []
        yield r
    yield from _known_in(run, start, size, known)


def _known_in(run: list, start: int, size: int, known: int):
    if not run:
        return
    a, e = run[0][0], run[-1][0] + run[-1][1]
    lo = -(-max(a, start) // BLOCK) * BLOCK
    hi = min(e if e == size else e // BLOCK * BLOCK, known)
    if lo >= hi:
        yield from run
        return
    yield from _clipped(run, a, lo)
    yield lo, hi - lo, KNOWN
    yield from _clipped(run, hi, e)


def _clipped(run: list, a: int, e: int):
    for offset, length, kind in run:
        lo, hi = max(offset, a), min(offset + length, e)
        if lo < hi:
            yield lo, hi - lo, kind


def known_digests(inherited: list[bytes], offset: int, length: int) -> list[bytes]:
    """The parent's digests of the blocks of a KNOWN range."""
    return inherited[offset // BLOCK:-(-(offset + length) // BLOCK)]


def known_end(size: int, parent_size: int) -> int:
    """Where a layer's blocks stop being able to take its parent's digests (with_known)."""
    return size if size == parent_size else min(size, parent_size) // BLOCK * BLOCK


def _pieces(src_h, start: int, size: int, layer: bool, fresh: bool, chunk: int,
            known: int = 0):
    ranges = plan(src_h, start, size, layer=layer, fresh=fresh)
    if known:
        ranges = with_known(ranges, start, size, known)
    for offset, length, kind in ranges:
        if kind in (HOLE, KNOWN):  # nothing is read or written: one piece, however long
            yield offset, length, kind
            continue
        step = ZERO_MAX if kind == ZERO else chunk
        for pos in range(offset, offset + length, step):
            yield pos, min(step, offset + length - pos), kind


class _Piece:
    __slots__ = ("offset", "length", "kind", "buf", "view", "read", "write")

    def __init__(self, offset, length, kind):
        self.offset, self.length, self.kind = offset, length, kind
        self.buf = self.view = self.read = self.write = None


class _Loop:
    """The source's libnbd handle and the sink (a second handle, or a file's writer threads)
    driven by one poll loop, commands tracked by cookie."""

    def __init__(self, src_h, sink):
        self.src, self.sink = src_h, sink

    def step(self, timeout_ms: int = 1000) -> None:
        import nbd
        poller, ready = select.poll(), {}
        for h in (self.src, self.sink.h):
            if h is None or h.aio_in_flight() == 0:
                continue
            d = h.aio_get_direction()
            events = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                     (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            ready[h.aio_get_fd()] = h
            poller.register(h.aio_get_fd(), events)
        wants = self.sink.wants() if self.sink.h is None else None
        if wants is not None:
            ready[wants[0]] = self.sink
            poller.register(*wants)
        if not ready:
            return
        for fd, revents in poller.poll(timeout_ms):
            if ready[fd] is self.sink:
                self.sink.ready()
            elif revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                ready[fd].aio_notify_read()
            elif revents & select.POLLOUT:
                ready[fd].aio_notify_write()


class _Copier:
    """One copy's pipeline: pieces read from the source, written to the destination, handed
    to the checksum in order; `done` is the end of the pieces whose writes all completed."""

    def __init__(self, src, sink, start: int, hasher, progress, chunk: int,
                 max_in_flight: int, should_stop=lambda: False, inherited=None):
        self.src, self.sink, self.hasher, self.progress = src, sink, hasher, progress
        self.inherited = inherited  # the parent's block digests (KNOWN pieces)
        self.should_stop = should_stop
        self.loop = _Loop(src.h, sink)
        self.queue: collections.deque[_Piece] = collections.deque()
        self.done = start
        self.moved = 0  # data bytes written: what a checkpoint's byte count measures
        self.chunk, self.max_in_flight = chunk, max_in_flight
        # Buffers to read into, reused; the checksum's thread gives each back once hashed
        # (a deque: append and pop are atomic across threads). A fresh 4 MiB bytearray per
        # piece cost its zeroing and page faults: a quarter of a qcow2 copy's time.
        self.spare: collections.deque[bytearray] = collections.deque()

    def issue(self, piece: _Piece) -> None:
        import nbd
        self.queue.append(piece)
        if piece.kind == DATA or (piece.kind == READ and self.hasher is not None):
            piece.view = self.spare.pop() if self.spare else self.sink.buffer(self.chunk)
            piece.buf = nbd.Buffer.from_buffer(memoryview(piece.view)[:piece.length])
            piece.read = self.src.h.aio_pread(piece.buf, piece.offset)
        elif piece.kind == ZERO:
            piece.write = self.sink.zero(piece.length, piece.offset)

    def _finish(self, piece: _Piece) -> None:
        if self.hasher is not None:
            if piece.kind == KNOWN:
                self.hasher.known(known_digests(self.inherited, piece.offset, piece.length))
            elif piece.view is not None:  # the hasher has the buffer until it says done
                self.hasher.data(memoryview(piece.view)[:piece.length],
                                 done=functools.partial(self._give_back, piece.view))
            else:
                self.hasher.zeros(piece.length)
        elif piece.view is not None:
            self._give_back(piece.view)
        if piece.kind == DATA:
            self.moved += piece.length
        piece.view = piece.buf = None
        self.done = piece.offset + piece.length
        self.progress(self.done, self.moved)

    def _give_back(self, view: bytearray) -> None:
        if len(self.spare) < 2 * self.max_in_flight:  # the hasher's queue holds some too
            self.spare.append(view)

    def advance(self) -> None:
        """One turn of the loop: reads that completed become writes (data) or are done
        (read only); pieces done at the head of the queue are finished, in order."""
        import nbd
        queue = self.queue
        try:
            self.loop.step()
            for piece in queue:
                if piece.read is not None and self.src.h.aio_command_completed(piece.read):
                    piece.read = None
                    if piece.kind == DATA:
                        piece.write = self.sink.write(piece)
            while queue and queue[0].read is None and (
                    queue[0].write is None or self.sink.completed(queue[0].write)):
                queue[0].write = None
                self._finish(queue.popleft())
                if self.should_stop():  # finishing a piece can wait (the rate limit)
                    break
        except nbd.Error as exc:
            at = queue[0].offset if queue else self.done
            raise nbd_error(exc, "copying through qemu-nbd", at,
                            self.src.log() + self.sink.log()) from None

    def durable(self, checkpoint) -> None:
        """Every piece issued written, the destination flushed, then the checkpoint."""
        while self.queue:
            self.advance()
        self.sink.flush(self.done)
        if checkpoint is not None and not checkpoint(self.done):
            raise GenerationMismatch("copy superseded by a newer generation", offset=self.done)


def copy_image(src, sink, start: int, size: int, *, layer: bool, fresh: bool, hasher,
               checkpoint, progress, should_stop, chunk: int = 4 * MiB,
               max_in_flight: int = 8, checkpoint_bytes: int = 256 * MiB,
               checkpoint_seconds: float = 1.0, clock=time.monotonic,
               inherited: list[bytes] | None = None, parent_size: int = 0) -> int:
    """Copy guest bytes [start, size) from the `src` export into `sink`
    (agent/storage/copy/sink.py: a destination export, or a raw destination file).

    `hasher` (data(view), zeros(n), known(digests)) gets every byte of [start, size) in
    order, or None. `inherited`: a layer's parent's block digests (its guest view's, of
    `parent_size` bytes), for the blocks the layer holds nothing of.
    checkpoint(offset) -> bool after a flush (False: superseded, GenerationMismatch);
    should_stop() polled between steps: CopyStopped(offset) after a last checkpoint.
    NoSpace or OperationFailed on the exports' errors.
    """
    known = known_end(size, parent_size) if layer and hasher is not None and inherited \
        else 0
    copier = _Copier(src, sink, start, hasher, progress, chunk, max_in_flight, should_stop,
                     inherited)
    pieces = _pieces(src.h, start, size, layer, fresh, chunk, known)
    # Checkpoints every `checkpoint_bytes` of data written, or every `checkpoint_seconds`:
    # never by the offset, so that a hole costs none (an empty 8 TiB disk took 32,768 flushes
    # and metadata transactions when its progress through holes counted).
    saved, saved_at = copier.moved, clock()
    piece = next(pieces, None)
    while piece is not None or copier.queue:
        while piece is not None and len(copier.queue) < max_in_flight and not should_stop():
            copier.issue(_Piece(*piece))
            piece = next(pieces, None)
        copier.advance()
        if should_stop():
            copier.durable(checkpoint)
            raise CopyStopped(copier.done)
        if copier.moved - saved >= checkpoint_bytes or clock() - saved_at >= checkpoint_seconds:
            copier.durable(checkpoint)
            saved, saved_at = copier.moved, clock()
    copier.durable(None)
    return copier.done


def guest_checksum(db, row: dict, on_chunk=None, kind: str | None = None) -> str:
    """The checksum of a volume's guest view, its chain read through qemu (a scrub of a
    qcow2): the same value a copy records, whatever the format; of `kind` (a block kind,
    default the current one) to verify an older record."""
    from agent.storage import chain, checksum, qemu_img, qemu_nbd
    rows = db.chain(row["volume_id"])
    chain.inspect(db.layout, rows)
    path = db.layout.data_path(row)
    hasher = checksum.StreamHasher(row["size"], kind or checksum.BLOCKS)
    opts = chain.image_opts(db.layout, rows, direct=qemu_img.direct_io(path))
    with qemu_nbd.export(opts) as exp:
        hash_prefix(exp, row["size"], hasher, on_chunk=on_chunk)
    return hasher.hexdigest()


def hash_prefix(exp, end: int, hasher, beat=lambda: None, on_chunk=None,
                start: int = 0) -> None:
    """Hand the guest bytes [start, end) of an export to `hasher` (a resumed copy's prefix,
    written by an earlier life: read back, so the checksum is of what is there; a range of
    blocks asked for by a client). Zero and unallocated ranges are never read."""
    import nbd
    offset = start
    try:
        for pos, length, kind in plan(exp.h, start, end, layer=False, fresh=True):
            for at in range(pos, pos + length, 8 * MiB):
                n = min(8 * MiB, pos + length - at)
                if kind == DATA:
                    hasher.data(exp.h.pread(n, at))
                else:
                    hasher.zeros(n)
                offset = at + n
                beat()
                if on_chunk is not None:
                    on_chunk(offset, n if kind == DATA else 0)
    except nbd.Error as exc:
        raise nbd_error(exc, "reading the destination back", offset, exp.log()) from None
