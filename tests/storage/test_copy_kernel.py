"""copy_range on real files: identical bytes, holes kept, durable-before-checkpoint, stop,
fencing, and I/O errors (through the fault seam) that come out as clear agent errors."""

from __future__ import annotations

import errno
import os
import random

import pytest

from agent.errors import GenerationMismatch, NoSpace, OperationFailed
from agent.storage.copy import kernel
from agent.storage.copy.kernel import (
    CopyStopped,
    MiB,
    copy_range,
)
from tests.support.storage_flow import cached_bytes, sha256, sparse_extents


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
    """Opens source and (pre-sized, sparse) destination and records what the engine reports."""

    def __init__(self, src, dst, size):
        self.src_fd = os.open(src, os.O_RDONLY)
        self.dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.dst_fd, size)
        self.size = size
        self.events: list[tuple[str, int]] = []
        self.accept = True
        self.stop_at = None
        self.offset = self.moved = None

    def checkpoint(self, offset):
        self.events.append(("checkpoint", offset))
        return self.accept

    def progress(self, offset, moved):
        self.offset, self.moved = offset, moved

    def should_stop(self):
        return self.stop_at is not None and (self.offset or 0) >= self.stop_at

    def run(self, start=0, **kw):
        return copy_range(self.src_fd, self.dst_fd, start, self.size, checkpoint=self.checkpoint,
                          progress=self.progress, should_stop=self.should_stop, **kw)

    def close(self):
        os.close(self.src_fd)
        os.close(self.dst_fd)


@pytest.fixture
def copies():
    made = []

    def make(src, dst, size):
        made.append(Copy(src, dst, size))
        return made[-1]

    yield make
    for c in made:
        c.close()


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


def test_falls_back_when_the_kernel_cannot_copy(tmp_path, copies, monkeypatch):
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
    c = copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)
    assert calls == ["copy_file_range", "sendfile"]  # each refused once, then not tried again


def test_sendfile_fallback_copies_too(tmp_path, copies, monkeypatch):
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "nope")))
    size = 3 * MiB + 7
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    assert c.run(chunk=MiB) == size
    assert sha256(tmp_path / "dst") == sha256(src)


def test_nothing_left_to_copy(tmp_path, copies):
    src = make_file(tmp_path / "src", MiB)
    c = copies(src, tmp_path / "dst", MiB)
    assert c.run(start=MiB) == MiB
    assert c.events == []


@pytest.mark.parametrize("read_back", ["all", "nothing"])
def test_a_copy_drops_the_destination_pages_it_made_durable_and_the_checksum_read(
        tmp_path, copies, read_back):
    """After each checkpoint the destination's pages below it, and below what the checksum
    has read back (`hashed()`), are dropped: a copy holds about a checkpoint's worth of the
    page cache, never its whole size (fresh pages cost more than reused ones: the kernel
    module's docstring); what the checksum has yet to read is kept for it."""
    size = 64 * MiB
    src = make_file(tmp_path / "src", size)
    c = copies(src, tmp_path / "dst", size)
    hashed = None if read_back == "all" else (lambda: 0)
    c.run(chunk=MiB, checkpoint_bytes=8 * MiB, checkpoint_seconds=3600, hashed=hashed)
    cached = cached_bytes(tmp_path / "dst")  # before the comparison reads it all back
    assert sha256(tmp_path / "dst") == sha256(src)
    assert cached <= 8 * MiB if read_back == "all" else cached >= size // 2
