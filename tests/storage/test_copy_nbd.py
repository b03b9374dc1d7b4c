"""The NBD copy engine (agent/storage/copy/nbd.py) on real qemu-nbd exports: a copy stopped
anywhere and resumed from its checkpoint ends with the same bytes and the same checksum as
one that ran through, and that checksum is the raw file's."""

import contextlib
import errno
import json
import os
import random
import select
import subprocess
import time

import pytest

from agent import errors
from agent.storage import checksum, qemu_nbd
from agent.storage.copy import kernel, nbd, sink
from agent.storage.copy.kernel import CopyStopped
from tests.images.chains import needs_qemu
from tests.support.harness import wait_for

pytestmark = needs_qemu
MiB = 1 << 20
SIZE = 48 * MiB


def opts(path: str, driver: str) -> str:
    return f"driver={driver},file.driver=file,file.filename={path}"


@pytest.fixture
def source(tmp_path):
    """A qcow2 of data, zeros written as zeros, zero clusters and never-written holes."""
    path = str(tmp_path / "src.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)], check=True)
    rnd = random.Random(5)
    cmds = []
    for i in range(24):
        off = rnd.randrange(0, SIZE // 65536) * 65536
        n = min(rnd.choice([64 * 1024, MiB, 3 * MiB]), SIZE - off)
        kind = rnd.choice(["write -P %d" % rnd.randrange(1, 255), "write -z", "write -P 0"])
        cmds += ["-c", f"{kind} {off} {n}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True,
                   stdout=subprocess.DEVNULL)
    raw = str(tmp_path / "src.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw], check=True)
    return path, raw


@contextlib.contextmanager
def writing(dst_path: str, how: str, punch: bool = True):
    """The copy's sink: the destination's own qemu-nbd ("raw", "qcow2"), or a raw file
    written directly ("file")."""
    if how == "file":
        out = sink.FileSink(dst_path, punch=punch)
        try:
            yield out
        finally:
            out.close()
        return
    with qemu_nbd.export(opts(dst_path, how), writable=True) as d:
        yield sink.NbdSink(d, punch)


def copy(src, dst_path, how, start, fresh, stop_after=None):
    hasher = checksum.StreamHasher(SIZE)
    calls, points = [0], []

    def should_stop():
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after
    if start:
        fmt = "qcow2" if how == "qcow2" else "raw"
        with qemu_nbd.export(opts(dst_path, fmt)) as d:
            nbd.hash_prefix(d, start, hasher)
    with qemu_nbd.export(opts(src, "qcow2")) as s, writing(dst_path, how) as d:
        try:
            nbd.copy_image(s, d, start, SIZE, layer=False, fresh=fresh, hasher=hasher,
                           checkpoint=lambda o: points.append(o) or True,
                           progress=lambda o, m: None, should_stop=should_stop,
                           chunk=MiB, checkpoint_bytes=2 * MiB)
        except CopyStopped as stop:
            return stop.offset, points, None
    return SIZE, points, hasher.hexdigest()


@pytest.mark.parametrize("how", ["raw", "qcow2", "file"])
@pytest.mark.parametrize("stop_after", [1, 3, 7, 15])
def test_stopped_anywhere_and_resumed_it_ends_equal_with_the_files_checksum(
        tmp_path, source, how, stop_after):
    src, raw = source
    fmt = "qcow2" if how == "qcow2" else "raw"
    dst = str(tmp_path / f"dst.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, dst, str(SIZE)], check=True)
    at, points, digest = copy(src, dst, how, 0, True, stop_after)
    assert digest is None and points and points[-1] == at  # stopped after a checkpoint
    end, _, digest = copy(src, dst, how, at, False)
    assert end == SIZE
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, src, dst],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    assert digest == checksum.file_checksum(raw)  # the guest view's sha256-4m
    if fmt == "raw":  # thin: no more allocated than the data the source holds
        held = sum(e["length"] for e in json.loads(subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", src], capture_output=True,
            text=True, check=True).stdout) if e["data"])
        assert os.stat(dst).st_blocks * 512 <= held + 4 * MiB


def test_a_hole_costs_neither_checkpoints_nor_a_request_per_gib(tmp_path):
    """An empty 64 GiB qcow2 copied with checkpoints due every MiB of data: no checkpoint
    (no data moved, and the time trigger far away), no data for the rate limit to pace,
    one block status request per 4 GiB, one piece for the whole hole, and the checksum of
    64 GiB of zeros."""
    size = 64 << 30
    src, dst = str(tmp_path / "empty.qcow2"), str(tmp_path / "dst.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, str(size)], check=True)
    open(dst, "wb").truncate(size)
    hasher, points, seen, moved = checksum.StreamHasher(size), [], [], []
    with qemu_nbd.export(opts(src, "qcow2")) as s, writing(dst, "file") as d:
        real = s.h.aio_block_status

        def counted(*args, **kw):
            seen.append(args[0])
            return real(*args, **kw)
        s.h.aio_block_status = counted
        nbd.copy_image(s, d, 0, size, layer=False, fresh=True, hasher=hasher,
                       checkpoint=lambda o: points.append(o) or True,
                       progress=lambda o, m: moved.append(m), should_stop=lambda: False,
                       checkpoint_bytes=MiB, checkpoint_seconds=3600)
    assert set(moved) == {0}  # nothing for the rate limit to pace
    assert points == [] and 0 < len(seen) <= size // (4 << 30) + 1, (points, len(seen))
    zeros = checksum.StreamHasher(size)
    zeros.zeros(size)
    assert hasher.hexdigest() == zeros.hexdigest()
    assert os.stat(dst).st_blocks == 0


def _guest(path: str, fmt: str) -> bytes:
    return subprocess.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"if={path}",
                           "of=/dev/stdout"], capture_output=True, check=True).stdout


@pytest.mark.parametrize("how", ["raw", "file"])
@pytest.mark.parametrize("punch", [True, False])
def test_a_destination_holding_other_bytes_ends_equal_and_as_thin_as_asked(
        tmp_path, source, how, punch):
    """A destination an earlier life wrote (not fresh) holds bytes everywhere: every zero
    and hole of the source is zeroed over them, punched (thin) or kept allocated (a
    preallocated destination stays whole)."""
    src, raw = source
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.write(os.urandom(SIZE))
    with qemu_nbd.export(opts(src, "qcow2")) as s, writing(dst, how, punch) as d:
        nbd.copy_image(s, d, 0, SIZE, layer=False, fresh=False, hasher=None,
                       checkpoint=lambda o: True, progress=lambda o, m: None,
                       should_stop=lambda: False, chunk=MiB)
    with open(dst, "rb") as f, open(raw, "rb") as g:
        assert f.read() == g.read()
    held = os.stat(dst).st_blocks * 512
    assert held < SIZE if punch else held >= SIZE


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("kind", ["copy", "fsync"])
def test_a_file_destinations_write_or_flush_failing_is_the_agents_error(
        tmp_path, source, monkeypatch, fault, kind):
    """A raw destination's write (in a writer thread) or fdatasync failing ends the copy
    with NoSpace or OperationFailed at its offset, raised in the copy's own thread, with
    no checkpoint past the failure (the kernel's fault seam: a full disk cannot be made
    on demand here)."""
    src, _ = source
    dst = str(tmp_path / "dst.raw")
    open(dst, "wb").truncate(SIZE)
    failing_at = 8 * MiB

    def fail(k, offset):
        if k == kind and offset >= failing_at:
            raise OSError(fault, os.strerror(fault))
    monkeypatch.setattr(kernel, "_fault", fail)
    points = []
    want = errors.NoSpace if fault == errno.ENOSPC else errors.OperationFailed
    with qemu_nbd.export(opts(src, "qcow2")) as s, writing(dst, "file") as d:
        with pytest.raises(want) as exc:
            nbd.copy_image(s, d, 0, SIZE, layer=False, fresh=True, hasher=None,
                           checkpoint=lambda o: points.append(o) or True,
                           progress=lambda o, m: None, should_stop=lambda: False, chunk=MiB,
                           checkpoint_bytes=MiB)
    failed = exc.value.data["offset"]
    assert failed >= failing_at
    # No checkpoint claims the failed write (its piece starts at `failed`) or the failed
    # flush (at `failed`, the end of what it covered).
    assert all(p <= failed for p in points) if kind == "copy" else \
        all(p < failing_at for p in points)


def test_a_file_sinks_wake_up_comes_only_once_its_write_is_done(tmp_path, monkeypatch):
    """The poll loop sleeps on the sink's descriptor: once it is readable, the write that
    made it so is completed (woken before, the loop found it not done and slept out its
    whole poll timeout: a second a copy, now and then). The writer thread is held a while
    right after it wakes the loop, so a wake-up that came too early is seen."""
    real = os.eventfd_write

    def slow_after(fd, value):
        real(fd, value)
        time.sleep(0.02)
    monkeypatch.setattr(os, "eventfd_write", slow_after)
    dst = str(tmp_path / "dst.raw")
    open(dst, "wb").truncate(4 * MiB)

    class Piece:
        offset, length = 0, 64 * 1024
    out = sink.FileSink(dst)
    try:
        Piece.view = out.buffer(Piece.length)
        for _ in range(20):
            cookie = out.write(Piece)
            fd, events = out.wants()
            poller = select.poll()
            poller.register(fd, events)
            assert poller.poll(10_000)
            out.ready()
            assert out.completed(cookie)
        assert out.wants() is None
    finally:
        out.close()


def _open_files(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


@pytest.mark.timeout(60)
def test_an_export_started_and_never_connected_leaves_nothing(source):
    """A copy starts its source's qemu-nbd while it opens the destination; if that fails,
    the source was never connected to, waits for a client that will not come, and is
    killed: no process, no socket directory left. One that is connected reads."""
    path, raw = source
    exp = qemu_nbd.Export(opts(path, "qcow2"), writable=False).start()
    proc, where = exp.proc, exp.dir
    # It has the image open, waiting for its client: started for real.
    wait_for(lambda: path in _open_files(proc.pid), 10, what="qemu-nbd with the image open")
    assert proc.poll() is None and os.path.exists(os.path.join(where, "sock"))
    exp.close()
    assert proc.poll() is not None and not os.path.exists(where)
    exp.close()  # twice: nothing more to do
    with contextlib.closing(qemu_nbd.Export(opts(path, "qcow2"), writable=False)
                            .start()) as exp:
        assert exp.connect().size() == SIZE
        with open(raw, "rb") as f:
            assert all(exp.h.pread(MiB, off) == f.read(MiB) for off in range(0, SIZE, MiB))
