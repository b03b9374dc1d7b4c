"""A copy whose source's checks found no data anywhere in its chain reads nothing and
writes nothing (workers/ops/copying/qemu.py, move's holds_nothing; sizing.holds_nothing).
The class of defect: a source judged empty that is not. Every way a chain can hold data
(a raw base, a qcow2 base, a top's data, compressed or zero-allocated clusters, one
subcluster) is copied to raw and to qcow2 and must read as its source, with the checksum
of its guest view as qemu reads it; the empty ones must be as thin as they are. A chain
copy leaves a layer as made only if it maps no cluster at all (qcow2.maps_nothing): a layer
whose only clusters are zeros hides its parent's data and is copied."""

import json
import os
import struct
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


# Chains copied as chains: (base format, {layer index: qemu-io writes}); every layer has
# three. A layer that maps nothing is left as made, its parent's copy beneath it; one whose
# only clusters are zeros hides its parent's data and must be copied.
CHAINS = {
    "an-empty-top-and-middle": ("raw", {0: ["write -P 11 0 1M"]}),
    "an-empty-middle": ("cow", {0: ["write -P 12 0 1M"], 2: [f"write -P 13 {2 * MiB} 64k"]}),
    "zeros-only-over-the-base-data": ("cow", {0: ["write -P 14 0 2M"], 2: ["write -z 0 1M"]}),
    "zeros-only-in-the-middle": ("raw", {0: ["write -P 15 0 2M"], 1: ["write -z 1M 1M"]}),
    "all-empty": ("raw", {}),
}


@pytest.mark.parametrize("source", sorted(CHAINS))
def test_a_chain_copy_leaves_only_what_maps_nothing_as_made(agent, workdir, source):
    """Each layer of the copy reads as its source layer and records the checksum of its
    guest view, whether it was left as made or copied."""
    base_format, writes = CHAINS[source]
    chain = _blank_chain(agent, base_format, 3)
    for i, commands in writes.items():
        qemu_io(chain[i]["path"], chain[i]["format"], *commands)
    dst, answer = run_copy(agent, chain[-1], f"{source}-chain", mode="chain")
    assert answer["kind"] == "chain" and len(answer["chain"]) == 3
    for layer, vid in zip(chain, answer["chain"]):
        info = agent.call("Volume.getInfo", {**dst, "volumeID": vid})
        fmt = layer["format"]
        same = compare(layer["path"], fmt, info["path"], fmt)
        assert same.returncode == 0, (vid, same.stdout + same.stderr)
        want = _guest_checksum(workdir, layer) if fmt == "cow" else block_checksum(
            layer["path"])
        assert recorded_checksum(agent.root, vid) == want, vid


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_maps_nothing_reads_the_l1_table_within_bounds(tmp_path):
    """A fresh qcow2 maps nothing; one zero cluster (written as zeros, no data) maps
    something; an L1 table said to lie past the file's end, or larger than qemu allows,
    answers no (the copy's own path then reads, and qemu-img check refuses)."""
    from agent.storage import qcow2
    path = str(tmp_path / "layer.qcow2")

    def fresh():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE)],
                       check=True, timeout=60)
        return qcow2.read(path)
    assert qcow2.maps_nothing(path, fresh())
    qemu_io(path, "cow", "write -z 0 64k")
    assert qcow2.maps_nothing(path, qcow2.read(path)) is False
    fresh()
    _poke(path, 40, struct.pack(">Q", os.path.getsize(path) + (1 << 20)))  # L1 offset
    assert qcow2.maps_nothing(path, qcow2.read(path)) is False
    fresh()
    _poke(path, 36, struct.pack(">I", qcow2.MAX_L1_ENTRIES + 1))  # L1 entries
    assert qcow2.maps_nothing(path, qcow2.read(path)) is False
