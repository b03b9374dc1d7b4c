"""Block status asked ahead (agent/storage/copy/nbd.py `_Status`, under `plan`): whatever a
server answers, short of a request or past it, in whatever pieces, the plan is the export's
layout exactly, and no request is left waited on for ever.

A server's answers are a fake here, the one seam of these tests: qemu-nbd answers every
request whole, and the NBD protocol lets a server answer less (or more, in its last extent),
which is the case the code must survive."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.storage.copy import nbd
from agent.storage.qemu_nbd import DEPTH

UNIT = 64 * 1024


class FakeExport:
    """A libnbd handle's aio block status, answered in order at each poll, truthfully about
    `layout` ([(start, end, flags, depth)]) but cut short, run past the request or split at
    random."""

    def __init__(self, layout, rnd: random.Random, end: int):
        self.layout, self.rnd, self.end = layout, rnd, end
        self.pending, self.done, self.cookies = [], set(), 0
        self.asked = 0

    def aio_block_status(self, length, offset, extent):
        self.cookies += 1
        self.asked += 1
        self.pending.append((self.cookies, length, offset, extent))
        return self.cookies

    def _answer(self, length, offset, extent):
        for context, field in (("base:allocation", 2), (DEPTH, 3)):
            choice = self.rnd.random()
            if choice < 0.3:  # short of the request (at least one byte)
                stop = self.rnd.randrange(offset + 1, offset + length + 1)
            elif choice < 0.5:  # past it, to anywhere up to the end
                stop = self.rnd.randrange(offset + length, self.end + 1)
            else:
                stop = offset + length
            entries, pos = [], offset
            for start, end, *values in self.layout:
                lo, hi = max(start, pos), min(end, stop)
                while lo < hi:  # split at random: a server may say one run in pieces
                    cut = min(hi, lo + self.rnd.choice([UNIT, 4 * UNIT, hi - lo]))
                    entries += [cut - lo, values[field - 2]]
                    lo = cut
                pos = max(pos, min(end, stop))
            extent(context, offset, entries, 0)

    def poll(self, timeout):
        assert self.pending, "waited on with nothing asked: a wait for ever"
        cookie, *request = self.pending.pop(0)
        self._answer(*request)
        self.done.add(cookie)

    def aio_command_completed(self, cookie):
        if cookie in self.done:
            self.done.discard(cookie)
            return True
        return False


def _layout(rnd: random.Random, end: int):
    out, pos = [], 0
    while pos < end:
        n = min(end - pos, rnd.choice([1, 3, 40, 5000]) * UNIT)
        out.append((pos, pos + n, rnd.choice([0, 2, 3]), rnd.choice([0, 1, 2])))
        pos += n
    return out


def _truth(layout, start: int, end: int, layer: bool, fresh: bool):
    out = []
    for a, b, flags, level in layout:
        a, b = max(a, start), min(b, end)
        if a >= b:
            continue
        zero = bool(flags & 2)
        if layer and level != 1:
            kind = nbd.HOLE if zero else nbd.READ
        elif zero:
            kind = nbd.ZERO if (layer or not fresh) else nbd.HOLE
        else:
            kind = nbd.DATA
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + b - a, kind)
        else:
            out.append((a, b - a, kind))
    return out


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2 ** 32), gib=st.sampled_from([1, 5, 9, 40]),
       start_at=st.floats(0, 0.9), layer=st.booleans(), fresh=st.booleans())
def test_the_plan_is_the_layout_whatever_the_answers(seed, gib, start_at, layer, fresh):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nbd, "STATUS_MAX", 1 << 30)  # several spans even in a small disk
        _check(seed, gib, start_at, layer, fresh)


def _check(seed, gib, start_at, layer, fresh):
    rnd = random.Random(seed)
    end = gib * (1 << 30) + rnd.choice([0, 512, UNIT])
    layout = _layout(rnd, end)
    start = int(start_at * end) // 512 * 512
    h = FakeExport(layout, rnd, end)
    got = list(nbd.plan(h, start, end, layer=layer, fresh=fresh))
    assert got == _truth(layout, start, end, layer, fresh)
