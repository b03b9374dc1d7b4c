"""A copy whose source's checks found no data anywhere in its chain reads nothing and
writes nothing (workers/ops/copying/qemu.py, move's holds_nothing; sizing.holds_nothing).
The class of defect: a source judged empty that is not. Every way a chain can hold data
(a raw base, a qcow2 base, a top's data, compressed or zero-allocated clusters, one
subcluster) is copied to raw and to qcow2 and must read as its source, with the checksum
of its guest view as qemu reads it; the empty ones must be as thin as they are."""

import json
import os
import subprocess

import pytest

from tests.images.chains import compare, make_chain, needs_qemu, qemu_io
from tests.images.test_copies import agent, run_copy  # noqa: F401 (agent: a fixture)
from tests.support.storage_flow import MiB, block_checksum, recorded_checksum

pytestmark = [needs_qemu, pytest.mark.timeout(300)]

SIZE = 64 * MiB

# (base format, layers, {layer index: qemu-io writes}, empty?)
SOURCES = {
    "one-empty-qcow2": ("cow", 1, {}, True),
    "empty-layers-on-an-empty-raw-base": ("raw", 3, {}, True),
    "empty-layers-on-an-empty-qcow2-base": ("cow", 3, {}, True),
    "data-in-the-raw-base-only": ("raw", 2, {0: [f"write -P 5 {SIZE - MiB} 4k"]}, False),
    "data-in-the-qcow2-base-only": ("cow", 3, {0: [f"write -P 6 {MiB} 64k"]}, False),
    "data-in-a-middle-layer-only": ("raw", 3, {1: [f"write -P 7 {9 * MiB} 512"]}, False),
    "one-compressed-cluster": ("cow", 1, {0: [f"write -c -P 8 {2 * MiB} 64k"]}, False),
    "zeros-allocated-over-nothing": ("cow", 2, {1: ["write -P 9 0 64k", "write -z 0 64k"]},
                                     False),
    "zeros-over-the-base-data": ("cow", 2, {0: ["write -P 10 0 1M"], 1: ["write -z 0 1M"]},
                                 False),
}


def _blank_chain(agent, base_format: str, layers: int) -> list[dict]:
    """make_chain's volumes, their data files made again empty (a qcow2 as created, with
    its parent's name; a raw base a hole)."""
    chain = make_chain(agent, agent.domain_id, size=SIZE, base_format=base_format,
                       layers=layers)
    for i, layer in enumerate(chain):
        if layer["format"] == "raw":
            with open(layer["path"], "r+b") as f:
                f.truncate(0)
                f.truncate(SIZE)
            continue
        backing = ["-b", os.path.basename(chain[i - 1]["path"]), "-F",
                   "raw" if chain[i - 1]["format"] == "raw" else "qcow2"] if i else []
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", *backing,
                        layer["path"], str(SIZE)], check=True, timeout=60,
                       cwd=os.path.dirname(layer["path"]))
    return chain


def _guest_checksum(workdir, leaf: dict) -> str:
    """The blake3-4m checksum of the leaf's guest view, as qemu-img convert reads it."""
    flat = str(workdir / "flat.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", leaf["path"], flat],
                   check=True, timeout=120)
    try:
        return block_checksum(flat)
    finally:
        os.unlink(flat)


def _data_bytes(path: str, fmt: str) -> int:
    """Bytes of data the file's own layer maps (its backing not counted)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f",
                          "raw" if fmt == "raw" else "qcow2", path],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e.get("depth", 0) == 0)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_source_judged_empty_is_empty(agent, workdir, source):
    base_format, layers, writes, empty = SOURCES[source]
    chain = _blank_chain(agent, base_format, layers)
    for i, commands in writes.items():
        qemu_io(chain[i]["path"], chain[i]["format"], *commands)
    leaf = chain[-1]
    want = _guest_checksum(workdir, leaf)
    for fmt in ("raw", "cow"):
        dst, _ = run_copy(agent, leaf, f"{source}-{fmt}", format=fmt)
        info = agent.call("Volume.getInfo", dst)
        same = compare(leaf["path"], "cow", info["path"], fmt)
        assert same.returncode == 0, same.stdout + same.stderr
        assert recorded_checksum(agent.root, dst["volumeID"]) == want, fmt
        if empty:
            assert _data_bytes(info["path"], fmt) == 0, fmt
