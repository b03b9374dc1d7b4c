"""A layer's blocks that it holds nothing of take its parent's digests unread
(agent/storage/copy/nbd.py `with_known`, agent/storage/checksum.py `StreamHasher.known`):
whatever the layout, the sizes and where a resumed copy starts, the checksum is the one of the
layer's whole guest view read byte by byte, and nothing the layer holds is skipped."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.storage.checksum import BLOCK, StreamHasher
from agent.storage.copy.nbd import (
    DATA,
    HOLE,
    KNOWN,
    READ,
    ZERO,
    known_digests,
    known_end,
    with_known,
)

UNIT = 64 * 1024  # a cluster: where block status answers change
KINDS = (DATA, ZERO, READ, HOLE)


def _layout(rnd: random.Random, size: int) -> list[tuple[int, int, str]]:
    """Plan-like ranges covering [0, size): runs of one kind, adjacent kinds differing."""
    ranges, pos = [], 0
    while pos < size:
        n = min(size - pos, rnd.choice([1, 2, 16, 64, 200]) * UNIT)
        kind = rnd.choice(KINDS)
        if ranges and ranges[-1][2] == kind:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + n, kind)
        else:
            ranges.append((pos, n, kind))
        pos += n
    return ranges


def _views(rnd: random.Random, ranges, size: int, parent_size: int):
    """The parent's guest view and the layer's: the layer's own ranges hold its data (or
    zeros), the rest shows its parent (zeros past the parent's end; zeros for a HOLE)."""
    parent = bytearray(parent_size)
    for at in range(0, parent_size, UNIT):
        if rnd.random() < 0.6:
            parent[at:at + UNIT] = rnd.randbytes(min(UNIT, parent_size - at))
    shown = bytes(parent[:size]) + bytes(max(0, size - parent_size))
    child = bytearray(shown)
    for offset, length, kind in ranges:
        if kind == DATA:
            child[offset:offset + length] = rnd.randbytes(length)
        elif kind in (ZERO, HOLE):
            child[offset:offset + length] = bytes(length)
            if kind == HOLE:
                parent[offset:min(offset + length, parent_size)] = bytes(
                    max(0, min(offset + length, parent_size) - offset))
    return bytes(parent), bytes(child)


def _clip(ranges, start: int):
    for offset, length, kind in ranges:
        if offset + length > start:
            lo = max(offset, start)
            yield lo, offset + length - lo, kind


@settings(max_examples=120, deadline=None)
@given(blocks=st.integers(1, 6), tail=st.sampled_from([0, 512, UNIT, BLOCK - UNIT]),
       parent_delta=st.sampled_from([0, 0, -BLOCK, -UNIT, UNIT, BLOCK + 512]),
       start_at=st.floats(0, 1), seed=st.integers(0, 2 ** 32))
def test_known_blocks_give_the_checksum_of_the_whole_guest_view(blocks, tail, parent_delta,
                                                                start_at, seed):
    rnd = random.Random(seed)
    size = blocks * BLOCK + tail
    parent_size = max(UNIT, size + parent_delta)
    ranges = _layout(rnd, size)
    parent, child = _views(rnd, ranges, size, parent_size)
    kept = StreamHasher(parent_size, keep_blocks=True)
    kept.data(parent)
    kept.hexdigest()
    whole = StreamHasher(size)
    whole.data(child)

    start = int(start_at * size) // 512 * 512  # a resumed copy: its prefix read back
    hasher = StreamHasher(size)
    hasher.data(child[:start])
    out = list(with_known(_clip(ranges, start), start, size, known_end(size, parent_size)))
    pos = start
    for offset, length, kind in out:
        assert offset == pos and length > 0  # in order, contiguous, nothing left out
        pos += length
        if kind == KNOWN:
            assert offset % BLOCK == 0 and (length % BLOCK == 0 or offset + length == size)
            assert offset + length <= known_end(size, parent_size)
            owned = [r for r in ranges if r[2] in (DATA, ZERO)
                     and r[0] < offset + length and offset < r[0] + r[1]]
            assert owned == []  # nothing the layer holds is ever skipped
            hasher.known(known_digests(kept.blocks, offset, length))
        else:
            hasher.data(child[offset:offset + length])
    assert pos == size
    assert hasher.hexdigest() == whole.hexdigest()


def test_a_long_run_the_layer_holds_nothing_of_stays_one_range():
    """An 8 TiB layer empty of its own: one KNOWN range, never one per block (the planning
    must not cost per byte of virtual size)."""
    size = 8 << 40
    out = list(with_known(iter([(0, 3 * BLOCK + 5, DATA), (3 * BLOCK + 5, size - 3 * BLOCK - 5,
                                                             HOLE)]), 0, size, size))
    assert out == [(0, 3 * BLOCK + 5, DATA), (3 * BLOCK + 5, BLOCK - 5, HOLE),
                   (4 * BLOCK, size - 4 * BLOCK, KNOWN)]
