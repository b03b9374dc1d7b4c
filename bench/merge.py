"""Snapshot removal: Image.merge of a top (2 GiB virtual, half allocated) into its raw base
(a quarter allocated), against `qemu-img commit -t none` of the same chain, in one run.

Each sample merges a fresh chain with the same bytes: the base's and the top's files are
copied from templates made once (sparse copies, then the top's backing name set to the
sample's base by `qemu-img rebase -u`); both sides' files are evicted from the page cache
before they start. Image.merge is timed from its request to its task done: the base LEGAL,
flushed, its checksum recorded, the top removed, with the default configuration (resumable,
checksum on). qemu-img commit writes the top into the base with O_DIRECT (-t none) and
flushes at its end; it keeps no checkpoint and records no checksum.

  merge  MiB/s of the top's virtual size (goal >= 1.0x qemu-img commit)
"""

from __future__ import annotations

import os
import shutil
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

ROWS = ("merge",)


def _qemu_io(path: str, fmt: str, writes: list[str]) -> None:
    for j in range(0, len(writes), 128):
        args = ["qemu-io", "-f", fmt]
        for c in writes[j:j + 128]:
            args += ["-c", c]
        subprocess.run(args + [path], check=True, stdout=subprocess.DEVNULL)


def templates(folder: str, size: int) -> tuple[str, str, int]:
    """A raw base with every fourth 16 MiB written and a qcow2 top (backing: base.raw) with
    every other 16 MiB written, half of it over the base's data; the top's data bytes."""
    base, top = os.path.join(folder, "base.raw"), os.path.join(folder, "top.qcow2")
    with open(base, "wb") as f:
        f.truncate(size)
    stride = 16 * MiB
    _qemu_io(base, "raw", [f"write -P {k % 200 + 1} {off} {stride}"
                           for k, off in enumerate(range(0, size, stride)) if k % 4 == 0])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    top, str(size)], check=True, cwd=folder)
    writes = [f"write -P {k % 200 + 51} {off} {stride}"
              for k, off in enumerate(range(0, size, stride)) if k % 2 == 0]
    _qemu_io(top, "qcow2", writes)
    return base, top, len(writes) * stride


def _place(template: str, path: str) -> None:
    subprocess.run(["cp", "--sparse=always", template, path], check=True)


def _merge_row(opts, dom: Domain, folder: str) -> Row:
    size = opts.qcow2
    base_t, top_t, data = templates(folder, size)

    def ours():
        image = str(uuid.uuid4())
        base, top = dom.loc(image, str(uuid.uuid4())), dom.loc(image, str(uuid.uuid4()))
        dom.rpc.call("Volume.create", {**base, "size": size})
        base_path = dom.rpc.call("Volume.getInfo", base)["path"]
        _place(base_t, base_path)
        dom.rpc.call("Volume.create", {**top, "parentVolumeID": base["volumeID"]})
        top_path = dom.rpc.call("Volume.getInfo", top)["path"]
        _place(top_t, top_path)
        subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b",
                        os.path.basename(base_path), "-F", "raw", top_path], check=True)
        evict(base_path)
        evict(top_path)
        t = time.perf_counter()
        task = dom.rpc.send("Image.merge", {"domainID": base["domainID"], "imageID": image,
                                            "baseVolumeID": base["volumeID"],
                                            "topVolumeID": top["volumeID"]})
        dom.events.until(task_done(task), timeout=3600)
        seconds = time.perf_counter() - t
        assert dom.rpc.call("Volume.getInfo", base)["legality"] == "LEGAL"
        dom.delete(base)
        return size / MiB / seconds

    def commit():
        sample = os.path.join(folder, "commit")
        os.makedirs(sample, exist_ok=True)
        base, top = os.path.join(sample, "base.raw"), os.path.join(sample, "top.qcow2")
        _place(base_t, base)
        _place(top_t, top)
        evict(base)
        evict(top)
        t = time.perf_counter()
        subprocess.run(["qemu-img", "commit", "-q", "-t", "none", "-f", "qcow2", top],
                       check=True)
        seconds = time.perf_counter() - t
        shutil.rmtree(sample)
        return size / MiB / seconds

    a, b = alternate(opts.repeats, ours, commit)
    r = ratio(median(a), median(b))
    return Row(key="merge", title=f"a {size // MiB} MiB snapshot, half allocated, merged into "
               f"its raw base (a quarter allocated)", unit="MiB/s (virtual size)", project=a,
               baselines={"qemu-img commit -t none": b}, ratio=r,
               ratio_of="hostagent / qemu-img commit", goal=">= 1.0x qemu-img commit",
               met=r is not None and r >= 1.0,
               extra={"paired_ratio": paired_ratio(a, b), "bytes": size, "data_bytes": data})


def run(opts) -> list[Row]:
    if "merge" not in opts.only:
        return []
    with Scratch() as s, data_dir(opts, "merge") as folder:
        agent = s.agent("merge").start()
        dom = Domain(agent, os.path.join(folder, "domain"))
        return [_merge_row(opts, dom, folder)]
