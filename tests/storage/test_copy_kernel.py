"""copy_range on real files: identical bytes, holes kept, durable-before-checkpoint, stop,
fencing, and I/O errors (through the fault seam) that come out as clear agent errors; each
with both movers, copy_file_range's (through the page cache) and O_DIRECT's (copy/direct.py,
which also hashes what it writes)."""

from __future__ import annotations

import errno
import os
import random

import pytest

from agent.errors import GenerationMismatch, NoSpace, OperationFailed
from agent.storage.checksum import StreamFollower, file_checksum
from agent.storage.copy import direct, kernel
from agent.storage.copy.kernel import (
    CopyStopped,
    MiB,
    copy_range,
)
from tests.support.storage_flow import cached_bytes, evict, sha256, sparse_extents


def make_file(path, size, islands=None, seed=1):
    """A file of ``size`` bytes: random throughout, or a sparse file with random ``islands``."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        if islands is None:
            f.write(rnd.randbytes(size))
        else:
            f.truncate(size)
            for start, end in islands:
                f.seek(start)
                f.write(rnd.randbytes(end - start))
    return str(path)


class Copy:
    """Opens source and (pre-sized, sparse) destination and records what the engine reports.
    `mover` "direct": each run through a DirectMover, hashing what it writes when it starts
    at 0 (`digest`)."""

    def __init__(self, src, dst, size, mover="kernel"):
        self.src_fd = os.open(src, os.O_RDONLY)
        self.dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.dst_fd, size)
        self.paths, self.mover, self.digest = (str(src), str(dst)), mover, None
        self.size = size
        self.events: list[tuple[str, int]] = []
        self.accept = True
        self.stop_at = None
        self.offset = self.moved = None
        self.used = None  # the last run's DirectMover

    def checkpoint(self, offset):
        self.events.append(("checkpoint", offset))
        return self.accept

    def progress(self, offset, moved):
        self.offset, self.moved = offset, moved

    def should_stop(self):
        return self.stop_at is not None and (self.offset or 0) >= self.stop_at

    def run(self, start=0, **kw):
        if self.mover == "kernel":
            return copy_range(self.src_fd, self.dst_fd, start, self.size,
                              checkpoint=self.checkpoint, progress=self.progress,
                              should_stop=self.should_stop, **kw)
        hasher = StreamFollower(self.size) if start == 0 else None
        fds = [direct._open_direct(p, f) for p, f in zip(self.paths, (os.O_RDONLY, os.O_WRONLY))]
        assert None not in fds, "the test's file system has no O_DIRECT"
        self.used = direct.DirectMover(self.src_fd, self.dst_fd, *fds, hasher,
                                       kw.get("chunk", 16 * MiB))
        try:
            done = copy_range(self.src_fd, self.dst_fd, start, self.size,
                              checkpoint=self.checkpoint, progress=self.progress,
                              should_stop=self.should_stop, mover=self.used, **kw)
            if hasher is not None:
                self.digest = hasher.result()
            return done
        finally:
            self.used.close()
            if hasher is not None:
                hasher.cancel()

    def close(self):
        os.close(self.src_fd)
        os.close(self.dst_fd)


def _copies(mover):
    """A maker of copies by `mover`, closed after the test; what a direct mover hashed is
    checked against what the file holds."""
    made = []

    def make(src, dst, size):
        made.append(Copy(src, dst, size, mover))
        return made[-1]

    yield make
    for c in made:
        if c.digest is not None:
            assert c.digest == file_checksum(c.paths[1])
        c.close()


@pytest.fixture(params=["kernel", "direct"])
def copies(request):
    """Copies by either mover: every behaviour below holds for both."""
    yield from _copies(request.param)


@pytest.fixture
def kernel_copies():
    yield from _copies("kernel")


@pytest.fixture
def direct_copies():
    yield from _copies("direct")


@pytest.fixture
def faults(monkeypatch):
    """Records every seam call in order; set .raise_on = (kind, errno) to inject a fault."""
    class Seam:
        log: list = []
        raise_on = None

        def __call__(self, kind, offset):
            if self.raise_on and self.raise_on[0] == kind:
                raise OSError(self.raise_on[1], os.strerror(self.raise_on[1]))
            self.log.append((kind, offset))

    seam = Seam()
    seam.log = []
    monkeypatch.setattr(kernel, "_fault", seam)
    return seam


def test_copy_is_byte_identical(tmp_path, copies):
    size = 5 * MiB + 12345
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)
    assert c.offset == size


def test_holes_stay_holes(tmp_path, copies):
    size = 64 * MiB
    islands = [(MiB, MiB + 64 * 1024), (10 * MiB, 10 * MiB + 320 * 1024), (40 * MiB, 42 * MiB),
               (63 * MiB, 64 * MiB)]
    src = make_file(tmp_path / "src", size, islands)
    c = copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert c.moved == sum(e - s for s, e in islands)  # what the rate limit paces
    dst = tmp_path / "dst"
    assert os.path.getsize(dst) == size
    assert os.stat(dst).st_blocks * 512 <= 4 * MiB  # 3.4 MiB of data in a 64 MiB file
    with open(src, "rb") as s, open(dst, "rb") as d:
        assert sparse_extents(d.fileno(), size) == sparse_extents(s.fileno(), size) == islands
    assert sha256(dst) == sha256(src)


def test_resume_from_a_middle_offset_gives_identical_data(tmp_path, copies):
    size = 6 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    c.stop_at = 2 * MiB
    with pytest.raises(CopyStopped) as e:
        c.run(chunk=512 * 1024)
    resume = e.value.offset
    assert 2 * MiB <= resume < size and c.events[-1] == ("checkpoint", resume)
    # Whatever a crash left after the checkpoint is rewritten by the resumed copy.
    os.pwrite(c.dst_fd, b"\xee" * MiB, resume)
    c.stop_at = None
    assert c.run(start=resume, chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)


def test_checkpoints_rise_and_each_follows_an_fdatasync(tmp_path, copies, faults, monkeypatch):
    size = 8 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    # One timeline of seam calls, real fdatasync calls and checkpoints, in call order.
    c.events = timeline = faults.log
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (timeline.append(("fdatasync", fd)), real_fdatasync(fd))[1])
    c.run(chunk=256 * 1024, checkpoint_bytes=MiB, checkpoint_seconds=1e9)
    checkpoints = [(k, o) for k, (kind, o) in enumerate(timeline) if kind == "checkpoint"]
    assert [o for _, o in checkpoints] == [MiB * i for i in range(1, 9)]
    for k, offset in checkpoints:
        assert timeline[k - 2:k] == [("fsync", offset), ("fdatasync", c.dst_fd)]
    assert timeline[-2:] == [("fsync", size), ("fdatasync", c.dst_fd)]  # final flush


def test_checkpoint_by_time(tmp_path, copies):
    size = 4 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    ticks = iter(range(1000))
    c.run(chunk=MiB, checkpoint_bytes=1 << 40, checkpoint_seconds=2, clock=lambda: next(ticks))
    assert [o for _, o in c.events] == [2 * MiB, 4 * MiB]


def test_should_stop_makes_data_durable_checkpoints_and_raises(tmp_path, copies, faults):
    size = 4 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    c.stop_at = MiB
    with pytest.raises(CopyStopped) as e:
        c.run(chunk=MiB, checkpoint_bytes=1 << 40, checkpoint_seconds=1e9)
    assert e.value.offset == MiB
    assert c.events == [("checkpoint", MiB)]
    assert faults.log[-1] == ("fsync", MiB)
    assert [o for kind, o in faults.log if kind == "copy"] == [0]  # no chunk after the stop


def test_superseded_checkpoint_raises_and_stops_writing(tmp_path, copies, faults):
    size = 4 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    c.accept = False
    with pytest.raises(GenerationMismatch) as e:
        c.run(chunk=MiB, checkpoint_bytes=MiB, checkpoint_seconds=1e9)
    assert e.value.data["offset"] == MiB
    assert faults.log == [("copy", 0), ("fsync", MiB)]


def test_enospc_becomes_nospace(tmp_path, copies, faults):
    size = 2 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    faults.raise_on = ("copy", errno.ENOSPC)
    with pytest.raises(NoSpace) as e:
        c.run(chunk=MiB)
    assert e.value.data == {"errno": "ENOSPC", "offset": 0}
    assert c.events == []


def test_eio_on_fdatasync_fails_clearly_and_never_checkpoints(tmp_path, copies, faults):
    size = 2 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    faults.raise_on = ("fsync", errno.EIO)
    with pytest.raises(OperationFailed, match="Input/output error") as e:
        c.run(chunk=MiB, checkpoint_bytes=MiB)
    assert e.value.data == {"errno": "EIO", "offset": MiB}
    assert c.events == []


def test_falls_back_when_the_kernel_cannot_copy(tmp_path, kernel_copies, monkeypatch):
    calls = []

    def refuse(name, code):
        def fn(*args, **kw):
            calls.append(name)
            raise OSError(code, os.strerror(code))
        return fn

    monkeypatch.setattr(os, "copy_file_range", refuse("copy_file_range", errno.EXDEV))
    monkeypatch.setattr(os, "sendfile", refuse("sendfile", errno.EINVAL))
    size = 3 * MiB + 7
    src = make_file(tmp_path / "src", size)
    c = kernel_copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)
    assert calls == ["copy_file_range", "sendfile"]  # each refused once, then not tried again


def test_sendfile_fallback_copies_too(tmp_path, kernel_copies, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "nope")))
    size = 3 * MiB + 7
    src = make_file(tmp_path / "src", size)
    c = kernel_copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)


def test_nothing_left_to_copy(tmp_path, copies):
    src = make_file(tmp_path / "src", MiB)
    c = copies(src, tmp_path / "dst", MiB)
    assert c.run(start=MiB) == MiB
    assert c.events == []


@pytest.mark.parametrize("read_back", ["all", "nothing"])
def test_a_copy_drops_the_destination_pages_it_made_durable_and_the_checksum_read(
        tmp_path, kernel_copies, read_back):
    """After each checkpoint the destination's pages below it, and below what the checksum
    has read back (`hashed()`), are dropped: a copy holds about a checkpoint's worth of the
    page cache, never its whole size (fresh pages cost more than reused ones: the kernel
    module's docstring); what the checksum has yet to read is kept for it."""
    size = 64 * MiB
    src = make_file(tmp_path / "src", size)
    c = kernel_copies(src, tmp_path / "dst", size)
    hashed = None if read_back == "all" else (lambda: 0)
    c.run(chunk=MiB, checkpoint_bytes=8 * MiB, checkpoint_seconds=3600, hashed=hashed)
    cached = cached_bytes(tmp_path / "dst")  # before the comparison reads it all back
    assert sha256(tmp_path / "dst") == sha256(src)
    assert cached <= 8 * MiB if read_back == "all" else cached >= size // 2


def test_a_failed_write_is_never_checkpointed_past(tmp_path, copies, monkeypatch):
    """A write that fails after others succeeded (the direct mover's on its writer thread,
    found only when its buffer is wanted again or before a flush) ends the copy with its
    error and its offset; no checkpoint reaches it."""
    size = 8 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)

    def seam(kind, offset):
        if kind == "copy" and offset == 5 * MiB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(kernel, "_fault", seam)
    with pytest.raises(NoSpace) as e:
        c.run(chunk=MiB, checkpoint_bytes=2 * MiB, checkpoint_seconds=1e9)
    assert e.value.data == {"errno": "ENOSPC", "offset": 5 * MiB}
    assert c.events == [("checkpoint", 2 * MiB), ("checkpoint", 4 * MiB)]


def test_a_direct_copy_caches_neither_file_and_hashes_the_bytes_it_wrote(tmp_path,
                                                                          direct_copies):
    size = 24 * MiB + 1234  # a last piece shorter than a block: through the page cache
    islands = [(0, 3 * MiB), (5 * MiB + 64 * 1024, 9 * MiB), (20 * MiB, size)]
    src = evict(make_file(tmp_path / "src", size, islands))
    c = direct_copies(src, tmp_path / "dst", size)
    assert c.run(chunk=2 * MiB) == size
    assert cached_bytes(src) <= 4096 and cached_bytes(tmp_path / "dst") <= 4096
    assert c.digest == file_checksum(src)  # holes hashed as zeros where they lie
    assert sha256(tmp_path / "dst") == sha256(src)
    assert c.used.direct is not None  # nothing refused O_DIRECT


@pytest.mark.parametrize("refused", ["read", "write"])
def test_o_direct_refused_on_a_piece_goes_through_the_page_cache(tmp_path, direct_copies,
                                                                 monkeypatch, refused):
    """A file system may take O_DIRECT at open and refuse a piece (EINVAL: an alignment it
    wants larger): that piece and the rest go through the page cache, nothing lost."""
    size = 6 * MiB
    src = evict(make_file(tmp_path / "src", size))
    c = direct_copies(src, tmp_path / "dst", size)
    real = {"read": os.preadv, "write": os.pwrite}[refused]
    calls = []

    def refuse(fd, *args):
        direct_fd = c.used.fds[0 if refused == "read" else 1]
        calls.append(fd == direct_fd)
        if fd == direct_fd:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, *args)

    monkeypatch.setattr(os, "preadv" if refused == "read" else "pwrite", refuse)
    assert c.run(chunk=MiB) == size
    monkeypatch.undo()  # the direct descriptor's number is free again: not refused
    assert sha256(tmp_path / "dst") == sha256(src) and c.digest == file_checksum(src)
    assert calls[0] is True and calls.count(True) == 1 and c.used.direct is None


def test_which_copies_go_around_the_page_cache(tmp_path):
    size = 8 * MiB
    cold = evict(make_file(tmp_path / "cold", size, [(4 * MiB, 5 * MiB)]))
    warm = make_file(tmp_path / "warm", size)
    empty = make_file(tmp_path / "empty", size, [])
    dst = tmp_path / "dst"
    dst.touch()
    fds = {p: os.open(p, os.O_RDONLY) for p in (cold, warm, empty, str(dst))}
    try:
        def choose(src, start=0, record=True):
            if src == cold:  # its probe may have started a readahead
                evict(cold)
            mover, hasher = direct.chosen(src, str(dst), fds[src], fds[str(dst)], start, size,
                                          record, MiB)
            if mover is not None:
                mover.close()
            if hasher is not None:
                hasher.cancel()
            return (type(mover).__name__ if mover else None, hasher is not None)

        assert choose(cold) == ("DirectMover", True)  # probed at its first data, not at 0
        assert choose(cold, record=False) == ("DirectMover", False)
        assert choose(warm) == (None, False)  # cached: copy_file_range is faster
        assert choose(empty) == (None, False)  # nothing to read
        # A resume with a checksum reads the prefix back from the destination: not direct.
        assert choose(cold, start=MiB) == (None, False)
        assert choose(cold, start=MiB, record=False) == ("DirectMover", False)
    finally:
        for fd in fds.values():
            os.close(fd)
