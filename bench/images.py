"""qcow2 chains: Image.copy collapsing a chain (2 GiB virtual, about half allocated, a base
and two snapshots) to raw and to qcow2, against `qemu-img convert -p -t none -T none` (VDSM's
command) and `nbdcopy` on the same chain, in the same run.

Every side ends with its copy on disk: Image.copy flushes before it reports done;
qemu-img convert with -t none writes O_DIRECT and flushes at its end; nbdcopy is given the
destination through qemu-nbd with cache=none and flushes (--flush). Image.copy runs with the
default configuration: resumable (checkpointed) and recording its checksum.

  qcow2_raw    the chain collapsed to raw
  qcow2_cow    the chain collapsed to qcow2
  qcow2_chain  the chain copied as a chain (Image.copy mode chain), against what VDSM does:
               one `qemu-img convert -t none -T none` per layer, base first, each upper
               layer with -B naming its parent's copy (only what the layer holds is copied)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid

from bench.common import (
    GiB,
    MiB,
    Row,
    Scratch,
    alternate,
    children_cpu,
    evict,
    median,
    paired_ratio,
    ratio,
    task_done,
    tree_cpu,
)
from bench.copy import NOSUM, Domain, _mibs

ROWS = ("qcow2_raw", "qcow2_cow", "qcow2_chain")
DRIVER = {"raw": "raw", "cow": "qcow2"}


def _qemu_io(path: str, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", DRIVER[fmt]]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], check=True, stdout=subprocess.DEVNULL)


def make_chain(dom: Domain, size: int) -> tuple[dict, list[str]]:
    """A base and two snapshots, together about half of `size` allocated: the base holds
    a quarter, each snapshot an eighth of its own (partly over the base's data)."""
    image = str(uuid.uuid4())
    paths, parent = [], None
    for i in range(3):
        loc = dom.loc(image, str(uuid.uuid4()))
        params = {**loc, "format": "cow"}
        params.update({"size": size} if parent is None else {"parentVolumeID": parent})
        dom.rpc.call("Volume.create", params)
        path = dom.rpc.call("Volume.getInfo", loc)["path"]
        stride = 16 * MiB
        writes = []
        for k, off in enumerate(range(0, size, stride)):
            if i == 0 and k % 2 == 0:  # the base: every other 16 MiB (half of it) ...
                writes.append(f"write -P {k % 250 + 1} {off} {stride // 2}")
            if i > 0 and k % 4 == i:  # ... the snapshots: an eighth each, new and over
                writes.append(f"write -P {(k + i) % 250 + 1} {off + stride // 4} "
                              f"{stride // 2}")
        for j in range(0, len(writes), 64):
            _qemu_io(path, "cow", *writes[j:j + 64])
        paths.append(path)
        parent = loc["volumeID"]
    return loc, paths


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run(opts) -> list[Row]:
    wanted = [r for r in ROWS if r in opts.only]
    if not wanted:
        return []
    rows = []
    data = tempfile.mkdtemp(prefix="hab-images-", dir=opts.data_dir)
    with Scratch() as s:
        try:
            agent = s.agent("images").start()
            dom = Domain(agent, os.path.join(data, "domain"))
            plain = s.agent("images-nosum", copy={"record_checksum": False}).start()
            dom.plain = Domain(plain, os.path.join(data, "domain"), dom.id)
            src, paths = make_chain(dom, opts.qcow2)
            for key in wanted:
                if key == "qcow2_chain":
                    rows.append(_chain_row(opts, dom, src, paths, data))
                else:
                    rows.append(_row(opts, dom, src, paths, data,
                                     "raw" if key == "qcow2_raw" else "cow"))
        finally:
            subprocess.run(["rm", "-rf", data], check=False)
    return rows


def _row(opts, dom: Domain, src: dict, paths: list[str], data: str, fmt: str) -> Row:
    size = opts.qcow2
    out = os.path.join(data, "baseline." + DRIVER[fmt])
    leaf = paths[-1]

    def cold():
        for p in paths:
            evict(p)

    cpu = {"ours": [], "convert": [], "nbdcopy": []}  # CPU seconds per GiB of data

    def ours(d=dom):
        cold()
        dst = {**src, "imageID": str(uuid.uuid4()), "volumeID": str(uuid.uuid4())}
        before = tree_cpu(d.pid)
        t = time.perf_counter()
        task = d.rpc.send("Image.copy", {"src": src, "dst": dst, "format": fmt})
        d.events.until(task_done(task), timeout=3600)
        seconds = time.perf_counter() - t
        if d is dom:
            cpu["ours"].append((tree_cpu(d.pid) - before) / (data_bytes / GiB))
        d.rpc.call("Volume.delete", dst)
        return _mibs(size, seconds)

    def timed_cpu(name: str, argv: list[str]) -> float:
        before = children_cpu()
        seconds = _timed(argv)
        cpu[name].append((children_cpu() - before) / (data_bytes / GiB))
        return seconds

    def convert():
        cold()
        seconds = timed_cpu("convert", ["qemu-img", "convert", "-p", "-t", "none", "-T",
                                        "none", "-f", "qcow2", "-O", DRIVER[fmt], leaf, out])
        os.unlink(out)
        return _mibs(size, seconds)

    def nbdcopy():
        cold()
        subprocess.run(["qemu-img", "create", "-q", "-f", DRIVER[fmt], out, str(size)],
                       check=True)
        seconds = timed_cpu("nbdcopy", [
            "nbdcopy", "--flush", "--",
            "[", "qemu-nbd", "-r", "-f", "qcow2", "--cache=none", leaf, "]",
            "[", "qemu-nbd", "-f", DRIVER[fmt], "--cache=none", out, "]"])
        os.unlink(out)
        return _mibs(size, seconds)

    data_bytes = sum(e["length"] for e in json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", leaf], capture_output=True,
        text=True, check=True).stdout) if e["data"])
    a, b, c, n = alternate(opts.repeats, ours, convert, nbdcopy, lambda: ours(dom.plain))
    r = ratio(median(a), median(b))
    return Row(key=f"qcow2_{fmt}", title=f"qcow2 chain {size // MiB} MiB virtual, half "
               f"allocated, collapsed to {DRIVER[fmt]}", unit="MiB/s (virtual size)",
               project=a, baselines={"qemu-img convert -t none -T none": b, "nbdcopy": c,
                                     NOSUM: n},
               ratio=r, ratio_of="Image.copy / qemu-img convert",
               goal=">= 1.0x qemu-img convert, resumable, checksum on",
               met=r is not None and r >= 1.0,
               extra={"paired_ratio": paired_ratio(a, b),
                      "ratio_to_nbdcopy": ratio(median(a), median(c)),
                      "ratio_no_checksum_to_convert": ratio(median(n), median(b)),
                      "cpu_seconds_per_gib_data": {k: median(v) for k, v in cpu.items()},
                      "data_bytes": data_bytes, "bytes": size})


def _chain_row(opts, dom: Domain, src: dict, paths: list[str], data: str) -> Row:
    size = opts.qcow2
    outs = [os.path.join(data, f"layer-{i}.qcow2") for i in range(len(paths))]

    def cold():
        for p in paths:
            evict(p)

    def ours(d=dom):
        cold()
        dst = {**src, "imageID": str(uuid.uuid4()), "volumeID": str(uuid.uuid4())}
        t = time.perf_counter()
        task = d.rpc.send("Image.copy", {"src": src, "dst": dst, "mode": "chain"})
        done = d.events.until(task_done(task), timeout=3600)
        seconds = time.perf_counter() - t
        for volume in reversed(done["params"]["task"]["result"]["chain"]):
            d.rpc.call("Volume.delete", {**dst, "volumeID": volume})
        return _mibs(size, seconds)

    def converts():
        cold()
        t = time.perf_counter()
        for i, (layer, out) in enumerate(zip(paths, outs)):
            over = ["-B", outs[i - 1], "-F", "qcow2"] if i else []
            subprocess.run(["qemu-img", "convert", "-t", "none", "-T", "none", "-f", "qcow2",
                            "-O", "qcow2", *over, layer, out], check=True)
        seconds = time.perf_counter() - t
        for out in outs:
            os.unlink(out)
        return _mibs(size, seconds)

    a, b, n = alternate(opts.repeats, ours, converts, lambda: ours(dom.plain))
    r = ratio(median(a), median(b))
    return Row(key="qcow2_chain", title=f"qcow2 chain {size // MiB} MiB virtual, "
               f"{len(paths)} layers, copied as a chain", unit="MiB/s (virtual size)",
               project=a, baselines={"qemu-img convert per layer (-B its parent's copy)": b,
                                     NOSUM: n},
               ratio=r, ratio_of="Image.copy mode chain / per-layer converts",
               goal=">= 1.0x per-layer qemu-img convert, resumable, checksum on",
               met=r is not None and r >= 1.0,
               extra={"paired_ratio": paired_ratio(a, b), "bytes": size,
                      "ratio_no_checksum_to_converts": ratio(median(n), median(b)),
                      "layers": len(paths)})
