"""qcow2 volumes and snapshot chains, made and described by the agent, checked with qemu-img."""

import os
import subprocess

import pytest

from agent.client import CallError
from tests.images.chains import header, make_chain, needs_qemu, qemu_io
from tests.support.storage_flow import MiB, new_id, tmpfs

pytestmark = needs_qemu


@pytest.fixture
def agent(make_agent, workdir):
    agent = make_agent()
    agent.domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": agent.domain_id,
                                        "path": str(workdir / "dom")})
    return agent


def _loc(agent, image=None):
    return {"domainID": agent.domain_id, "imageID": image or new_id(), "volumeID": new_id()}


@pytest.mark.parametrize("fmt", ["raw", "cow"])
def test_formats_and_preallocation_are_what_the_metadata_and_qemu_say(agent, fmt):
    sparse = agent.call("Volume.create", {**_loc(agent), "size": 32 * MiB, "format": fmt})
    full = agent.call("Volume.create", {**_loc(agent), "size": 32 * MiB, "format": fmt,
                                        "preallocation": "preallocated"})
    for info in (sparse, full):
        assert info["format"] == fmt and info["size"] == 32 * MiB and info["leaf"]
        head = header(info["path"], fmt)
        assert head["virtual-size"] == 32 * MiB
        if fmt == "cow":
            assert head["format-specific"]["data"]["compat"] == "1.1"
    assert sparse["allocated"] < full["allocated"]
    if fmt == "raw":
        assert full["allocated"] >= 32 * MiB
    # Today's call (no format) is still a sparse raw volume.
    plain = agent.call("Volume.create", {**_loc(agent), "size": MiB})
    assert plain["format"] == "raw" and plain["path"].endswith(".raw")


def test_a_snapshot_chain_is_linked_relative_and_read_only_below_its_leaf(agent):
    chain = make_chain(agent, agent.domain_id, layers=3)
    infos = [agent.call("Volume.getInfo", {k: v[k] for k in ("domainID", "imageID",
                                                             "volumeID")}) for v in chain]
    assert [i["parent"] for i in infos] == [None, chain[0]["volumeID"], chain[1]["volumeID"]]
    assert [i["children"] for i in infos] == [[chain[1]["volumeID"]], [chain[2]["volumeID"]],
                                              []]
    assert [i["leaf"] for i in infos] == [False, False, True]
    for i in (1, 2):
        head = header(infos[i]["path"], "cow")
        assert head["backing-filename"] == os.path.basename(infos[i - 1]["path"])
        assert head["backing-filename-format"] == ("raw" if i == 1 else "qcow2")
    listed = agent.call("Image.getInfo", {"domainID": agent.domain_id,
                                          "imageID": chain[0]["imageID"]})
    assert [v["volumeID"] for v in listed["chain"]] == [v["volumeID"] for v in chain]

    ids = lambda v: {k: v[k] for k in ("domainID", "imageID", "volumeID")}  # noqa: E731
    with pytest.raises(CallError) as exc:
        agent.call("Volume.delete", ids(chain[0]))
    assert exc.value.code == 215 and exc.value.data["children"] == [chain[1]["volumeID"]]
    with pytest.raises(CallError) as exc:  # snapshots are taken of the leaf only
        agent.call("Volume.create", {**_loc(agent, chain[0]["imageID"]),
                                     "parentVolumeID": chain[1]["volumeID"]})
    assert exc.value.code == 215
    with pytest.raises(CallError) as exc:
        agent.call("Volume.create", {**_loc(agent, chain[0]["imageID"]), "format": "raw",
                                     "parentVolumeID": chain[2]["volumeID"]})
    assert exc.value.code == -32602
    with pytest.raises(CallError) as exc:  # the parent must be in the same image
        agent.call("Volume.create", {**_loc(agent), "parentVolumeID": chain[2]["volumeID"]})
    assert exc.value.code == 201
    for v in reversed(chain):  # from the leaf down, each delete is allowed
        agent.call("Volume.delete", ids(v))
        assert not os.path.exists(v["path"])


def _rebase_unsafe(path: str, backing: str) -> None:
    """What a hostile or broken writer can do to a header: name any backing file."""
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", backing,
                    path], check=True, timeout=60)


@pytest.mark.parametrize("backing", ["/etc/hostname", "../{image}/x.raw", "sub/x.raw",
                                     "{sibling}"])
def test_a_backing_file_outside_the_image_is_refused_before_qemu_opens_it(agent, backing,
                                                                          workdir):
    chain = make_chain(agent, agent.domain_id, layers=2)
    sibling = os.path.basename(agent.call("Volume.create", {
        **_loc(agent, chain[0]["imageID"]), "size": 64 * MiB})["path"])
    _rebase_unsafe(chain[1]["path"], backing.format(image=new_id(), sibling=sibling))
    src = {k: chain[1][k] for k in ("domainID", "imageID", "volumeID")}
    for mode in ("collapse", "chain"):
        dst = _loc(agent)
        with pytest.raises(CallError) as exc:
            agent.call("Image.copy", {"src": src, "dst": dst, "mode": mode})
        assert exc.value.code == 216, exc.value
        # The reason is what was checked: a name inside the image that is not the parent's
        # is the wrong chain; any path leaves the image.
        assert exc.value.data["reason"] == ("chain" if backing == "{sibling}"
                                            else "backing-outside"), exc.value.data


def test_a_raw_volume_holding_a_qcow2_header_stays_raw(agent, workdir):
    """The format-probing hole: a guest writes a qcow2 header (naming a host file as its
    backing) into its raw disk. Every copy must copy the raw bytes, never follow it."""
    loc = _loc(agent)
    info = agent.call("Volume.create", {**loc, "size": 16 * MiB})
    planted = str(workdir / "planted.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F",
                    "raw", planted, str(16 * MiB)], check=True, timeout=60)
    with open(planted, "rb") as f, open(info["path"], "r+b") as raw:
        raw.write(f.read())
    qemu_io(info["path"], "raw", f"write -P 9 {8 * MiB} {MiB}")
    for fmt in ("raw", "cow"):
        dst = _loc(agent)
        agent.client().call("Image.copy", {"src": loc, "dst": dst, "format": fmt},
                            id=f"probe-{fmt}")
        from tests.support.storage_flow import wait_legal
        wait_legal(agent, dst)
        out = agent.call("Volume.getInfo", dst)
        assert out["format"] == fmt
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F",
                               {"raw": "raw", "cow": "qcow2"}[fmt], info["path"],
                               out["path"]], capture_output=True, text=True, timeout=60)
        assert same.returncode == 0, same.stdout + same.stderr


def test_one_truth_for_a_size(agent):
    """qemu sizes a qcow2 in 512-byte sectors: a cow volume of another size would be LEGAL
    with a size qemu does not have, and never copyable. Refused as the params they are."""
    for params, param in (({"size": 1000, "format": "cow"}, "size"),
                          ({"size": MiB + 1, "format": "cow", "preallocation": "preallocated"},
                           "size")):
        with pytest.raises(CallError) as exc:
            agent.call("Volume.create", {**_loc(agent), **params})
        assert exc.value.code == -32602 and exc.value.data["param"] == param, exc.value.data
    odd = _loc(agent)
    agent.call("Volume.create", {**odd, "size": 1000})  # raw: any size is its own
    with pytest.raises(CallError) as exc:
        agent.call("Volume.create", {**odd, "volumeID": new_id(),
                                     "parentVolumeID": odd["volumeID"]})
    assert exc.value.code == -32602 and exc.value.data["param"] == "size"
    with pytest.raises(CallError) as exc:
        agent.call("Image.copy", {"src": odd, "dst": _loc(agent), "format": "cow"})
    assert exc.value.code == -32602 and exc.value.data["param"] == "format"
    base = _loc(agent)
    agent.call("Volume.create", {**base, "size": 4 * MiB})
    with pytest.raises(CallError) as exc:
        agent.call("Volume.create", {**base, "volumeID": new_id(),
                                     "parentVolumeID": base["volumeID"],
                                     "preallocation": "preallocated"})
    assert exc.value.code == -32602 and exc.value.data["param"] == "preallocation"
    snap = agent.call("Volume.create", {**base, "volumeID": new_id(),
                                        "parentVolumeID": base["volumeID"]})
    assert snap["size"] == 4 * MiB and header(snap["path"], "cow")["virtual-size"] == 4 * MiB


def test_a_volume_slower_to_free_than_a_worker_deadline_is_deleted_not_timed_out(make_agent,
                                                                                 workdir):
    """A file system frees a fragmented file's extents inside unlink: ext4 here took 5.7 s
    for a file of 100,000 extents, 2-3 s for this one's 50,000 (a raw volume a guest wrote in
    scattered 4 KiB pieces), past the 1 s deadline set here. The worker heartbeats
    meanwhile, so a delete (and a merge's top) is never killed as silent, and never failed
    after its row was gone."""
    agent = make_agent(workers={"deadline_seconds": 1.0, "kill_grace_seconds": 0.5,
                                "heartbeat_seconds": 0.2})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    path = agent.call("Volume.create", {**loc, "size": 1 << 30})["path"]
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(50_000):  # every other 4 KiB: each piece an extent of its own
            os.pwrite(fd, b"\1" * 4096, i * 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert agent.call("Volume.delete", loc, timeout=120) == {"volumeID": loc["volumeID"],
                                                             "deleted": True}
    assert not os.path.exists(path)


def test_preallocating_slower_than_a_worker_deadline_is_done_not_timed_out(make_agent,
                                                                            workdir):
    """fallocate allocates every page of a tmpfs (1.1 s for 4 GiB here), and writes the
    whole file where a file system has none (glibc's fallback): a preallocated create and a
    preallocated extend heartbeat beside it, past the 0.5 s deadline set here."""
    agent = make_agent(workers={"deadline_seconds": 0.5, "kill_grace_seconds": 0.2,
                                "heartbeat_seconds": 0.1})
    with tmpfs(workdir / "mem", "5G") as mem:
        domain_id = new_id()
        agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(mem)})
        loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
        made = agent.call("Volume.create", {**loc, "size": 4 << 30,
                                            "preallocation": "preallocated"}, timeout=60)
        assert made["allocated"] >= 4 << 30
        assert agent.call("Volume.delete", loc, timeout=60)["deleted"]
        small = agent.call("Volume.create", {**loc, "size": MiB,
                                             "preallocation": "preallocated"})
        grown = agent.call("Volume.extend", {**loc, "size": 4 << 30}, timeout=60)
        assert grown["size"] == 4 << 30 and os.stat(small["path"]).st_blocks * 512 >= 4 << 30
