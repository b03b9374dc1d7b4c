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
from tests.support.storage_flow import MiB, ids, new_id

pytestmark = [needs_qemu, pytest.mark.timeout(180)]

SIZE = 64 * MiB


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
        assert _overlaps_only_covered(e, covered), e
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


SLOW = {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.05,
        "max_bytes_per_second": 4 * MiB}  # the rate paces data: top's ~9 MiB take 2 s+


def test_an_aborted_merge_keeps_its_volumes_from_everyone_until_it_is_continued(
        make_agent, workdir):
    agent = make_agent(copy=SLOW, recovery={"copy_policy": "manual"})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id)
    before = views(chain, workdir)
    base, top, child = chain[1], chain[2], chain[3]
    params = {"domainID": domain_id, "imageID": base["imageID"],
              "baseVolumeID": base["volumeID"], "topVolumeID": top["volumeID"]}
    agent.client().call("Image.merge", params, id="m1")
    wait_for(lambda: (agent.call("Image.getStatus", ids(base))["merge"] or {}).get("copied"),
             timeout=30, what="a checkpoint")
    wait_for(lambda: any(c["kind"] == "merge" and c["volumeID"] == base["volumeID"]
                         for c in agent.call("Host.getStats")["copies"]), timeout=30,
             what="the merge among the work in progress, with its rate")
    agent.call("Task.abort", {"taskID": "m1"})
    wait_for(lambda: task_state(agent, "m1") == "aborted", timeout=30, what="aborted")
    status = agent.call("Image.getStatus", ids(child))["merge"]
    assert status["running"] is False and status["step"] == "commit"
    assert agent.call("Volume.getInfo", ids(base))["legality"] == "ILLEGAL"
    refusals = [
        ("Volume.delete", ids(top), "VolumeHasChildren"),
        ("Volume.extend", {**ids(base), "size": 128 * MiB}, "VolumeHasChildren"),
        ("Volume.create", {**ids(top), "volumeID": new_id(),
                           "parentVolumeID": top["volumeID"]}, "VolumeIllegal"),
        ("Image.copy", {"src": ids(child), "dst": {**ids(child), "imageID": new_id()}},
         "VolumeIllegal"),
        ("Export.start", {**ids(child), "mode": "read"}, "VolumeIllegal"),
        ("Image.merge", {**params, "baseVolumeID": chain[0]["volumeID"],
                         "topVolumeID": base["volumeID"]}, "VolumeInUse"),
        ("Image.merge", {**params, "baseVolumeID": child["volumeID"],
                         "topVolumeID": new_id()}, "NoSuchVolume"),
    ]
    for method, p, name in refusals:
        with pytest.raises(CallError) as refused:
            agent.call(method, p)
        assert refused.value.error["data"]["name"] == name, (method, refused.value.error)
    for i in (0, 3):  # what a guest reads is untouched
        assert compare(chain[i]["path"], chain[i]["format"], before[i], "raw").returncode == 0
    merge(agent, base, top, task_id="m2")  # continued: done from where it stopped
    assert compare(child["path"], "cow", before[3], "raw").returncode == 0
    assert compare(base["path"], "cow", before[2], "raw").returncode == 0


def test_a_merge_is_refused_while_a_copy_reads_the_chain_from_any_host(make_agent, workdir):
    root, domain_id = str(workdir / "dom"), new_id()
    a = make_agent("a")
    a.call("StorageDomain.create", {"domainID": domain_id, "path": root})
    b = make_agent("b", copy=SLOW)
    b.call("StorageDomain.attach", {"domainID": domain_id, "path": root})
    chain = four_volume_chain(a, domain_id)
    params = {"domainID": domain_id, "imageID": chain[0]["imageID"],
              "baseVolumeID": chain[1]["volumeID"], "topVolumeID": chain[2]["volumeID"]}
    dst = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    b.client().call("Image.copy", {"src": ids(chain[3]), "dst": dst}, id="c1")
    for agent, reason in ((a, "copy-source"), (b, "copy-source")):  # storage; b's own task
        with pytest.raises(CallError) as refused:
            agent.call("Image.merge", params)
        assert refused.value.error["data"]["name"] == "VolumeInUse"
        assert refused.value.error["data"]["reason"] == reason
    b.call("Task.abort", {"taskID": "c1"})
    wait_for(lambda: task_state(b, "c1") == "aborted", timeout=30, what="the copy aborted")
    b.call("Volume.delete", dst)  # the copy given up: the chain is no copy's source now
    merge(a, chain[1], chain[2])


def test_a_leaf_in_an_unfinished_merge_cannot_be_deleted(make_agent, workdir):
    """Deleting a merge's top would leave base half-written for ever: refused by name."""
    agent = make_agent(copy=SLOW, recovery={"copy_policy": "manual"})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id)
    base, top = chain[2], chain[3]
    agent.client().call("Image.merge", {
        "domainID": domain_id, "imageID": base["imageID"], "baseVolumeID": base["volumeID"],
        "topVolumeID": top["volumeID"]}, id="m1")
    agent.call("Task.abort", {"taskID": "m1"})
    wait_for(lambda: task_state(agent, "m1") == "aborted", timeout=30, what="aborted")
    with pytest.raises(CallError) as refused:
        agent.call("Volume.delete", ids(top))
    assert refused.value.error["data"]["name"] == "VolumeInUse"
    assert refused.value.error["data"]["reason"] == "merge"
    assert agent.call("Volume.getInfo", ids(top))["legality"] == "ILLEGAL"


def test_a_merge_honours_the_copy_rate_limit(make_agent, workdir):
    """[copy] max_bytes_per_second paces a merge as it paces a copy, by the data it moves:
    the 9 MiB top holds at 4 MiB/s take two seconds at least, whatever the machine (a lower
    bound only; its zeros and what it does not hold cost nothing)."""
    agent = make_agent(copy={"max_bytes_per_second": 4 * MiB, "checkpoint_seconds": 0.1})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id)
    merge(agent, chain[0], chain[1])
    record = agent.call("Task.getStatus", {"taskID": "m1"})
    assert record["ended"] - record["started"] >= 1.9, record


def test_a_merge_under_an_export_served_here_is_refused_until_it_ends(domain):
    """A read export of the chain's leaf reads base and top: their data must not move under
    it. Refused by name while it serves; once stopped, the merge runs."""
    agent, domain_id = domain
    chain = four_volume_chain(agent, domain_id)
    client = agent.client()
    client.call("Export.start", {**ids(chain[-1]), "mode": "read"}, id="read")
    params = {"domainID": domain_id, "imageID": chain[0]["imageID"],
              "baseVolumeID": chain[1]["volumeID"], "topVolumeID": chain[2]["volumeID"]}
    with pytest.raises(CallError) as refused:
        agent.call("Image.merge", params)
    assert refused.value.error["data"]["name"] == "VolumeInUse"
    assert refused.value.error["data"]["reason"] == "export"
    assert agent.call("Volume.getInfo", ids(chain[1]))["legality"] == "LEGAL"
    agent.call("Export.stop", {"taskID": "read"})
    wait_for(lambda: task_state(agent, "read") == "done", timeout=30, what="export ended")
    merge(agent, chain[1], chain[2])
