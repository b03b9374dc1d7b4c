"""Incremental backup: `hostagent backup --incremental` of a cow disk with 5% of it changed
since its bitmap began, against a full `hostagent backup` of the same disk and against
ovirt-imageio's client `download(incremental=True)` through its daemon, on the same kind of
export, side by side in one run.

Every side is timed whole, as a person runs it: ours is the command (a subprocess: its
export, its data, its file synced); imageio's is the export started through the same RPC,
a ticket marked dirty, its client (a subprocess) downloading into a qcow2 on the same
previous backup, the file synced and the export stopped. The disk: `transfer` bytes (2 GiB
in the full profile), half allocated, then a bitmap added and 5% of it rewritten in 1 MiB
pieces spread over the disk; its pages dropped before each sample. No sample starts a
checkpoint, so every sample reads the same dirty set.

  backup_incremental   seconds; goals: at most 10% of the full backup's time, and at
                       least 1.0x imageio's client's speed (its seconds / ours); extra:
                       each side's own data phase (ours: from its export's answer to its
                       file synced; imageio's: its download() call), which leaves out the
                       fixed costs (an interpreter, its imports, the export's start)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import MiB, Row, Scratch, alternate, data_dir, evict, median, ratio
from bench.transfers import Side, _fsync, _show

ROWS = ("backup_incremental",)
IMAGEIO = ("from ovirt_imageio import client; import sys, time; t = time.perf_counter(); "
           "client.download(sys.argv[1], sys.argv[2], None, fmt='qcow2', incremental=True, "
           "backing_file=sys.argv[3], backing_format='qcow2', secure=False); "
           "print(time.perf_counter() - t)")
CHANGED = 0.05


def _disk(side: Side, size: int) -> tuple[dict, str, str, int]:
    """A cow volume half allocated, a full backup of it, bitmap `c` added, then 5% of it
    rewritten; the volume, the full backup's path and the bytes changed."""
    loc = side.new()
    side.dom.rpc.call("Volume.create", {**loc, "size": size, "format": "cow"})
    path = side.dom.rpc.call("Volume.getInfo", loc)["path"]
    stride = 16 * MiB
    writes = [f"write -P {k % 250 + 1} {off} {stride}"
              for k, off in enumerate(range(0, size, stride)) if k % 2 == 0]
    _qemu_io(path, writes)
    full = os.path.join(side.data, "full.qcow2")
    side.hostagent("backup", _show(loc), full)
    side.dom.rpc.call("Bitmap.add", {**loc, "name": "c"})
    pieces = int(size * CHANGED) // MiB
    step = size // pieces // MiB * MiB  # as a guest's file system writes: aligned
    _qemu_io(path, [f"write -P 251 {i * step} {MiB}" for i in range(pieces)])
    return loc, path, full, pieces * MiB


def _qemu_io(path: str, commands: list[str]) -> None:
    for j in range(0, len(commands), 128):
        args = [a for c in commands[j:j + 128] for a in ("-c", c)]
        subprocess.run(["qemu-io", "-f", "qcow2", *args, path], check=True,
                       stdout=subprocess.DEVNULL)


def _row(opts, side: Side) -> Row:
    size = opts.transfer
    loc, path, full, changed = _disk(side, size)
    out = os.path.join(side.data, "out.qcow2")

    def fresh():
        evict(path)
        if os.path.exists(out):
            os.unlink(out)

    moving = {"incremental": [], "full": [], "imageio": []}  # each side's data phase, seconds

    def incremental():
        fresh()
        t = time.perf_counter()
        answer = side.hostagent("backup", _show(loc), out, "--incremental", "c", "--base",
                                full)
        moving["incremental"].append(answer["seconds"])
        return time.perf_counter() - t

    def whole():
        fresh()
        t = time.perf_counter()
        moving["full"].append(side.hostagent("backup", _show(loc), out)["seconds"])
        return time.perf_counter() - t

    def imageio():
        fresh()
        t = time.perf_counter()
        task, exp = side.export({**loc, "bitmap": "c"})
        url = side.imageio.ticket(exp, ["read"], dirty=True)
        done = subprocess.run([sys.executable, "-c", IMAGEIO, url, out, full], check=True,
                              capture_output=True, text=True)
        moving["imageio"].append(float(done.stdout.split()[-1]))
        _fsync(out)
        side.stop(task)
        return time.perf_counter() - t

    a, b, c = alternate(opts.repeats, incremental, imageio, whole)
    speed = ratio(median(b), median(a))  # imageio's seconds / ours: > 1 is faster
    share = ratio(median(a), median(c))
    return Row(key="backup_incremental",
               title=f"incremental backup of a {size // MiB} MiB cow volume with "
                     f"{changed // MiB} MiB ({CHANGED:.0%}) changed", unit="seconds",
               project=a, baselines={"imageio download(incremental) via its daemon": b,
                                     "full hostagent backup": c},
               ratio=speed, ratio_of="imageio's seconds / ours",
               goal="<= 10% of the full backup's time, >= 1.0x imageio's client",
               met=speed is not None and share is not None and speed >= 1.0 and share <= 0.10,
               extra={"share_of_full": share, "bytes": size, "changed_bytes": changed,
                      "data_phase_seconds": moving, "data_phase_share_of_full": ratio(
                          median(moving["incremental"]), median(moving["full"])),
                      "data_phase_imageio_over_ours": ratio(median(moving["imageio"]),
                                                            median(moving["incremental"]))})


def run(opts) -> list[Row]:
    if "backup_incremental" not in opts.only:
        return []
    from tests.support.imageio import Daemon
    with Scratch() as s, data_dir(opts, "backup") as data:
        imageio = Daemon(s.path / "imageio")
        try:
            side = Side(s, data, imageio)
            side.dom_path = os.path.join(data, "domain")
            return [_row(opts, side)]
        finally:
            imageio.stop()

