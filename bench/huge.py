"""Huge sparse disks: copies whose cost must follow their data, not their virtual size. An
empty 8 TiB qcow2 and a 1 TiB qcow2 holding 1 GiB (every 64th MiB of its first 64 GiB),
each copied by Image.copy to raw and to qcow2, against `qemu-img convert -t none -T none` of
the same image, in one run (the source's pages dropped before each sample).

Image.copy is timed from its request to its task done (the destination LEGAL, flushed, its
checksum recorded); convert from its start to its exit. The domain must be able to hold the
data, never the virtual size (the room check counts the data: a copy's destination is
sparse).

  huge_empty_raw, huge_empty_cow   the empty 8 TiB disk
  huge_data_raw, huge_data_cow     the 1 TiB disk holding 1 GiB
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from bench.common import (
    MiB,
    Row,
    Scratch,
    alternate,
    data_dir,
    evict,
    median,
    paired_ratio,
    ratio,
    task_done,
)
from bench.copy import Domain

ROWS = ("huge_empty_raw", "huge_empty_cow", "huge_data_raw", "huge_data_cow")
TiB = 1 << 40


def _source(dom: Domain, size: int, data: bool) -> tuple[dict, str]:
    loc = dom.loc(str(uuid.uuid4()), str(uuid.uuid4()))
    dom.rpc.call("Volume.create", {**loc, "size": size, "format": "cow"})
    path = dom.rpc.call("Volume.getInfo", loc)["path"]
    if data:
        writes = []
        for k in range(1024):
            writes += ["-c", f"write -P {k % 250 + 1} {k * 64 * MiB} {MiB}"]
        for j in range(0, len(writes), 256):
            subprocess.run(["qemu-io", "-f", "qcow2", *writes[j:j + 256], path], check=True,
                           stdout=subprocess.DEVNULL)
    return loc, path


def _row(opts, dom: Domain, folder: str, key: str, src: dict, path: str, size: int) -> Row:
    fmt = key.rsplit("_", 1)[1]

    def ours():
        evict(path)
        dst = dom.loc(str(uuid.uuid4()), str(uuid.uuid4()))
        t = time.perf_counter()
        task = dom.rpc.send("Image.copy", {"src": src, "dst": dst, "format": fmt})
        dom.events.until(task_done(task), timeout=3600)
        seconds = time.perf_counter() - t
        assert dom.rpc.call("Volume.getInfo", dst)["legality"] == "LEGAL"
        dom.delete(dst)
        return seconds

    def convert():
        evict(path)
        out = os.path.join(folder, f"convert.{fmt}")
        t = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-t", "none", "-T", "none", "-f", "qcow2",
                        "-O", "raw" if fmt == "raw" else "qcow2", path, out], check=True)
        seconds = time.perf_counter() - t
        os.unlink(out)
        return seconds

    a, b = alternate(opts.repeats, ours, convert)
    r = ratio(median(b), median(a))  # a speed ratio: convert's time over ours
    what = "an empty 8 TiB" if "empty" in key else "a 1 TiB (1 GiB of data)"
    return Row(key=key, title=f"{what} qcow2 copied to {fmt}", unit="seconds", project=a,
               baselines={"qemu-img convert -t none -T none": b}, ratio=r,
               ratio_of="convert's time / hostagent's", goal="time <= qemu-img convert's",
               met=r is not None and r >= 1.0,
               extra={"paired_ratio": paired_ratio(b, a), "virtual_bytes": size})


def run(opts) -> list[Row]:
    wanted = [r for r in ROWS if r in opts.only]
    if not wanted:
        return []
    rows = []
    with Scratch() as s, data_dir(opts, "huge") as folder:
        agent = s.agent("huge").start()
        dom = Domain(agent, os.path.join(folder, "domain"))
        sources = {}
        for key in wanted:
            kind = "empty" if "empty" in key else "data"
            if kind not in sources:
                size = 8 * TiB if kind == "empty" else TiB
                sources[kind] = (*_source(dom, size, kind == "data"), size)
            rows.append(_row(opts, dom, folder, key, *sources[kind]))
    return rows
