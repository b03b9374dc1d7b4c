"""Volume.extend and Volume.measure on raw and cow volumes, with real qemu tools: a grown
volume reads its old data and zeros past the old end, whatever its file held there; what
cannot grow is refused by name; a measure is qemu-img's of the chain as the metadata says."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from agent.client import CallError
from tests.images.chains import check, header, needs_qemu, qemu_io
from tests.images.test_merges import four_volume_chain, ids
from tests.support.storage_flow import MiB, new_id

pytestmark = [needs_qemu, pytest.mark.timeout(120)]


@pytest.fixture
def agent(make_agent, workdir):
    a = make_agent()
    a.domain_id = new_id()
    a.call("StorageDomain.create", {"domainID": a.domain_id, "path": str(workdir / "dom")})
    return a


def read(path: str, fmt: str, offset: int, length: int) -> bytes:
    """The guest's bytes at offset, through qemu (a cow volume's chain included)."""
    out = subprocess.run(["qemu-io", "-f", "raw" if fmt == "raw" else "qcow2", "-c",
                          f"read -v {offset} {length}", path], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    hexes = []
    for line in out.splitlines():
        if ":" in line and line[:8].strip("0123456789abcdef") == "":
            hexes += line.split(":", 1)[1].split()[:16]
    return bytes(int(h, 16) for h in hexes[:length])


@pytest.mark.parametrize("fmt,preallocation", [("raw", "sparse"), ("raw", "preallocated"),
                                               ("cow", "sparse")])
def test_a_volume_grows_with_its_data_and_zeros_past_the_old_end(agent, fmt, preallocation):
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    made = agent.call("Volume.create", {**loc, "size": 8 * MiB, "format": fmt,
                                        "preallocation": preallocation})
    qemu_io(made["path"], fmt, f"write -P 7 0 {8 * MiB}")
    if fmt == "raw":  # bytes past the volume's end, left by someone: never the guest's
        with open(made["path"], "r+b") as f:
            f.seek(8 * MiB)
            f.write(b"\xee" * MiB)
    grown = agent.call("Volume.extend", {**loc, "size": 24 * MiB})
    assert grown == {"volumeID": loc["volumeID"], "size": 24 * MiB,
                     "generation": made["generation"] + 1, "extended": True}
    info = agent.call("Volume.getInfo", loc)
    assert info["size"] == 24 * MiB and info["legality"] == "LEGAL"
    assert read(info["path"], fmt, 8 * MiB - 16, 16) == b"\x07" * 16
    assert read(info["path"], fmt, 8 * MiB, 64) == bytes(64)
    assert read(info["path"], fmt, 24 * MiB - 64, 64) == bytes(64)
    if fmt == "cow":
        assert header(info["path"], fmt)["virtual-size"] == 24 * MiB
        assert check(info["path"])["check-errors"] == 0
    else:
        assert os.path.getsize(info["path"]) == 24 * MiB
        if preallocation == "preallocated":
            assert info["allocated"] >= 24 * MiB
    again = agent.call("Volume.extend", {**loc, "size": 24 * MiB})  # a retry: nothing done
    assert again["extended"] is False and again["generation"] == grown["generation"]


def test_a_grown_volume_drops_the_checksum_of_its_shorter_view(agent, workdir):
    """A copy records its destination's checksum; growing it makes that the checksum of a
    shorter guest view, so it is dropped (a scrub records the new one)."""
    from tests.support.storage_flow import make_source, recorded_checksum, wait_legal
    src = make_source(agent, agent.domain_id, 8 * MiB)
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="c1")
    wait_legal(agent, dst)
    root = workdir / "dom"
    assert recorded_checksum(root, dst["volumeID"])
    agent.call("Volume.extend", {**dst, "size": 16 * MiB})
    assert recorded_checksum(root, dst["volumeID"]) is None


def test_what_cannot_grow_is_refused_by_name_and_left_as_it_was(agent):
    chain = four_volume_chain(agent, agent.domain_id)
    leaf, inner = chain[-1], chain[1]
    cases = [({**ids(leaf), "size": 32 * MiB}, "ShrinkRefused"),
             ({**ids(inner), "size": 128 * MiB}, "VolumeHasChildren"),
             ({**ids(leaf), "size": 128 * MiB, "generation": 99}, "GenerationMismatch"),
             ({**ids(leaf), "volumeID": new_id(), "size": 128 * MiB}, "NoSuchVolume")]
    for params, name in cases:
        with pytest.raises(CallError) as refused:
            agent.call("Volume.extend", params)
        assert refused.value.error["data"]["name"] == name, (params, refused.value.error)
    with pytest.raises(CallError) as odd:
        agent.call("Volume.extend", {**ids(leaf), "size": 128 * MiB + 1})
    assert odd.value.code == -32602
    for v in chain:
        assert agent.call("Volume.getInfo", ids(v))["size"] == 64 * MiB


def test_an_extend_whose_row_was_never_written_is_mended_by_the_next(agent):
    """A crash between qemu-img resize and the row leaves a qcow2 header larger than the
    row: the next extend starts from the row's size, so the guest sees zeros there."""
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    made = agent.call("Volume.create", {**loc, "size": 8 * MiB, "format": "cow"})
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", made["path"], str(16 * MiB)],
                   check=True, timeout=60)
    qemu_io(made["path"], "cow", f"write -P 5 {10 * MiB} {MiB}")  # past the row's end
    with pytest.raises(CallError) as refused:  # readers trust the row, not the header
        agent.call("Volume.measure", loc)
    assert refused.value.error["data"]["reason"] == "size"
    mended = agent.call("Volume.extend", {**loc, "size": 8 * MiB})  # the size it has
    assert mended["size"] == 8 * MiB and header(made["path"], "cow")["virtual-size"] == 8 * MiB
    assert agent.call("Volume.measure", loc)["size"] == 8 * MiB  # readable again
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", made["path"], str(16 * MiB)],
                   check=True, timeout=60)
    qemu_io(made["path"], "cow", f"write -P 5 {10 * MiB} {MiB}")
    agent.call("Volume.extend", {**loc, "size": 32 * MiB})
    assert read(made["path"], "cow", 10 * MiB, 64) == bytes(64)
    assert header(made["path"], "cow")["virtual-size"] == 32 * MiB


def test_a_measure_is_qemu_img_measure_of_the_chain(agent, workdir):
    chain = four_volume_chain(agent, agent.domain_id, base_format="cow")
    leaf = chain[-1]
    for fmt in ("raw", "cow"):
        got = agent.call("Volume.measure", {**ids(leaf), "format": fmt})
        want = json.loads(subprocess.run(
            ["qemu-img", "measure", "--output=json", "-f", "qcow2", "-O",
             "raw" if fmt == "raw" else "qcow2", leaf["path"]], capture_output=True,
            text=True, check=True, timeout=60).stdout)
        assert got == {"volumeID": leaf["volumeID"], "format": fmt, "size": 64 * MiB,
                       "required": want["required"],
                       "fully_allocated": want["fully-allocated"]}
    default = agent.call("Volume.measure", ids(chain[0]))
    assert default["format"] == "cow" and 0 < default["required"] <= 64 * MiB + MiB
