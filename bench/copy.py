"""Copies: Image.copy (request until the task is done: destination LEGAL, data durable)
against cp and dd on the same files, in the same run.

Every side ends with its copy on disk: Image.copy fsyncs before it reports done, so `cp` is
timed as `cp SRC DST && sync DST` (fsync of the copy) and dd with conv=fsync. Destinations
are deleted after each sample. Image.copy runs with the default configuration, which records
the copy's checksum (blake3-4m, hashed right behind the copy from the destination's pages);
a second agent attached to the same domain with [copy] record_checksum = false is measured
beside it. Every row also times the copy as an operator does: `hostagent copy --wait` run
whole, from its start to its exit (its interpreter and imports included: a fixed ~0.15 s
that a 1 GiB copy at memory speed feels and a 4 GiB one does not); the engine's view, the
row's ratio, is from the request to the task done, as a ZeroMQ client sees it.

  copy_cold  dense source, evicted from the page cache (fsync, POSIX_FADV_DONTNEED) before
             every sample; baselines cp, and dd iflag=direct oflag=direct bs=8M (the device)
  copy_warm  dense source read whole into the page cache before every sample; baseline cp
  sparse     a source with 10% data (1 MiB of data every 10 MiB), evicted before every
             sample; baseline cp --sparse=always. Holes kept is checked on both: the copy's
             data extents (SEEK_DATA/SEEK_HOLE) must be the source's.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
import time
import uuid

from bench import common
from bench.common import (
    Events,
    MiB,
    Row,
    Rpc,
    Scratch,
    alternate,
    evict,
    median,
    paired_ratio,
    ratio,
    task_done,
    wait_subscribed,
    warm,
)
from tests.support.storage_flow import sparse_extents

ROWS = ("copy_cold", "copy_warm", "sparse")
CLI = "hostagent copy --wait (as an operator times it)"
NOSUM = "Image.copy, record_checksum=false"
SPARSE_STRIDE = 10 * MiB  # 1 MiB of data at the start of every 10 MiB: 10% data


class Domain:
    """A storage domain made through the agent, and volumes in it."""

    def __init__(self, agent, path: str, domain_id: str | None = None):
        self.endpoints = ["--endpoint", agent.rpc_endpoint,
                          "--events-endpoint", agent.events_endpoint]
        self.pid = agent.proc.pid  # the supervisor: its tree is the agent's whole cost
        self.rpc = Rpc(agent.rpc_endpoint)
        self.events = Events(agent.events_endpoint, "Task.state")
        wait_subscribed(self.events, self.rpc)
        self.id = domain_id or str(uuid.uuid4())
        verb = "StorageDomain.attach" if domain_id else "StorageDomain.create"
        self.rpc.call(verb, {"domainID": self.id, "path": path})

    def loc(self, image: str, volume: str) -> dict:
        return {"domainID": self.id, "imageID": image, "volumeID": volume}

    def create(self, size: int) -> tuple[dict, str]:
        loc = self.loc(str(uuid.uuid4()), str(uuid.uuid4()))
        self.rpc.call("Volume.create", {**loc, "size": size})
        return loc, self.rpc.call("Volume.getInfo", loc)["path"]

    def copy(self, src: dict) -> tuple[float, dict, str]:
        """Seconds from the request to the task done; the destination and its path."""
        dst = {**src, "volumeID": str(uuid.uuid4())}
        t = time.perf_counter()
        task = self.rpc.send("Image.copy", {"src": src, "dst": dst})
        self.events.until(task_done(task), timeout=3600)
        seconds = time.perf_counter() - t
        return seconds, dst, self.rpc.call("Volume.getInfo", dst)["path"]

    def copy_cli(self, src: dict) -> tuple[float, dict, str]:
        """The same copy as an operator times it: `hostagent copy --wait SRC DST` run whole
        (its interpreter, its imports, its connection and subscription, the copy followed to
        LEGAL), from its start to its exit."""
        dst = {**src, "volumeID": str(uuid.uuid4())}
        where = "/".join((src["domainID"], src["imageID"]))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "agent", "copy", "--wait", *self.endpoints,
                        f"{where}/{src['volumeID']}", f"{where}/{dst['volumeID']}"],
                       check=True, stdout=subprocess.DEVNULL, cwd=common.AGENT_REPO)
        seconds = time.perf_counter() - t
        return seconds, dst, self.rpc.call("Volume.getInfo", dst)["path"]

    def delete(self, loc: dict) -> None:
        self.rpc.call("Volume.delete", loc)


def fill_dense(path: str, size: int) -> None:
    block = bytearray(os.urandom(8 * MiB))
    with open(path, "r+b", buffering=0) as f:
        for off in range(0, size, len(block)):
            block[:8] = off.to_bytes(8, "little")  # no two blocks alike
            f.write(block[: min(len(block), size - off)])
        os.fsync(f.fileno())


def fill_sparse(path: str, size: int) -> None:
    block = bytearray(os.urandom(MiB))
    with open(path, "r+b", buffering=0) as f:
        for off in range(0, size, SPARSE_STRIDE):
            block[:8] = off.to_bytes(8, "little")
            f.seek(off)
            f.write(block[: min(MiB, size - off)])
        os.fsync(f.fileno())


def _mibs(size: int, seconds: float) -> float:
    return size / MiB / seconds


def _timed_shell(argv: list[list[str]]) -> float:
    t = time.perf_counter()
    for a in argv:
        subprocess.run(a, check=True)
    return time.perf_counter() - t


def same_extents(a: str, b: str, size: int) -> bool:
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        return sparse_extents(fa, size) == sparse_extents(fb, size)
    finally:
        os.close(fa)
        os.close(fb)


def run(opts) -> list[Row]:
    wanted = [r for r in ROWS if r in opts.only]
    if not wanted:
        return []
    rows = []
    data = tempfile.mkdtemp(prefix="hab-copy-", dir=opts.data_dir)
    with Scratch() as s:
        try:
            agent = s.agent("copy").start()
            dom = Domain(agent, os.path.join(data, "domain"))
            plain = s.agent("nosum", copy={"record_checksum": False}).start()
            dom.plain = Domain(plain, os.path.join(data, "domain"), dom.id)
            if "copy_cold" in wanted or "copy_warm" in wanted:
                src, src_path = dom.create(opts.copy)
                fill_dense(src_path, opts.copy)
                for key in ("copy_cold", "copy_warm"):
                    if key in wanted:
                        rows.append(_dense(opts, dom, src, src_path, data, cold=key == "copy_cold"))
                dom.delete(src)
            if "sparse" in wanted:
                src, src_path = dom.create(opts.sparse)
                fill_sparse(src_path, opts.sparse)
                rows.append(_sparse(opts, dom, src, src_path, data))
                dom.delete(src)
        finally:
            subprocess.run(["rm", "-rf", data], check=False)
    return rows


def _dense(opts, dom: Domain, src: dict, src_path: str, data: str, cold: bool) -> Row:
    size = opts.copy
    out = os.path.join(data, "baseline.raw")
    prepare = evict if cold else warm
    checked = []

    def ours(d=dom):
        prepare(src_path)
        seconds, dst, dst_path = d.copy(src)
        if not checked:  # byte-identical, once per row (reading costs as much as copying)
            checked.append(filecmp.cmp(src_path, dst_path, shallow=False))
        d.delete(dst)
        return _mibs(size, seconds)

    def nosum():
        return ours(dom.plain)

    def cli():
        prepare(src_path)
        seconds, dst, _ = dom.copy_cli(src)
        dom.delete(dst)
        return _mibs(size, seconds)

    def cp():
        prepare(src_path)
        seconds = _timed_shell([["cp", src_path, out], ["sync", out]])
        os.unlink(out)
        return _mibs(size, seconds)

    def dd():
        evict(src_path)
        seconds = _timed_shell([["dd", f"if={src_path}", f"of={out}", "iflag=direct",
                                 "oflag=direct", "bs=8M", "conv=fsync", "status=none"]])
        os.unlink(out)
        return _mibs(size, seconds)

    if cold:
        a, b, c, n, u = alternate(opts.repeats, ours, cp, dd, nosum, cli)
        r = ratio(median(a), median(c))
        return Row(key="copy_cold", title=f"dense copy {size // MiB} MiB, source not cached",
                   unit="MiB/s", project=a,
                   baselines={"cp": b, "dd direct 8M": c, NOSUM: n, CLI: u}, ratio=r,
                   ratio_of="Image.copy / dd direct", goal=">= 1.0x dd direct",
                   met=r is not None and r >= 1.0,
                   extra={"paired_ratio": paired_ratio(a, c),
                          "ratio_to_cp": ratio(median(a), median(b)),
                          "ratio_no_checksum_to_dd": ratio(median(n), median(c)),
                          "ratio_cli_to_cp": ratio(median(u), median(b)),
                          "byte_identical": all(checked), "bytes": size})
    a, b, n, u = alternate(opts.repeats, ours, cp, nosum, cli)
    r = ratio(median(a), median(b))
    return Row(key="copy_warm", title=f"dense copy {size // MiB} MiB, source cached",
               unit="MiB/s", project=a, baselines={"cp": b, NOSUM: n, CLI: u}, ratio=r,
               ratio_of="Image.copy / cp", goal=">= 0.95x cp", met=r is not None and r >= 0.95,
               extra={"paired_ratio": paired_ratio(a, b),
                      "ratio_no_checksum_to_cp": ratio(median(n), median(b)),
                      "ratio_cli_to_cp": ratio(median(u), median(b)),
                      "byte_identical": all(checked), "bytes": size})


def _sparse(opts, dom: Domain, src: dict, src_path: str, data: str) -> Row:
    size = opts.sparse
    out = os.path.join(data, "baseline.raw")
    checks = {"ours_holes_kept": [], "cp_holes_kept": [], "ours_identical": []}

    def ours(d=dom):
        evict(src_path)
        seconds, dst, dst_path = d.copy(src)
        checks["ours_holes_kept"].append(same_extents(src_path, dst_path, size))
        if not checks["ours_identical"]:
            checks["ours_identical"].append(filecmp.cmp(src_path, dst_path, shallow=False))
        d.delete(dst)
        return _mibs(size, seconds)

    def cp():
        evict(src_path)
        seconds = _timed_shell([["cp", "--sparse=always", src_path, out], ["sync", out]])
        checks["cp_holes_kept"].append(same_extents(src_path, out, size))
        os.unlink(out)
        return _mibs(size, seconds)

    def cli():
        evict(src_path)
        seconds, dst, dst_path = dom.copy_cli(src)
        checks["ours_holes_kept"].append(same_extents(src_path, dst_path, size))
        dom.delete(dst)
        return _mibs(size, seconds)

    a, b, n, u = alternate(opts.repeats, ours, cp, lambda: ours(dom.plain), cli)
    r = ratio(median(a), median(b))
    kept = all(checks["ours_holes_kept"])
    st_data = sum(e - s for s, e in _extents(src_path, size))
    return Row(key="sparse", title=f"sparse copy {size // MiB} MiB, 10% data, source not cached",
               unit="MiB/s (virtual size)", project=a,
               baselines={"cp --sparse=always": b, NOSUM: n, CLI: u},
               ratio=r, ratio_of="Image.copy / cp --sparse=always", goal=">= 1.2x, holes kept",
               met=r is not None and r >= 1.2 and kept,
               extra={"paired_ratio": paired_ratio(a, b),
                      "holes_kept": kept, "cp_holes_kept": all(checks["cp_holes_kept"]),
                      "byte_identical": all(checks["ours_identical"]), "bytes": size,
                      "ratio_no_checksum_to_cp": ratio(median(n), median(b)),
                      "ratio_cli_to_cp": ratio(median(u), median(b)),
                      "data_bytes": st_data})


def _extents(path: str, size: int):
    fd = os.open(path, os.O_RDONLY)
    try:
        return sparse_extents(fd, size)
    finally:
        os.close(fd)
