"""The NBD copy engine (agent/storage/copy/nbd.py) on real qemu-nbd exports: a copy stopped
anywhere and resumed from its checkpoint ends with the same bytes and the same checksum as
one that ran through, and that checksum is the raw file's."""

import json
import os
import random
import subprocess

import pytest

from agent.storage import checksum, qemu_nbd
from agent.storage.copy import nbd
from agent.storage.copy.kernel import CopyStopped
from tests.images.chains import needs_qemu

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


def copy(src, dst_path, fmt, start, fresh, stop_after=None):
    hasher = checksum.StreamHasher(SIZE)
    calls, points = [0], []

    def should_stop():
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after
    with qemu_nbd.export(opts(src, "qcow2")) as s, \
            qemu_nbd.export(opts(dst_path, fmt), writable=True) as d:
        if start:
            nbd.hash_prefix(d, start, hasher)
        try:
            nbd.copy_image(s, d, start, SIZE, layer=False, fresh=fresh, hasher=hasher,
                                 checkpoint=lambda o: points.append(o) or True,
                                 progress=lambda o: None, should_stop=should_stop,
                                 chunk=MiB, checkpoint_bytes=2 * MiB)
        except CopyStopped as stop:
            return stop.offset, points, None
    return SIZE, points, hasher.hexdigest()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("stop_after", [1, 3, 7, 15])
def test_stopped_anywhere_and_resumed_it_ends_equal_with_the_files_checksum(
        tmp_path, source, fmt, stop_after):
    src, raw = source
    dst = str(tmp_path / f"dst.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, dst, str(SIZE)], check=True)
    at, points, digest = copy(src, dst, fmt, 0, True, stop_after)
    assert digest is None and points and points[-1] == at  # stopped after a checkpoint
    end, _, digest = copy(src, dst, fmt, at, False)
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
    (no data moved, and the time trigger far away), one block status request per 4 GiB, one
    piece for the whole hole, and the checksum of 64 GiB of zeros."""
    size = 64 << 30
    src, dst = str(tmp_path / "empty.qcow2"), str(tmp_path / "dst.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, str(size)], check=True)
    open(dst, "wb").truncate(size)
    hasher, points, seen = checksum.StreamHasher(size), [], []
    with qemu_nbd.export(opts(src, "qcow2")) as s, \
            qemu_nbd.export(opts(dst, "raw"), writable=True) as d:
        real = s.h.block_status

        def counted(*args, **kw):
            seen.append(args[0])
            return real(*args, **kw)
        s.h.block_status = counted
        nbd.copy_image(s, d, 0, size, layer=False, fresh=True, hasher=hasher,
                       checkpoint=lambda o: points.append(o) or True, progress=lambda o: None,
                       should_stop=lambda: False, checkpoint_bytes=MiB,
                       checkpoint_seconds=3600)
    assert points == [] and 0 < len(seen) <= size // (4 << 30) + 1, (points, len(seen))
    zeros = checksum.StreamHasher(size)
    zeros.zeros(size)
    assert hasher.hexdigest() == zeros.hexdigest()
    assert os.stat(dst).st_blocks == 0
