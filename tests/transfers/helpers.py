"""Helpers for the transfer tests: local disk images with data, zeros and holes, the
`hostagent` command run as a person runs it (and killed as a person's machine kills it), and
NBD reads and writes of an export through libnbd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.images.chains import qemu_io
from tests.support.harness import REPO, wait_for
from tests.support.storage_flow import MiB


def local_image(path, fmt: str, size: int, seed: int = 1) -> str:
    """A local disk image: data in several places, a zeroed range, holes elsewhere."""
    path = str(path)
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
                       check=True, timeout=60)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
    driver = "cow" if fmt == "qcow2" else "raw"
    qemu_io(path, driver, f"write -P {seed} 0 {8 * MiB}",
            f"write -P {seed + 1} {size // 4} {size // 8}",
            f"write -z {size // 2} {4 * MiB}",
            f"write -P {seed + 2} {size - 3 * MiB} {3 * MiB}")
    return path


def hostagent(agent, *args) -> subprocess.Popen:
    """`hostagent ARGS --json` against `agent`, started (not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(agent.config_path),
                             *args, "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOSTAGENT_CLIENT_CONFIG": "/dev/null"})


def finished(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, dict, str]:
    """The command's exit code, its JSON answer and its stderr."""
    out, err = proc.communicate(timeout=timeout)
    try:
        answer = json.loads(out) if out.strip() else {}
    except ValueError:
        answer = {"unparsed": out}
    return proc.returncode, answer, err


def run(agent, *args, timeout: float = 300) -> tuple[int, dict, str]:
    return finished(hostagent(agent, *args), timeout)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def data_bytes(path, fmt: str) -> int:
    """Bytes of data (not zero) in an image's guest view, by qemu-img map."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f",
                          "qcow2" if fmt in ("qcow2", "cow") else "raw", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and not e["zero"])


def nbd_connect(socket_path: str):
    import nbd
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(socket_path)
    return h


def killed_mid_way(agent, proc, path, who: str, at: int = 24 * MiB) -> None:
    """Kill the transfer's `who` (client: the command; agent: the agent under it) once
    `path` holds `at` bytes."""
    def written():
        try:
            return allocated(path) >= at
        except FileNotFoundError:
            return False
    wait_for(written, timeout=60, what="the transfer half-way")
    if who == "client":
        proc.kill()
    else:
        agent.kill(signal.SIGKILL)
    proc.wait(60)
