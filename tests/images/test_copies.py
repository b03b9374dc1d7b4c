"""Copies of qcow2 chains through qemu-nbd and libnbd: collapsed to raw and to qcow2, and
copied as a chain, equal to the source's guest view, thin, and with one checksum."""

import subprocess

import pytest

from tests.images.chains import (
    check,
    compare,
    make_chain,
    map_allocated,
    needs_qemu,
    qemu_io,
    qemu_nbd_under,
)
from tests.support.harness import wait_for
from tests.support.storage_flow import MiB, ids, new_id, recorded_checksum, wait_legal

pytestmark = needs_qemu


@pytest.fixture
def agent(make_agent, workdir):
    agent = make_agent()
    agent.domain_id, agent.root = new_id(), str(workdir / "dom")
    agent.call("StorageDomain.create", {"domainID": agent.domain_id, "path": agent.root})
    return agent


def run_copy(agent, src, task_id, **how):
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    answer = agent.client().call("Image.copy", {"src": ids(src), "dst": dst, **how},
                                 id=task_id)
    assert answer["state"] == "copying"
    wait_legal(agent, dst)
    return dst, answer


@pytest.mark.parametrize("base_format", ["raw", "cow"])
def test_a_three_volume_chain_collapses_and_copies_equal_to_its_guest_view(agent,
                                                                           base_format):
    chain = make_chain(agent, agent.domain_id, base_format=base_format, layers=3)
    leaf = chain[-1]
    sums = set()
    for fmt in ("raw", "cow"):
        dst, _ = run_copy(agent, leaf, f"collapse-{fmt}", format=fmt)
        info = agent.call("Volume.getInfo", dst)
        assert info["format"] == fmt and info["parent"] is None
        same = compare(leaf["path"], "cow", info["path"], fmt)
        assert same.returncode == 0, same.stdout + same.stderr
        if fmt == "cow":
            assert check(info["path"])["check-errors"] == 0
        sums.add(recorded_checksum(agent.root, dst["volumeID"]))
    dst, answer = run_copy(agent, leaf, "chain", mode="chain")
    assert answer["kind"] == "chain" and answer["chain"][-1] == dst["volumeID"]
    image = agent.call("Image.getInfo", {"domainID": agent.domain_id,
                                         "imageID": dst["imageID"]})["chain"]
    assert [v["volumeID"] for v in image] == answer["chain"]
    assert [v["format"] for v in image] == [v["format"] for v in chain]
    assert all(v["legality"] == "LEGAL" for v in image)
    for copy, source in zip(image, chain):  # every layer: same guest view, whole chain
        same = compare(source["path"], source["format"], copy["path"], copy["format"])
        assert same.returncode == 0, same.stdout + same.stderr
        if copy["format"] == "cow":
            assert check(copy["path"])["check-errors"] == 0
    sums.add(recorded_checksum(agent.root, dst["volumeID"]))
    # The checksum is of the guest view: raw, qcow2 and the chain's leaf record one value.
    assert len(sums) == 1 and None not in sums
    assert qemu_nbd_under(agent.root) == []
    # Each layer's, though the blocks it holds nothing of took its parent's digests unread
    # (agent/storage/copy/nbd.py, KNOWN): a scrub reads every guest view whole and agrees.
    from tests.e2e.test_scrub import start_scrub, wait_state
    op = start_scrub(agent, agent.domain_id)
    result = wait_state(agent, agent.domain_id, op["operationID"], "COMPLETED", "FAILED")
    assert result["state"] == "COMPLETED" and result["result"]["mismatches"] == []
    assert result["result"]["volumes_checked"] == 3 + 2 + 3  # the source, two collapses


def test_copies_stay_as_thin_as_the_source(agent):
    """Unallocated ranges of a sparse source stay unallocated in every kind of copy; a chain
    copy's layers hold only what their source layers hold."""
    chain = make_chain(agent, agent.domain_id, size=256 * MiB, base_format="cow", layers=3)
    guest = sum(e["length"] for e in _guest_map(chain[-1]["path"]))
    for fmt in ("raw", "cow"):
        dst, _ = run_copy(agent, chain[-1], f"thin-{fmt}", format=fmt)
        info = agent.call("Volume.getInfo", dst)
        assert info["allocated"] <= guest + 4 * MiB, (fmt, info["allocated"], guest)
    dst, answer = run_copy(agent, chain[-1], "thin-chain", mode="chain")
    image = agent.call("Image.getInfo", {"domainID": agent.domain_id,
                                         "imageID": dst["imageID"]})["chain"]
    for copy, source in zip(image, chain):
        own = {(e["start"], e["length"]) for e in map_allocated(copy["path"], "cow")}
        theirs = {(e["start"], e["length"]) for e in map_allocated(source["path"], "cow")}
        assert _covered(own) <= _covered(theirs), copy["volumeID"]


def _guest_map(path):
    import json
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", path],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [e for e in json.loads(out) if e["data"]]


def _covered(extents) -> set:
    """The 64 KiB clusters a set of (start, length) extents covers."""
    return {c for s, n in extents for c in range(s // 65536, (s + n + 65535) // 65536)}


def test_a_copy_that_fails_in_qemu_leaves_no_qemu_nbd_and_a_named_error(agent):
    """A chain whose base's data file is gone under it: qemu-nbd cannot open the chain.
    The failure is named (never -32603) and recorded in the marker; no qemu-nbd is left."""
    chain = make_chain(agent, agent.domain_id, layers=2)
    import os
    os.unlink(chain[0]["path"])
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    try:
        agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst}, id="broken")
    except Exception as exc:  # refused before the answer is fine too, if named
        assert getattr(exc, "code", None) not in (None, -32603), exc
        return
    status = wait_for(lambda: (s := agent.call("Image.getStatus", dst))["copy"]["errors"]
                      and s, timeout=30, what="the copy's error recorded")
    error = status["copy"]["errors"][0]
    assert error["code"] != -32603 and error["data"]["name"] in (
        "CopyConflict", "ImageInvalid", "OperationFailed"), error
    assert qemu_nbd_under(agent.root) == []


def test_a_scrub_reads_a_qcow2_through_qemu_and_agrees_with_its_copy(agent):
    from tests.e2e.test_scrub import start_scrub, wait_state
    from tests.images.chains import qemu_io
    chain = make_chain(agent, agent.domain_id, layers=2)
    dst, _ = run_copy(agent, chain[-1], "to-cow", format="cow")
    copy = agent.call("Volume.getInfo", dst)
    op = start_scrub(agent, agent.domain_id)
    result = wait_state(agent, agent.domain_id, op["operationID"], "COMPLETED", "FAILED")
    assert result["state"] == "COMPLETED" and result["result"]["mismatches"] == []
    assert result["result"]["volumes_checked"] == 3  # base, snapshot, copy
    qemu_io(copy["path"], "cow", f"write -P 77 {MiB} 4096")  # one guest write, behind us
    op = start_scrub(agent, agent.domain_id)
    result = wait_state(agent, agent.domain_id, op["operationID"], "COMPLETED", "FAILED")
    assert [m["volumeID"] for m in result["result"]["mismatches"]] == [dst["volumeID"]]
    assert qemu_nbd_under(agent.root) == []


def test_a_continue_keeps_the_copys_mode_and_format(make_agent, workdir):
    """A stopped copy is continued as what it began as: asking for another mode or format
    is refused (205 CopyConflict) and changes nothing."""
    from agent.client import CallError
    agent = make_agent(copy={"max_bytes_per_second": 8 * MiB, "checkpoint_seconds": 0.1},
                       recovery={"copy_policy": "manual"})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    chain = make_chain(agent, domain_id, layers=2)
    dst = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "format": "cow"},
                        id="c1")
    agent.call("Task.abort", {"taskID": "c1"})
    wait_for(lambda: agent.call("Task.getStatus", {"taskID": "c1"})["state"] == "aborted",
             what="the copy aborted")
    for how, reason in (({"format": "raw"}, "format"), ({"mode": "chain"}, "kind")):
        with pytest.raises(CallError) as exc:
            agent.call("Image.copy", {"src": ids(chain[-1]), "dst": dst, **how})
        assert exc.value.code == 205 and exc.value.data["reason"] == reason
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst}, id="c2")
    wait_legal(agent, dst)
    info = agent.call("Volume.getInfo", dst)
    assert info["format"] == "cow"
    assert compare(chain[-1]["path"], "cow", info["path"], "cow").returncode == 0


@pytest.mark.parametrize("mode", ["collapse", "chain"])
def test_a_copy_that_cannot_fit_is_refused_before_anything_is_made(agent, workdir, mode):
    """qemu-img measure says what the copy needs; a destination domain with less free space
    answers 204 NoSpace at once, and no destination volume is left behind."""
    from agent.client import CallError
    from tests.support.storage_flow import tmpfs
    chain = make_chain(agent, agent.domain_id, size=64 * MiB, layers=3)  # ~30 MiB of data
    with tmpfs(workdir / "small", "16M") as small:
        small_id = new_id()
        agent.call("StorageDomain.create", {"domainID": small_id, "path": str(small)})
        dst = {"domainID": small_id, "imageID": new_id(), "volumeID": new_id()}
        with pytest.raises(CallError) as exc:
            agent.call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "mode": mode})
        assert exc.value.code == 204 and exc.value.data["needed"] > exc.value.data["free"]
        info = agent.call("StorageDomain.getInfo", {"domainID": small_id})
        assert info["volumes"] == 0 and info["copies"] == 0


@pytest.mark.parametrize("fmt", ["raw", "cow"])
def test_a_sparse_copy_needs_room_for_its_data_not_its_virtual_size(agent, workdir, fmt):
    """A 1 GiB disk holding a few MiB copied into a 48 MiB domain: measure's raw figure (the
    whole virtual size) would refuse it; the copy holds only the data, and fits."""
    from tests.support.storage_flow import tmpfs
    chain = make_chain(agent, agent.domain_id, size=1 << 30, layers=2)
    with tmpfs(workdir / "small", "48M") as small:
        small_id = new_id()
        agent.call("StorageDomain.create", {"domainID": small_id, "path": str(small)})
        dst = {"domainID": small_id, "imageID": new_id(), "volumeID": new_id()}
        agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst,
                                           "format": fmt}, id="sparse")
        wait_legal(agent, dst)
        info = agent.call("Volume.getInfo", dst)
        assert info["size"] == 1 << 30 and info["allocated"] < 40 * MiB
        assert compare(chain[-1]["path"], "cow", info["path"], fmt).returncode == 0


LAYOUTS = [("2M", "on"), ("2M", "off"), ("64k", "on"), ("512", "off"), ("1M", "on")]


@pytest.mark.parametrize("cluster, extended_l2", LAYOUTS,
                         ids=[f"{c}-l2ext-{e}" for c, e in LAYOUTS])
def test_copies_are_as_thin_as_their_source_in_every_cluster_layout(agent, workdir, cluster,
                                                                    extended_l2):
    """A snapshot whose qcow2 has its own cluster layout (large clusters, extended L2 with
    its subclusters), holding eight 4 KiB writes: every copy of it holds no more than the
    source maps, and reads the same."""
    chain = make_chain(agent, agent.domain_id, size=64 * MiB, layers=2)
    top = chain[1]
    made = str(workdir / "made.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster},extended_l2={extended_l2}", "-u", "-b",
                    chain[0]["path"].rsplit("/", 1)[1], "-F", "raw", made, str(64 * MiB)],
                   check=True, timeout=60, cwd=workdir)
    with open(made, "rb") as src, open(top["path"], "r+b") as dst:
        dst.truncate(0)
        dst.write(src.read())
    for i in range(8):
        qemu_io(top["path"], "cow", f"write -P {i + 1} {i * 7 * MiB + 12288} 4k")
    source = sum(e["length"] for e in map_allocated(top["path"], "cow"))
    for name, how in (("cow", {"format": "cow"}), ("chain", {"mode": "chain"})):
        dst, _ = run_copy(agent, top, f"thin-{name}", **how)
        info = agent.call("Volume.getInfo", dst)
        held = sum(e["length"] for e in map_allocated(info["path"], "cow"))
        assert held <= source, (name, held, source)
        same = compare(top["path"], "cow", info["path"], "cow")
        assert same.returncode == 0, same.stdout + same.stderr


def test_a_size_that_is_no_multiple_of_the_storage_block_copies_to_raw(agent):
    """A cow size need only be a multiple of 512: qemu cannot open such a raw destination
    with O_DIRECT for writing, so it is written through the page cache (and synced)."""
    src = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    info = agent.call("Volume.create", {**src, "size": 197120, "format": "cow"})
    qemu_io(info["path"], "cow", "write -P 5 0 65536", "write -P 6 131072 66048")
    dst, _ = run_copy(agent, {**src, "path": info["path"]}, "odd-size", format="raw")
    copy = agent.call("Volume.getInfo", dst)
    assert copy["size"] == 197120
    assert compare(info["path"], "cow", copy["path"], "raw").returncode == 0
