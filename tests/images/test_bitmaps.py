"""Dirty bitmaps with real qemu tools: added, listed, removed and cleared through the agent;
the metadata and the image checked against each other, whatever was done to the image behind
the agent's back; a snapshot continues them; a backup's export serves their union over the
chain as qemu:dirty-bitmap:NAME."""

from __future__ import annotations

import subprocess

import pytest

from agent.client import CallError
from tests.images.chains import locks_held, needs_qemu, qemu_io
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, new_id

pytestmark = [needs_qemu, pytest.mark.timeout(120)]


@pytest.fixture
def agent(domain_agent):
    return domain_agent


def volume(agent, fmt: str = "cow", size: int = 64 * MiB, parent: dict | None = None) -> dict:
    if parent is not None:
        loc = {**parent, "volumeID": new_id()}
        info = agent.call("Volume.create", {**loc, "parentVolumeID": parent["volumeID"]})
    else:
        loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
        info = agent.call("Volume.create", {**loc, "size": size, "format": fmt})
    return {**loc, "path": info["path"]}


def listed(agent, vol: dict) -> dict:
    loc = {k: vol[k] for k in ("domainID", "imageID", "volumeID")}
    return {b["name"]: b for b in agent.call("Bitmap.list", loc)["bitmaps"]}


def image_bitmaps(path: str) -> dict:
    import json
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", path],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    spec = json.loads(out).get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in spec.get("bitmaps", [])}


def loc_of(vol: dict) -> dict:
    return {k: vol[k] for k in ("domainID", "imageID", "volumeID")}


def test_bitmaps_are_added_listed_removed_and_cleared(agent):
    vol = volume(agent)
    added = agent.call("Bitmap.add", {**loc_of(vol), "name": "b1"})
    assert added == {"volumeID": vol["volumeID"], "name": "b1", "granularity": 64 << 10,
                     "added": True, "already": False}
    again = agent.call("Bitmap.add", {**loc_of(vol), "name": "b1"})
    assert again["already"] is True and again["added"] is False
    agent.call("Bitmap.add", {**loc_of(vol), "name": "b2", "granularity": 1 << 20})
    assert set(image_bitmaps(vol["path"])) == {"b1", "b2"}
    assert image_bitmaps(vol["path"])["b2"]["granularity"] == 1 << 20
    states = listed(agent, vol)
    assert {n: (b["state"], b["reason"]) for n, b in states.items()} == {
        "b1": ("ok", None), "b2": ("ok", None)}
    with pytest.raises(CallError) as exc:
        agent.call("Bitmap.add", {**loc_of(vol), "name": "b2", "granularity": 65536})
    assert exc.value.name == "BitmapExists"
    assert agent.call("Bitmap.remove", {**loc_of(vol), "name": "b1"})["removed"] is True
    assert set(image_bitmaps(vol["path"])) == {"b2"} and set(listed(agent, vol)) == {"b2"}
    with pytest.raises(CallError) as exc:
        agent.call("Bitmap.remove", {**loc_of(vol), "name": "b1"})
    assert exc.value.name == "NoSuchBitmap" and exc.value.code == 220
    agent.call("Bitmap.add", {**loc_of(vol), "name": "b3"})
    cleared = agent.call("Bitmap.clear", loc_of(vol))
    assert cleared["removed"] == ["b2", "b3"]
    assert image_bitmaps(vol["path"]) == {} and listed(agent, vol) == {}


def test_a_raw_volume_has_no_bitmaps_and_bad_names_are_refused(agent):
    raw = volume(agent, fmt="raw")
    with pytest.raises(CallError) as exc:
        agent.call("Bitmap.add", {**loc_of(raw), "name": "b1"})
    assert exc.value.name == "BitmapsUnsupported" and exc.value.data["format"] == "raw"
    assert agent.call("Bitmap.list", loc_of(raw))["bitmaps"] == []
    cow = volume(agent)
    for bad in ("", "-x", "a b", "a/b", "x" * 129, "é"):
        with pytest.raises(CallError) as exc:
            agent.call("Bitmap.add", {**loc_of(cow), "name": bad})
        assert exc.value.code == -32602
    for bad in (100, 3 << 16, 1 << 30):
        with pytest.raises(CallError) as exc:
            agent.call("Bitmap.add", {**loc_of(cow), "name": "g", "granularity": bad})
        assert exc.value.code == -32602
    assert image_bitmaps(cow["path"]) == {}


def test_the_image_and_the_metadata_are_checked_against_each_other(agent):
    """What was done to the image behind the agent's back is named, never used."""
    vol = volume(agent)
    for name in ("gone", "stuck", "off", "fine"):
        agent.call("Bitmap.add", {**loc_of(vol), "name": name})
    subprocess.run(["qemu-img", "bitmap", "--remove", vol["path"], "gone"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", vol["path"], "off"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", vol["path"], "stranger"], check=True)
    set_in_use(vol["path"], "stuck")
    states = listed(agent, vol)
    assert {n: (b["state"], b["reason"]) for n, b in states.items()} == {
        "fine": ("ok", None), "gone": ("broken", "missing"), "off": ("broken", "disabled"),
        "stuck": ("broken", "in-use"), "stranger": ("unknown", "no-record")}
    for name, reason in (("gone", "missing"), ("stuck", "in-use"), ("off", "disabled")):
        with pytest.raises(CallError) as exc:
            agent.call("Export.start", {**loc_of(vol), "bitmap": name})
        assert exc.value.name == "BitmapBroken" and exc.value.data["reason"] == reason
    with pytest.raises(CallError) as exc:
        agent.call("Export.start", {**loc_of(vol), "bitmap": "stranger"})
    assert exc.value.name == "NoSuchBitmap"
    # An add of a name the image holds without a record starts it afresh.
    agent.call("Bitmap.add", {**loc_of(vol), "name": "stranger"})
    assert listed(agent, vol)["stranger"]["state"] == "ok"
    cleared = agent.call("Bitmap.clear", loc_of(vol))
    assert cleared["removed"] == ["fine", "gone", "off", "stranger", "stuck"]
    assert image_bitmaps(vol["path"]) == {} and listed(agent, vol) == {}


def set_in_use(path: str, name: str) -> None:
    """Set the in-use flag of a bitmap in the image's directory, as a writer killed with the
    image open leaves it (the flag a live qemu sets and clears again when it stores it)."""
    from agent.storage import qcow2
    head = qcow2.read(path)
    offset, size = head.bitmap_directory
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        at = 0
        while at < len(data):
            name_size = int.from_bytes(data[at + 18:at + 20], "big")
            extra = int.from_bytes(data[at + 20:at + 24], "big")
            found = data[at + 24 + extra:at + 24 + extra + name_size].decode()
            if found == name:
                data[at + 15] |= qcow2.IN_USE
            at = (at + 24 + extra + name_size + 7) & ~7
        f.seek(offset)
        f.write(data)


def test_a_snapshot_continues_the_bitmaps_of_its_parent(agent):
    base = volume(agent)
    agent.call("Bitmap.add", {**loc_of(base), "name": "b1"})
    agent.call("Bitmap.add", {**loc_of(base), "name": "bad"})
    subprocess.run(["qemu-img", "bitmap", "--remove", base["path"], "bad"], check=True)
    top = volume(agent, parent=loc_of(base))
    states = listed(agent, top)
    assert set(states) == {"b1"}  # a broken one is not continued
    assert states["b1"]["state"] == "ok" and states["b1"]["continues"] is True
    assert image_bitmaps(top["path"])["b1"]["flags"] == ["auto"]
    with pytest.raises(CallError) as exc:  # checkpoints start in the leaf
        agent.call("Export.start", {**loc_of(base), "checkpoint": "c1"})
    assert exc.value.name == "VolumeHasChildren"


def dirty_extents(socket_path: str, name: str) -> list[tuple[int, int]]:
    import nbd
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:" + name)
    h.connect_unix(socket_path)
    out: list[tuple[int, int]] = []

    def got(context, offset, entries, err):
        if context == "qemu:dirty-bitmap:" + name:
            at = offset
            for i in range(0, len(entries), 2):
                if entries[i + 1] & 1:
                    out.append((at, entries[i]))
                at += entries[i]
        return 0
    size, at = h.get_size(), 0
    while at < size:
        before = len(out)
        h.block_status(size - at, at, got)
        at = max([at] + [o + n for o, n in out[before:]]) if len(out) > before else size
    h.shutdown()
    return merged(out)


def merged(extents):
    out = []
    for o, n in sorted(extents):
        if out and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((o, n))
    return out


def test_a_backup_export_serves_the_union_of_a_bitmap_over_the_chain(agent):
    base = volume(agent)
    qemu_io(base["path"], "cow", f"write -P 1 0 {4 * MiB}")  # before the bitmap: not dirty
    agent.call("Bitmap.add", {**loc_of(base), "name": "b1"})
    qemu_io(base["path"], "cow", f"write -P 2 {8 * MiB} {MiB}")
    top = volume(agent, parent=loc_of(base))
    qemu_io(top["path"], "cow", f"write -P 3 {16 * MiB} {MiB}", f"write -z 0 {MiB}",
            f"discard {32 * MiB} {MiB}")
    exp = agent.call("Export.start", {**loc_of(top), "bitmap": "b1", "checkpoint": "b2"},
                     id="backup")
    assert exp["bitmap"] == "b1" and exp["checkpoint"] == "b2"
    assert dirty_extents(exp["socket"], "b1") == [
        (0, MiB), (8 * MiB, MiB), (16 * MiB, MiB), (32 * MiB, MiB)]
    agent.call("Export.stop", {"taskID": "backup"})
    wait_for(lambda: task_state(agent, "backup") == "done", 30, what="the export's end")
    assert listed(agent, top)["b2"]["state"] == "ok"
    assert image_bitmaps(top["path"])["b2"]["flags"] == ["auto"]


def test_the_bitmap_directory_is_read_from_the_bytes_as_qemu_reads_it(tmp_path):
    """The agent's own reading of the directory agrees with qemu's on names, flags and
    granularities, and a directory the header places past the file's end is refused."""
    import struct

    from agent import errors
    from agent.storage import qcow2
    path = str(tmp_path / "a.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    for name, gran in (("a", 65536), ("checkpoint-0b5c", 1 << 20), ("z" * 100, 512)):
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(gran), path, name],
                       check=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", path, "a"], check=True)
    head = qcow2.read(path)
    ours = {b.name: (b.granularity, b.auto, b.in_use) for b in qcow2.bitmaps(path, head)}
    theirs = {n: (b["granularity"], "auto" in b["flags"], "in-use" in b["flags"])
              for n, b in image_bitmaps(path).items()}
    assert ours == theirs and len(ours) == 3
    offset = None
    with open(path, "rb") as f:
        data = f.read(65536)
    at = struct.unpack_from(">I", data, 100)[0]
    while offset is None:
        kind, length = struct.unpack_from(">II", data, at)
        if kind == qcow2.EXT_BITMAPS:
            offset = at + 24
        at += 8 + ((length + 7) & ~7)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(errors.ImageInvalid) as exc:
        qcow2.bitmaps(path, qcow2.read(path))
    assert exc.value.data["reason"] == "corrupt"


def test_a_grown_volume_keeps_its_bitmaps_tracking(agent):
    """qemu-img resize carries the bitmaps to the new size: what the guest writes past the
    old end, and before it, is marked."""
    vol = volume(agent, size=16 * MiB)
    agent.call("Bitmap.add", {**loc_of(vol), "name": "b1"})
    qemu_io(vol["path"], "cow", f"write -P 1 {MiB} {MiB}")
    agent.call("Volume.extend", {**loc_of(vol), "size": 48 * MiB})
    qemu_io(vol["path"], "cow", f"write -P 2 {40 * MiB} {MiB}")
    assert listed(agent, vol)["b1"]["state"] == "ok"
    exp = agent.call("Export.start", {**loc_of(vol), "bitmap": "b1"}, id="grown")
    assert exp["size"] == 48 * MiB
    assert dirty_extents(exp["socket"], "b1") == [(MiB, MiB), (40 * MiB, MiB)]
    agent.call("Export.stop", {"taskID": "grown"})
    wait_for(lambda: task_state(agent, "grown") == "done", 30, what="the export's end")


def guest(workdir, path: str) -> subprocess.Popen:
    """A qemu holding the image open for writing, as a guest's would (here qemu-nbd), once
    it has opened it: its descriptor carries qemu's locks and it has marked every bitmap in
    use (its socket comes before both, so it proves nothing)."""
    sock = str(workdir / f"guest-{new_id()[:8]}.sock")
    proc = subprocess.Popen(["qemu-nbd", "--persistent", "-k", sock, "-f", "qcow2", path],
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: locks_held(proc.pid, path) and all(
            "in-use" in b["flags"] for b in image_bitmaps(path).values()), 30, interval=0.05,
            what="the guest's qemu to open the image")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def test_a_volume_a_guest_has_open_is_named_in_use(agent, workdir):
    """While a guest's qemu has the image open, a bitmap change or a checkpoint is refused
    by name and nothing changes; a guest that ends stores its bitmaps (ok), one killed
    leaves them in use (broken, never used)."""
    vol = volume(agent)
    agent.call("Bitmap.add", {**loc_of(vol), "name": "b1"})
    running = guest(workdir, vol["path"])
    try:
        for verb, extra in (("Bitmap.add", {"name": "b2"}), ("Bitmap.remove", {"name": "b1"}),
                            ("Bitmap.clear", {}), ("Export.start", {"checkpoint": "c1"})):
            with pytest.raises(CallError) as exc:
                agent.call(verb, {**loc_of(vol), **extra}, id=new_id())
            assert exc.value.name == "VolumeInUse" and exc.value.data["reason"] == "open", \
                (verb, exc.value.data)
    finally:
        running.terminate()  # qemu stores its bitmaps as it closes the image
        running.wait(10)
    assert set(image_bitmaps(vol["path"])) == {"b1"}
    assert listed(agent, vol)["b1"]["state"] == "ok"
    killed = guest(workdir, vol["path"])
    killed.kill()
    killed.wait(10)
    assert (listed(agent, vol)["b1"]["state"], listed(agent, vol)["b1"]["reason"]) == \
        ("broken", "in-use")


def test_a_backup_export_holds_no_lease_once_it_serves(agent):
    """The checkpoint and the bitmap's union are made under the volume's lease; the export
    then serves without it, as every read export does."""
    vol = volume(agent)
    agent.call("Bitmap.add", {**loc_of(vol), "name": "b1"})
    for extra in ({"checkpoint": "c1"}, {"bitmap": "b1", "checkpoint": "c2"}):
        tid = f"backup-{new_id()[:8]}"
        agent.call("Export.start", {**loc_of(vol), **extra}, id=tid)
        lease = agent.call("Volume.getInfo", loc_of(vol))["lease"]
        assert lease is None or lease["live"] is False, lease
        agent.call("Export.stop", {"taskID": tid})
        wait_for(lambda: task_state(agent, tid) == "done", 30, what="the export's end")
    assert {n: b["state"] for n, b in listed(agent, vol).items()} == {
        "b1": "ok", "c1": "ok", "c2": "ok"}
