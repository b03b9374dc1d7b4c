"""Real qcow2 chains for the image tests: made by the agent, written by qemu-io (a guest's
writes, as qemu would make them), compared and checked by qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import psutil
import pytest

from tests.support.harness import events_until, wait_for
from tests.support.storage_flow import MiB, new_id

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io")
                                is None, reason="qemu-utils is not installed")
DRIVER = {"raw": "raw", "cow": "qcow2"}


def qemu_io(path: str, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", DRIVER[fmt]]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], check=True, stdout=subprocess.DEVNULL, timeout=60)


def make_chain(agent, domain_id: str, size: int = 64 * MiB, base_format: str = "raw",
               layers: int = 3, seed: int = 1) -> list[dict]:
    """A chain of `layers` volumes in one image, base first, each with data of its own (and
    a zeroed range in the snapshots, which must hide the data beneath it)."""
    image = new_id()
    out, parent = [], None
    for i in range(layers):
        loc = {"domainID": domain_id, "imageID": image, "volumeID": new_id()}
        params = {**loc}
        if parent is None:
            params.update(size=size, format=base_format)
        else:
            params.update(parentVolumeID=parent["volumeID"])
        info = agent.call("Volume.create", params)
        fmt = info["format"]
        p = seed + i
        if i == 0:
            qemu_io(info["path"], fmt, f"write -P {p} 0 {8 * MiB}",
                    f"write -P {p + 50} {size // 2} {4 * MiB}")
        else:
            qemu_io(info["path"], fmt, f"write -P {p} {(4 * i) * MiB} {6 * MiB}",
                    f"write -z {size // 2 + i * MiB} {MiB // 2}")
        out.append({**loc, "path": info["path"], "format": fmt})
        parent = loc
    return out


def compare(a: str, a_fmt: str, b: str, b_fmt: str) -> subprocess.CompletedProcess:
    """qemu-img compare of two guest views (exit 0: identical), formats given. Refused by
    qemu's image lock, it is asked again until the lock is let go: a killed writer's
    qemu-nbd can hold it a while after its worker is gone (a thread finishing its I/O), as
    the agent itself waits out (qemu_img.lock_waited)."""
    def once():
        done = subprocess.run(["qemu-img", "compare", "-f", DRIVER[a_fmt], "-F",
                               DRIVER[b_fmt], a, b], capture_output=True, text=True,
                              timeout=120)
        return None if "Failed to get" in done.stderr and "lock" in done.stderr else done
    return wait_for(once, 30, interval=0.1, what="qemu-img compare, no lingering lock")


def check(path: str) -> dict:
    out = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", path],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 3), out.stderr  # 3: leaked clusters only
    return json.loads(out.stdout)


def header(path: str, fmt: str) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", DRIVER[fmt],
                                      path], capture_output=True, text=True, check=True,
                                     timeout=60).stdout)


def map_allocated(path: str, fmt: str) -> list[dict]:
    """qemu-img map of one layer alone: the data ranges it holds itself."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", DRIVER[fmt], path],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [e for e in json.loads(out) if e["data"]]


def qemu_nbd_under(root: str) -> list[psutil.Process]:
    """qemu-nbd processes serving a file under `root` (this test's own directory)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-nbd" and any(root in a for a in p.info["cmdline"] or ()):
            found.append(p)
    return found


def holding_the_lock(workdir, path: str, fmt: str) -> subprocess.Popen:
    """A writer holding the image's lock (qemu-nbd), once it holds it: its own descriptor of
    the image carries qemu's locks (/proc/PID/fdinfo). Started again if it could not take
    them yet (a killed writer's own qemu-nbd may still hold them: what the tests that use
    this are about; qemu-nbd makes its socket before it opens the image, so a socket proves
    nothing). The caller ends it (terminate, by its pid)."""
    proc = None

    def holds() -> bool:
        nonlocal proc
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen(["qemu-nbd", "--persistent", "-k",
                                     str(workdir / f"lingering-{new_id()[:8]}.sock"), "-f",
                                     DRIVER[fmt], path], stderr=subprocess.DEVNULL)
        return locks_held(proc.pid, path)
    try:
        wait_for(holds, 30, interval=0.05, what="a writer holding the image's lock")
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        raise
    return proc


def locks_held(pid: int, path: str) -> bool:
    """Whether process `pid` holds locks through a descriptor of its own on `path`."""
    try:
        real = os.path.realpath(path)
        fds = [f.fd for f in psutil.Process(pid).open_files() if f.path == real]
        return any("lock:" in open(f"/proc/{pid}/fdinfo/{fd}").read() for fd in fds)
    except (psutil.Error, FileNotFoundError, ProcessLookupError):
        return False


def announced_wait(workdir, path: str, fmt: str, events, call) -> list[dict]:
    """`call()` (a request that takes up the image) made while a writer of the test's own
    holds its lock; the events seen until the request says it waits for it (state waiting,
    reason image-locked), then the lock let go. A request that does not wait fails it."""
    lingering = holding_the_lock(workdir, path, fmt)
    try:
        call()
        return events_until(events, lambda e: e["params"].get("state") == "waiting" and
                            e["params"].get("reason") == "image-locked", timeout=30)
    finally:
        lingering.terminate()
        lingering.wait(10)
