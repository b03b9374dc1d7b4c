"""Merges (Image.merge) through a real agent, real qemu tools and real files: a four-volume
chain (a raw base and three cow snapshots, each with data, zeros and discards of its own)
merged pair by pair in every position, each remaining guest view compared by qemu-img with a
copy taken before, every qcow2 checked, base's allocation checked with qemu-img map."""

from __future__ import annotations

import subprocess

import pytest

from agent.client import CallError
from tests.images.chains import check, compare, map_allocated, needs_qemu, qemu_io
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, new_id

pytestmark = [needs_qemu, pytest.mark.timeout(180)]

SIZE = 64 * MiB


def ids(v):
    return {k: v[k] for k in ("domainID", "imageID", "volumeID")}


def four_volume_chain(agent, domain_id: str, base_format: str = "raw",
                      preallocation: str = "sparse") -> list[dict]:
    """raw (or cow) base, three cow snapshots; each layer writes data, zeroes a range and
    discards another, over what the layers beneath hold, so every merge has all three
    kinds of extent to carry and every other view something to lose."""
    image, parent, out = new_id(), None, []
    for i in range(4):
        loc = {"domainID": domain_id, "imageID": image, "volumeID": new_id()}
        params = dict(loc, size=SIZE, format=base_format, preallocation=preallocation) \
            if parent is None else dict(loc, parentVolumeID=parent)
        info = agent.call("Volume.create", params)
        p = 10 * (i + 1)
        commands = [f"write -P {p} {i * 4 * MiB} {8 * MiB}",
                    f"write -P {p + 1} {SIZE // 2 + i * MiB} {MiB + 4096}",
                    f"write -z {(i * 4 + 2) * MiB} {MiB}",
                    f"discard {SIZE - (i + 1) * 2 * MiB} {MiB}"]
        if i == 0:
            commands = [f"write -P 1 0 {SIZE - 8 * MiB}"] + commands
        qemu_io(info["path"], info["format"], *commands)
        out.append({**loc, "path": info["path"], "format": info["format"]})
        parent = loc["volumeID"]
    return out


def views(chain: list[dict], into) -> list[str]:
    """Each volume's guest view, as a raw file (qemu-img convert of its chain)."""
    out = []
    for i, v in enumerate(chain):
        path = str(into / f"view{i}.raw")
        subprocess.run(["qemu-img", "convert", "-f", "raw" if v["format"] == "raw" else
                        "qcow2", "-O", "raw", v["path"], path], check=True, timeout=120)
        out.append(path)
    return out


def merge(agent, base: dict, top: dict, task_id: str = "m1") -> dict:
    answer = agent.client().call("Image.merge", {
        "domainID": base["domainID"], "imageID": base["imageID"],
        "baseVolumeID": base["volumeID"], "topVolumeID": top["volumeID"]}, id=task_id)
    wait_for(lambda: task_state(agent, task_id) in ("done", "failed"), timeout=120,
             what="the merge ended")
    record = agent.call("Task.getStatus", {"taskID": task_id})
    assert record["state"] == "done", record
    return answer


@pytest.fixture
def domain(make_agent, workdir):
    agent = make_agent()
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    return agent, domain_id


@pytest.mark.parametrize("position", [0, 1, 2], ids=["base+middle", "middle+middle",
                                                    "middle+leaf"])
@pytest.mark.parametrize("base_format", ["raw", "cow"])
def test_a_merge_in_every_position_keeps_every_guest_view(domain, workdir, position,
                                                          base_format):
    agent, domain_id = domain
    chain = four_volume_chain(agent, domain_id, base_format)
    before = views(chain, workdir)
    base, top = chain[position], chain[position + 1]
    base_data = {(e["start"], e["length"]) for e in map_allocated(base["path"],
                                                                  base["format"])}
    top_map = map_allocated(top["path"], "cow")
    answer = merge(agent, base, top)
    assert answer["state"] == "merging" and answer["volumeID"] == base["volumeID"]
    rest = [v for v in chain if v is not top]
    info = agent.call("Image.getInfo", {"domainID": domain_id, "imageID": base["imageID"]})
    assert [v["volumeID"] for v in info["chain"]] == [v["volumeID"] for v in rest]
    assert all(v["legality"] == "LEGAL" for v in info["chain"]) and info["merges"] == []
    for i, v in enumerate(rest):  # base now shows top's view; every other one its own
        want = before[chain.index(top)] if v is base else before[chain.index(v)]
        same = compare(v["path"], v["format"], want, "raw")
        assert same.returncode == 0, (i, same.stdout)
        if v["format"] == "cow":
            assert check(v["path"])["check-errors"] == 0
    with pytest.raises(FileNotFoundError):
        open(top["path"], "rb")
    # Thin: base holds its own extents and top's, nothing else.
    covered = sorted(base_data | {(e["start"], e["length"]) for e in top_map})
    for e in map_allocated(base["path"], base["format"]):
        assert any(s <= e["start"] and e["start"] + e["length"] <= s + n
                   or _overlaps_only_covered(e, covered) for s, n in covered), e
    vol = agent.call("Volume.getInfo", ids(base))
    assert vol["generation"] >= 2 and vol["size"] == SIZE


def _overlaps_only_covered(extent: dict, covered: list) -> bool:
    """Whether every byte of the extent lies in one of the covered ranges."""
    pos, end = extent["start"], extent["start"] + extent["length"]
    for s, n in covered:
        if s <= pos < s + n:
            pos = s + n
            if pos >= end:
                return True
    return pos >= end


def test_a_merge_into_a_smaller_base_grows_it_and_a_preallocated_base_stays_whole(
        domain, workdir):
    agent, domain_id = domain
    chain = four_volume_chain(agent, domain_id, "raw", preallocation="preallocated")
    leaf = chain[-1]
    grown = agent.call("Volume.extend", {**ids(leaf), "size": SIZE + 16 * MiB})
    assert grown["extended"] and grown["size"] == SIZE + 16 * MiB
    qemu_io(leaf["path"], "cow", f"write -P 99 {SIZE + 4 * MiB} {MiB}")
    before = views(chain, workdir)
    merge(agent, chain[2], leaf)
    info = agent.call("Volume.getInfo", ids(chain[2]))
    assert info["size"] == SIZE + 16 * MiB and info["leaf"]
    assert compare(info["path"], "cow", before[3], "raw").returncode == 0
    held = agent.call("Volume.getInfo", ids(chain[0]))["allocated"]
    merge(agent, chain[0], chain[1], task_id="m2")
    base = agent.call("Volume.getInfo", ids(chain[0]))
    assert base["allocated"] >= held  # preallocated: top's zeros written, never punched
    assert compare(chain[2]["path"], "cow", before[3], "raw").returncode == 0


def test_a_merge_asked_again_is_answered_done_and_wrong_pairs_are_refused(domain):
    agent, domain_id = domain
    chain = four_volume_chain(agent, domain_id)
    params = {"domainID": domain_id, "imageID": chain[0]["imageID"]}
    with pytest.raises(CallError) as not_adjacent:
        agent.call("Image.merge", {**params, "baseVolumeID": chain[0]["volumeID"],
                                   "topVolumeID": chain[2]["volumeID"]})
    assert not_adjacent.value.code == -32602
    merge(agent, chain[1], chain[2])
    again = agent.call("Image.merge", {**params, "baseVolumeID": chain[1]["volumeID"],
                                       "topVolumeID": chain[2]["volumeID"]})
    assert again["state"] == "done" and again["already"] is True
    with pytest.raises(CallError) as gone:
        agent.call("Image.merge", {**params, "baseVolumeID": chain[0]["volumeID"],
                                   "topVolumeID": new_id()})
    assert gone.value.error["data"]["name"] == "NoSuchVolume"
