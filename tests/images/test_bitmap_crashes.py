"""Every operation that changes a dirty bitmap, its worker SIGKILLed after each of its writes
in turn (every image write and every metadata commit, through the crash seam), then the agent
restarted and the operation asked again: at every point each bitmap is right or named
broken, never wrong.

Right is checked from outside, by what the bitmap says through a backup's export: a bitmap
that says it is ok must mark every range the guest wrote since it was known to exist (the
probes below, written with qemu-io as a guest's qemu writes); one that is broken or unknown
is refused by name. Then the agent SIGKILLed itself, mid-merge and mid-backup."""

from __future__ import annotations

import json
import signal

import pytest

from agent.client import CallError
from tests.images.chains import compare, needs_qemu, qemu_io
from tests.images.test_bitmaps import dirty_extents
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, new_id
from workers.testseams import ENV

pytestmark = [needs_qemu, pytest.mark.timeout(600)]
SIZE = 32 * MiB
MAX_POINTS = 40  # writes of the biggest operation here (a merge), with room


class Disk:
    """An image's chain and what each bitmap must mark: the probes written since it was
    known to exist, by name."""

    def __init__(self, agent, domain_id: str):
        self.agent, self.domain_id = agent, domain_id
        self.image = new_id()
        self.chain: list[dict] = []
        self.must: dict[str, list[tuple[int, int]]] = {}
        self.next_probe = 0

    def loc(self, i: int = -1) -> dict:
        return {"domainID": self.domain_id, "imageID": self.image,
                "volumeID": self.chain[i]["volumeID"]}

    def path(self, i: int = -1) -> str:
        return self.agent.call("Volume.getInfo", self.loc(i))["path"]

    def resync(self) -> None:
        """The chain as the agent has it now (a merge killed after its last commit ended:
        its top is gone)."""
        info = self.agent.call("Image.getInfo", {"domainID": self.domain_id,
                                                 "imageID": self.image})
        have = {v["volumeID"] for v in info["chains"][0]}
        self.chain = [v for v in self.chain if v["volumeID"] in have]

    def legal(self) -> bool:
        return self.agent.call("Volume.getInfo", self.loc())["legality"] == "LEGAL"

    def probe(self) -> None:
        """A guest write into the leaf, which every ok bitmap of the leaf must mark (none
        while a merge holds it ILLEGAL: no guest runs on a disk being merged)."""
        if not self.legal():
            return
        at = (self.next_probe % 28) * MiB + (self.next_probe // 28) * 64 * 1024
        self.next_probe += 1
        qemu_io(self.path(), "cow", f"write -P {self.next_probe % 250 + 1} {at} 64k")
        for name in self.ok_names():
            self.must.setdefault(name, []).append((at, 64 * 1024))

    def ok_names(self) -> list[str]:
        return [b["name"] for b in self.agent.call("Bitmap.list", self.loc())["bitmaps"]
                if b["state"] == "ok"]


def right_or_broken(disk: Disk) -> None:
    """Every bitmap of the leaf, as a backup's export serves it: ok ones mark every probe
    written since they were known; the others are refused by name."""
    agent = disk.agent
    if not disk.legal():  # a merge cut short: nobody reads it until it ends
        return
    for b in agent.call("Bitmap.list", disk.loc())["bitmaps"]:
        tid = f"check-{new_id()[:8]}"
        try:
            exp = agent.client().call("Export.start", {**disk.loc(), "bitmap": b["name"]},
                                      id=tid, timeout=60)
        except CallError as exc:
            assert exc.name in ("BitmapBroken", "NoSuchBitmap"), json.dumps(exc.data)
            assert b["state"] != "ok" or exc.name == "BitmapBroken", (b, exc)
            disk.must.pop(b["name"], None)  # named: a client starts over with a full backup
            agent.named_broken = getattr(agent, "named_broken", 0) + 1
            continue
        try:
            assert b["state"] == "ok", b
            dirty = dirty_extents(exp["socket"], b["name"])
        finally:
            agent.call("Export.stop", {"taskID": tid})
            wait_for(lambda: task_state(agent, tid) == "done", 30, what="the check's export")
        for at, n in disk.must.get(b["name"], []):
            assert any(o <= at and at + n <= o + length for o, length in dirty), \
                (b["name"], at, dirty)


@pytest.fixture
def swept(make_agent, workdir):
    """An agent whose copies and merges are continued by the test, not its start-up, and
    checkpoint every MiB (so that kills land inside their data's move too), and a domain.
    By bytes only: checkpoints by time (0.05 s here once) moved the write points with the
    machine's load, so the Nth write of one run was not the Nth of the next, and a merge's
    sweep could step over every point inside its commit (1 run in ~30 under -n 2)."""
    a = make_agent(recovery={"copy_policy": "manual"},
                   copy={"checkpoint_bytes": MiB, "checkpoint_seconds": 3600})
    a.domain_id = new_id()
    a.call("StorageDomain.create", {"domainID": a.domain_id, "path": str(workdir / "dom")})
    return a


def sweep(a, op: str, setup, action, probe_between: bool = True) -> int:
    """`action(disk)` with the worker of `op` killed after its 1st, 2nd, ... write, each
    time on a fresh disk made by `setup(agent, domain_id)`; after each kill the agent is
    restarted without faults, the bitmaps checked, the action asked again to its end and
    checked again. `probe_between` False: no guest write between the kill and the action
    asked again (a copy's source: a copy resumed past a write it never saw would differ
    from it, and no guest writes a disk being copied). Returns the number of crash points
    swept."""
    for n in range(1, MAX_POINTS):
        disk = setup(a, a.domain_id)
        disk.probe()
        a.kill(signal.SIGKILL)
        a.start(env={ENV: json.dumps({"crash_after_writes": n, "op": op})})
        crashed = action(disk, expect_crash=True)
        a.kill(signal.SIGKILL)
        a.start()
        disk.resync()
        right_or_broken(disk)
        if probe_between:
            disk.probe()
        action(disk, expect_crash=False)
        disk.probe()
        right_or_broken(disk)
        if not crashed:
            return n
    raise AssertionError(f"{op} still crashing after {MAX_POINTS} writes")


def call(disk: Disk, method: str, params: dict, expect_crash: bool) -> bool:
    """Whether the call died with its worker (only when a crash is armed)."""
    try:
        disk.agent.call(method, params, timeout=60)
    except CallError as exc:
        if expect_crash and exc.name == "WorkerDied":
            return True
        if exc.name in ("BitmapExists", "NoSuchBitmap") and not expect_crash:
            return False  # asked again after a kill that came after it took effect
        raise
    return False


def volume(agent, domain_id: str, names=("b1", "b2")) -> Disk:
    disk = Disk(agent, domain_id)
    loc = {"domainID": domain_id, "imageID": disk.image, "volumeID": new_id()}
    agent.call("Volume.create", {**loc, "size": SIZE, "format": "cow"})
    disk.chain.append(loc)
    for name in names:
        agent.call("Bitmap.add", {**loc, "name": name})
    return disk


def snapshot(disk: Disk, expect_crash: bool = False) -> bool:
    """A snapshot of the leaf; asked again with the same IDs after a kill (as a client
    retries a request whose answer it lost)."""
    loc = getattr(disk, "pending", None) or {**disk.loc(), "volumeID": new_id()}
    disk.pending = loc
    try:
        died = call(disk, "Volume.create", {**loc, "parentVolumeID": disk.loc()["volumeID"]},
                    expect_crash)
    except CallError as exc:
        if exc.name != "VolumeExists" or expect_crash:
            raise
        died = False  # made by the attempt that was killed before its answer
    if not died:
        disk.chain.append(loc)
        disk.pending = None
    return died


@pytest.mark.parametrize("op,points", [("add", 3), ("remove", 3), ("clear", 4)])
def test_bitmap_add_remove_and_clear_killed_at_every_write(swept, op, points):
    params = {"add": {"name": "new"}, "remove": {"name": "b1"}, "clear": {}}[op]

    def action(disk, expect_crash):
        return call(disk, f"Bitmap.{op}", {**disk.loc(), **params}, expect_crash)
    assert sweep(swept, f"bitmap.{op}", volume, action) == points


def test_a_snapshot_killed_at_every_write_continues_the_bitmaps_or_leaves_nothing(swept):
    def snap(disk, expect_crash):
        return snapshot(disk, expect_crash) if len(disk.chain) == 1 else False
    assert sweep(swept, "volume.create", volume, snap) == 4  # two bitmaps, one row


def test_a_merge_killed_at_every_write_folds_the_bitmaps_or_names_them_broken(swept):
    def setup(agent, domain_id):
        disk = volume(agent, domain_id)
        qemu_io(disk.path(), "cow", f"write -P 9 0 {4 * MiB}")
        snapshot(disk)
        agent.call("Bitmap.add", {**disk.loc(), "name": "top-only"})
        qemu_io(disk.path(), "cow", f"write -P 8 {8 * MiB} {4 * MiB}")
        return disk

    def merge(disk, expect_crash):
        if len(disk.chain) == 1:
            return False  # merged already
        tid = f"merge-{new_id()[:8]}"
        params = {"domainID": disk.domain_id, "imageID": disk.image,
                  "baseVolumeID": disk.chain[0]["volumeID"],
                  "topVolumeID": disk.chain[1]["volumeID"]}
        try:
            disk.agent.call("Image.merge", params, id=tid, timeout=60)
        except CallError as exc:
            assert expect_crash and exc.name == "WorkerDied", exc
            return True
        wait_for(lambda: task_state(disk.agent, tid) in ("done", "failed"), 120,
                 what="the merge")
        if task_state(disk.agent, tid) == "failed":
            assert expect_crash, (disk.agent.call("Task.getStatus", {"taskID": tid})["error"],
                                  disk.agent.log()[-4000:])
            return True
        disk.chain.pop()
        for name in list(disk.must):  # top's probes now live in base, under its names
            disk.must.setdefault(name, [])
        return False

    points = sweep(swept, "image.merge", setup, merge)
    assert points >= 4
    # Killed while its commit wrote base, qemu's writer left base's bitmaps in use: named
    # broken, as qemu itself would refuse them; killed elsewhere, they were folded right.
    assert 0 < swept.named_broken < 3 * points


def test_a_chain_copy_killed_at_every_write_carries_the_bitmaps_or_names_them(swept,
                                                                               workdir):
    other = new_id()

    def setup(agent, domain_id):
        try:
            agent.call("StorageDomain.create", {"domainID": other,
                                                "path": str(workdir / "other")})
        except CallError as exc:
            assert exc.name == "DomainExists", exc
        disk = volume(agent, domain_id)
        snapshot(disk)
        disk.copy = {"domainID": other, "imageID": disk.image,
                     "volumeID": disk.chain[-1]["volumeID"]}
        return disk

    def copy(disk, expect_crash):
        tid = f"copy-{new_id()[:8]}"
        try:
            disk.agent.call("Image.copy", {"src": disk.loc(), "dst": disk.copy,
                                           "mode": "chain"}, id=tid, timeout=60)
        except CallError as exc:
            if exc.name == "VolumeExists" and not expect_crash:
                return False
            assert expect_crash and exc.name == "WorkerDied", exc
            return True
        wait_for(lambda: task_state(disk.agent, tid) in ("done", "failed"), 120,
                 what="the copy")
        if task_state(disk.agent, tid) == "failed":
            assert expect_crash, (disk.agent.call("Task.getStatus", {"taskID": tid})["error"],
                                  disk.agent.log()[-4000:])
            return True
        copied = Disk(disk.agent, other)
        copied.image, copied.chain = disk.image, [disk.copy]
        copied.must = {k: list(v) for k, v in disk.must.items()}
        right_or_broken(copied)
        assert compare(copied.path(), "cow", disk.path(), "cow").returncode == 0
        return False

    assert sweep(swept, "image.copy", setup, copy, probe_between=False) >= 3


def test_the_agent_killed_mid_merge_leaves_bitmaps_right_or_named_once_recovered(
        make_agent, workdir):
    """The agent itself SIGKILLed while the merge's commit writes base; its start-up
    finishes the merge: the bitmaps base's killed writer held open are named broken (as
    qemu names them), the one only top had is folded right."""
    a = make_agent(copy={"checkpoint_bytes": MiB, "checkpoint_seconds": 0.05,
                         "max_bytes_per_second": 4 * MiB},
                   recovery={"copy_policy": "resume", "backoff_seconds": 0.1})
    domain_id = new_id()
    a.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    disk = volume(a, domain_id)
    snapshot(disk)
    a.call("Bitmap.add", {**disk.loc(), "name": "top-only"})
    disk.probe()
    qemu_io(disk.path(), "cow", f"write -P 7 {4 * MiB} {12 * MiB}")
    base, top = disk.chain
    a.call("Image.merge", {"domainID": domain_id, "imageID": disk.image,
                           "baseVolumeID": base["volumeID"], "topVolumeID": top["volumeID"]},
           id="m1")

    def mid_commit():  # the commit's qemu-nbd holds base open for writing
        progress = a.call("Task.getStatus", {"taskID": "m1"})["progress"]
        return progress is not None and 20 < progress < 80
    wait_for(mid_commit, 60, what="the commit half-way")
    a.kill(signal.SIGKILL)
    a.start()
    # LEGAL is the merge's last commit; its worker still holds base's lease a moment after.
    wait_for(lambda: (i := a.call("Volume.getInfo", base))["legality"] == "LEGAL"
             and not (i["lease"] or {}).get("live"), 120,
             what="the merge finished by start-up recovery, its worker gone")
    disk.resync()
    assert [v["volumeID"] for v in disk.chain] == [base["volumeID"]]
    states = {b["name"]: (b["state"], b["reason"])
              for b in a.call("Bitmap.list", base)["bitmaps"]}
    assert states == {"b1": ("broken", "in-use"), "b2": ("broken", "in-use"),
                      "top-only": ("ok", None)}
    right_or_broken(disk)
    disk.probe()
    right_or_broken(disk)
