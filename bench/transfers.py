"""Uploads and downloads: `hostagent upload` / `download` against ovirt-imageio's client
through its daemon to the same kind of export, and against `nbdcopy` between the file and
the export (the limit), in one run; and how much a resumed upload sends again.

Every side does the same work around its data mover and is timed whole: an upload starts a
write export (Export.start, a new volume), moves the data, and finishes the transfer
(Export.stop with finish: the agent checks the image and records its checksum), so the
volume is LEGAL and durable at the end; a download starts a read export, moves the data
into a local raw file and fsyncs it. `hostagent` does its export and finish itself (a
subprocess, as a person runs it); for imageio's client (a subprocess too) and nbdcopy the
bench does them through the same RPCs. The images: the same 2 GiB (full profile) disk
as qcow2 and as raw, about half allocated, its source pages dropped before each sample.

  upload_qcow2, upload_raw      a local file into a new cow / raw volume
  download_qcow2, download_raw  a cow / raw volume into a local raw file
  upload_resume                 an upload killed half-way, then resumed: the bytes the
                                resume sent, against the data (goal <= 55%)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from bench.common import (
    MiB,
    REPO,
    Row,
    Scratch,
    alternate,
    data_dir,
    evict,
    median,
    paired_ratio,
    ratio,
)
from bench.copy import Domain

ROWS = ("upload_qcow2", "upload_raw", "download_qcow2", "download_raw", "upload_resume")
IMAGEIO_UPLOAD = "from ovirt_imageio import client; import sys; " \
                 "client.upload(sys.argv[1], sys.argv[2], None, secure=False)"
IMAGEIO_DOWNLOAD = "from ovirt_imageio import client; import sys; " \
                   "client.download(sys.argv[1], sys.argv[2], None, fmt='raw', secure=False)"


def make_disk(path: str, fmt: str, size: int) -> int:
    """A disk about half allocated (every other 16 MiB), in `fmt`; its data bytes."""
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
    stride, writes = 16 * MiB, []
    for k, off in enumerate(range(0, size, stride)):
        if k % 2 == 0:
            writes += ["-c", f"write -P {k % 250 + 1} {off} {stride}"]
    for j in range(0, len(writes), 128):
        subprocess.run(["qemu-io", "-f", fmt, *writes[j:j + 128], path], check=True,
                       stdout=subprocess.DEVNULL)
    return sum(stride for k in range(0, size, stride) if (k // stride) % 2 == 0)


def _mibs(size: int, seconds: float) -> float:
    return size / MiB / seconds


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Side:
    """The agent, its domain and an imageio daemon: what every sample of a row uses."""

    def __init__(self, scratch: Scratch, data: str, imageio):
        self.agent = scratch.agent("transfers").start()
        self.dom = Domain(self.agent, os.path.join(data, "domain"))
        self.imageio = imageio
        self.data = data

    def new(self) -> dict:
        return self.dom.loc(str(uuid.uuid4()), str(uuid.uuid4()))

    def hostagent(self, *args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "agent", "--config",
                              str(self.agent.config_path), *args, "--json"], cwd=REPO,
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "HOSTAGENT_CLIENT_CONFIG": "/dev/null"})
        return json.loads(out.stdout)

    def export(self, params: dict) -> tuple[str, dict]:
        task = f"bench-{uuid.uuid4().hex[:8]}"
        self.dom.rpc.send("Export.start", params, id=task)
        while True:
            resp = self.dom.rpc.recv(60)
            if resp.get("id") == task:
                if "error" in resp:
                    raise RuntimeError(f"Export.start: {resp['error']}")
                return task, resp["result"]

    def finish(self, task: str) -> None:
        self.dom.rpc.call("Export.stop", {"taskID": task, "finish": True}, timeout=3600)

    def stop(self, task: str) -> None:
        self.dom.rpc.call("Export.stop", {"taskID": task})


def _show(loc: dict) -> str:
    return f"{loc['domainID']}/{loc['imageID']}/{loc['volumeID']}"


def _upload_row(opts, side: Side, fmt: str) -> Row:
    size = opts.transfer
    src = os.path.join(side.data, f"src.{fmt}")
    data = make_disk(src, fmt, size)
    vol_fmt = "cow" if fmt == "qcow2" else "raw"

    def ours():
        evict(src)
        loc = side.new()
        t = time.perf_counter()
        side.hostagent("upload", src, _show(loc), "--local-format", fmt, "--format", vol_fmt)
        seconds = time.perf_counter() - t
        side.dom.delete(loc)
        return _mibs(size, seconds)

    def through(mover):
        def sample():
            evict(src)
            loc = side.new()
            t = time.perf_counter()
            task, exp = side.export({**loc, "mode": "write", "create": {
                "size": size, "format": vol_fmt}})
            mover(exp)
            side.finish(task)
            seconds = time.perf_counter() - t
            side.dom.delete(loc)
            return _mibs(size, seconds)
        return sample

    def imageio(exp):
        url = side.imageio.ticket(exp, ["read", "write"])
        subprocess.run([sys.executable, "-c", IMAGEIO_UPLOAD, src, url], check=True)

    def nbdcopy(exp):
        subprocess.run(["nbdcopy", "--flush", "--", "[", "qemu-nbd", "-r", "-f", fmt, src, "]",
                        exp["url"]], check=True)

    a, b, c = alternate(opts.repeats, ours, through(imageio), through(nbdcopy))
    return _row(f"upload_{fmt}", f"upload of a {size // MiB} MiB {fmt} file, half allocated, "
                f"into a new {vol_fmt} volume (LEGAL at the end)", a, b, c, size, data)


def _download_row(opts, side: Side, fmt: str) -> Row:
    size = opts.transfer
    src = os.path.join(side.data, f"dsrc.{fmt}")
    data = make_disk(src, fmt, size)
    loc = side.new()
    side.hostagent("upload", src, _show(loc), "--local-format", fmt)
    path = side.dom.rpc.call("Volume.getInfo", loc)["path"]
    out = os.path.join(side.data, "out.raw")

    def fresh():
        evict(path)
        if os.path.exists(out):
            os.unlink(out)

    def ours():
        fresh()
        t = time.perf_counter()
        side.hostagent("download", _show(loc), out)
        _fsync(out)
        return _mibs(size, time.perf_counter() - t)

    def through(mover):
        def sample():
            fresh()
            t = time.perf_counter()
            task, exp = side.export(loc)
            mover(exp)
            _fsync(out)
            side.stop(task)
            return _mibs(size, time.perf_counter() - t)
        return sample

    def imageio(exp):
        url = side.imageio.ticket(exp, ["read"])
        subprocess.run([sys.executable, "-c", IMAGEIO_DOWNLOAD, url, out], check=True)

    def nbdcopy(exp):
        with open(out, "wb") as f:
            f.truncate(size)
        subprocess.run(["nbdcopy", exp["url"], out], check=True)

    a, b, c = alternate(opts.repeats, ours, through(imageio), through(nbdcopy))
    side.dom.delete(loc)
    kind = "cow" if fmt == "qcow2" else "raw"
    return _row(f"download_{fmt}", f"download of a {size // MiB} MiB {kind} volume, half "
                f"allocated, into a local raw file (synced)", a, b, c, size, data)


def _row(key, title, a, b, c, size, data) -> Row:
    r, n = ratio(median(a), median(b)), ratio(median(a), median(c))
    return Row(key=key, title=title, unit="MiB/s (virtual size)", project=a,
               baselines={"imageio client via its daemon": b, "nbdcopy": c}, ratio=r,
               ratio_of="hostagent / imageio", goal=">= 1.0x imageio's client, >= 0.9x nbdcopy",
               met=r is not None and n is not None and r >= 1.0 and n >= 0.9,
               extra={"paired_ratio": paired_ratio(a, b), "ratio_to_nbdcopy": n,
                      "bytes": size, "data_bytes": data})


def _resume_row(opts, side: Side) -> Row:
    """An upload SIGKILLed once its volume holds half the data, then run again: what the
    second run sent, as a share of the data."""
    size = opts.transfer
    src = os.path.join(side.data, "resume.raw")
    data = make_disk(src, "raw", size)
    shares = []
    for _ in range(opts.repeats):
        loc = side.new()
        path = os.path.join(side.dom_path, "images", loc["imageID"], loc["volumeID"] + ".raw")
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config",
                                 str(side.agent.config_path), "upload", src, _show(loc),
                                 "--json", "--rate", str(max(data // 4, 16 * MiB))], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if os.stat(path).st_blocks * 512 >= data // 2:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answer = side.hostagent("upload", src, _show(loc))
        shares.append(100.0 * answer["bytes"]["sent"] / data)
        side.dom.delete(loc)
    return Row(key="upload_resume", title=f"an upload of {data // MiB} MiB of data killed "
               f"half-way, then resumed", unit="% of the data sent again", project=shares,
               ratio=median(shares) / 100.0, ratio_of="sent by the resume / data",
               goal="<= 55% of the data", met=median(shares) <= 55.0,
               extra={"data_bytes": data})


def run(opts) -> list[Row]:
    wanted = [r for r in ROWS if r in opts.only]
    if not wanted:
        return []
    from tests.support.imageio import Daemon
    rows = []
    with Scratch() as s, data_dir(opts, "transfers") as data:
        imageio = Daemon(s.path / "imageio")
        try:
            side = Side(s, data, imageio)
            side.dom_path = os.path.join(data, "domain")
            for key in wanted:
                if key == "upload_resume":
                    rows.append(_resume_row(opts, side))
                elif key.startswith("upload_"):
                    rows.append(_upload_row(opts, side, key.split("_")[1]))
                else:
                    rows.append(_download_row(opts, side, key.split("_")[1]))
        finally:
            imageio.stop()
    return rows
