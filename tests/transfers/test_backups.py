"""`hostagent backup`, full and incremental, with real qemu tools and a real agent: a disk
written, a full backup with a checkpoint, more writes (data, zeros, discards), incremental
backups of only the changed extents (the bytes read counted), and the chain of backups
restored equal to the disk (`qemu-img compare`); across a snapshot, a merge and a chain
copy to another domain in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.images.chains import compare, needs_qemu, qemu_io, qemu_nbd_under
from tests.support.harness import REPO, task_state, wait_for
from tests.support.storage_flow import MiB, new_id
from tests.transfers.helpers import hostagent, killed_mid_way, run

pytestmark = [needs_qemu, pytest.mark.timeout(300)]
SIZE = 64 * MiB


def spec(loc: dict) -> str:
    return f"{loc['domainID']}/{loc['imageID']}/{loc['volumeID']}"


def backup(agent, loc, path, *extra) -> dict:
    code, answer, err = run(agent, "backup", spec(loc), str(path), *extra)
    assert code == 0, (answer, err)
    assert answer["state"] == "done"
    return answer


def restored_equal(chain_top: str, volume_path: str) -> None:
    """The chain of backup files (its top, backing files as named) reads as the volume."""
    got = compare(chain_top, "cow", volume_path, "cow")
    assert got.returncode == 0, got.stdout + got.stderr


def info(agent, loc):
    return agent.call("Volume.getInfo", loc)


def test_incremental_backups_read_only_what_changed_and_restore_the_disk(domain_agent,
                                                                         workdir):
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    path = agent.call("Volume.create", {**loc, "size": SIZE, "format": "cow"})["path"]
    qemu_io(path, "cow", f"write -P 1 0 {16 * MiB}", f"write -P 2 {40 * MiB} {8 * MiB}")
    full = workdir / "full.qcow2"
    answer = backup(agent, loc, full, "--checkpoint", "c1")
    assert answer["bytes"]["read"] == 24 * MiB
    restored_equal(str(full), path)

    # data, zeros over data, a discard of data, data into a hole
    qemu_io(path, "cow", f"write -P 3 {MiB} {MiB}", f"write -z {4 * MiB} {2 * MiB}",
            f"discard {40 * MiB} {MiB}", f"write -P 4 {60 * MiB} {512 << 10}")
    inc1 = workdir / "inc1.qcow2"
    answer = backup(agent, loc, inc1, "--incremental", "c1", "--base", str(full),
                    "--checkpoint", "c2")
    assert answer["bytes"]["read"] == MiB + (512 << 10)  # zeros and discards: never read
    assert answer["bytes"]["zeroed"] >= 3 * MiB
    restored_equal(str(inc1), path)
    backing = subprocess.run(["qemu-img", "info", "--output=json", str(inc1)],
                             capture_output=True, text=True, check=True).stdout
    assert '"backing-filename": "full.qcow2"' in backing

    # nothing written since c2: an incremental of nothing
    inc2 = workdir / "inc2.qcow2"
    answer = backup(agent, loc, inc2, "--incremental", "c2", "--base", str(inc1))
    assert answer["bytes"]["read"] == 0
    restored_equal(str(inc2), path)


def copy_done(agent, src, dst, **extra) -> None:
    tid = f"copy-{new_id()[:8]}"
    agent.call("Image.copy", {"src": src, "dst": dst, **extra}, id=tid)
    wait_for(lambda: task_state(agent, tid) in ("done", "failed"), 120, what="the copy")
    assert task_state(agent, tid) == "done", agent.call("Task.getStatus", {"taskID": tid})


def merge_done(agent, loc, base, top) -> None:
    tid = f"merge-{new_id()[:8]}"
    agent.call("Image.merge", {"domainID": loc["domainID"], "imageID": loc["imageID"],
                               "baseVolumeID": base, "topVolumeID": top}, id=tid)
    wait_for(lambda: task_state(agent, tid) in ("done", "failed"), 120, what="the merge")
    assert task_state(agent, tid) == "done", agent.call("Task.getStatus", {"taskID": tid})


def states(agent, loc) -> dict:
    return {b["name"]: (b["state"], b["continues"])
            for b in agent.call("Bitmap.list", loc)["bitmaps"]}


def test_backups_go_on_across_a_snapshot_a_merge_and_copies(domain_agent, workdir):
    agent = domain_agent
    other = new_id()
    agent.call("StorageDomain.create", {"domainID": other, "path": str(workdir / "other")})
    v0 = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    p0 = agent.call("Volume.create", {**v0, "size": SIZE, "format": "cow"})["path"]
    qemu_io(p0, "cow", f"write -P 1 0 {16 * MiB}")
    backup(agent, v0, workdir / "full.qcow2", "--checkpoint", "c1")

    # a snapshot continues c1; the backup reads the union of both layers
    qemu_io(p0, "cow", f"write -P 2 {20 * MiB} {MiB}")
    v1 = {**v0, "volumeID": new_id()}
    p1 = agent.call("Volume.create", {**v1, "parentVolumeID": v0["volumeID"]})["path"]
    assert states(agent, v1) == {"c1": ("ok", True)}
    qemu_io(p1, "cow", f"write -P 3 {30 * MiB} {MiB}", f"write -z 0 {MiB}",
            f"discard {8 * MiB} {MiB}")
    answer = backup(agent, v1, workdir / "inc1.qcow2", "--incremental", "c1", "--base",
                    str(workdir / "full.qcow2"), "--checkpoint", "c2")
    assert answer["bytes"]["read"] == 2 * MiB
    restored_equal(str(workdir / "inc1.qcow2"), p1)

    # the snapshot merged into its parent: c1 and c2 now live in the one volume
    qemu_io(p1, "cow", f"write -P 4 {40 * MiB} {MiB}")
    merge_done(agent, v0, v0["volumeID"], v1["volumeID"])
    assert states(agent, v0) == {"c1": ("ok", False), "c2": ("ok", False)}
    qemu_io(p0, "cow", f"write -P 5 {50 * MiB} {MiB}")
    answer = backup(agent, v0, workdir / "inc2.qcow2", "--incremental", "c2", "--base",
                    str(workdir / "inc1.qcow2"))
    assert answer["bytes"]["read"] == 2 * MiB  # c2: 40 MiB (carried from top) and 50
    restored_equal(str(workdir / "inc2.qcow2"), p0)

    # a snapshot again, then the chain copied to another domain: each layer's bitmaps
    v2 = {**v0, "volumeID": new_id()}
    p2 = agent.call("Volume.create", {**v2, "parentVolumeID": v0["volumeID"]})["path"]
    qemu_io(p2, "cow", f"write -P 6 {52 * MiB} {MiB}")
    moved = {**v2, "domainID": other}
    copy_done(agent, v2, moved, mode="chain")
    assert states(agent, moved) == {"c1": ("ok", True), "c2": ("ok", True)}
    assert states(agent, {**v0, "domainID": other}) == {"c1": ("ok", False),
                                                         "c2": ("ok", False)}
    moved_path = agent.call("Volume.getInfo", moved)["path"]
    qemu_io(moved_path, "cow", f"write -P 7 {54 * MiB} {MiB}")
    answer = backup(agent, moved, workdir / "inc3.qcow2", "--incremental", "c2", "--base",
                    str(workdir / "inc2.qcow2"))
    assert answer["bytes"]["read"] == 4 * MiB  # c2: 40, 50, 52 and 54 MiB
    restored_equal(str(workdir / "inc3.qcow2"), moved_path)

    # a collapse into cow carries the union when asked
    flat = {"domainID": other, "imageID": new_id(), "volumeID": new_id()}
    copy_done(agent, moved, flat, format="cow", bitmaps=True)
    assert states(agent, flat) == {"c1": ("ok", False), "c2": ("ok", False)}
    flat_path = agent.call("Volume.getInfo", flat)["path"]
    qemu_io(flat_path, "cow", f"write -P 8 {60 * MiB} {MiB}")
    answer = backup(agent, flat, workdir / "inc4.qcow2", "--incremental", "c2", "--base",
                    str(workdir / "inc3.qcow2"))
    assert answer["bytes"]["read"] == 5 * MiB
    restored_equal(str(workdir / "inc4.qcow2"), flat_path)


@pytest.mark.parametrize("who", ["client", "agent"])
@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_a_backup_cut_short_resumes_and_its_checkpoint_holds(domain_agent, workdir, who,
                                                             kind):
    """The backup command SIGKILLed, or the agent SIGKILLed under it, half-way: the same
    command again finishes it, the chain of backups restores the disk, and the checkpoint
    it started marks every write since."""
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    path = agent.call("Volume.create", {**loc, "size": SIZE, "format": "cow"})["path"]
    qemu_io(path, "cow", f"write -P 1 0 {40 * MiB}")
    full = workdir / "full.qcow2"
    args = ["--checkpoint", "c1"]
    out = full
    if kind == "incremental":
        backup(agent, loc, full, "--checkpoint", "c1")
        qemu_io(path, "cow", f"write -P 2 {8 * MiB} {40 * MiB}")
        out = workdir / "inc.qcow2"
        args = ["--incremental", "c1", "--base", str(full), "--checkpoint", "c2"]
    proc = hostagent(agent, "backup", spec(loc), str(out), *args, "--rate", "16M")
    killed_mid_way(agent, proc, str(out), who, at=12 * MiB)
    if who == "agent":
        agent.start()
    answer = backup(agent, loc, out, *args)
    assert answer["resumed"] is True
    restored_equal(str(out), path)
    checkpoint = args[args.index("--checkpoint") + 1]
    qemu_io(path, "cow", f"write -P 3 {60 * MiB} {MiB}")
    after = workdir / "after.qcow2"
    answer = backup(agent, loc, after, "--incremental", checkpoint, "--base", str(out))
    assert answer["bytes"]["read"] >= MiB  # the write since, and what the resume re-read
    restored_equal(str(after), path)
    assert qemu_nbd_under(str(workdir)) == []


def test_an_operator_lists_adds_removes_and_clears_bitmaps_at_a_shell(domain_agent):
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    path = agent.call("Volume.create", {**loc, "size": SIZE, "format": "cow"})["path"]
    code, answer, err = run(agent, "bitmap", "add", spec(loc), "c1", "--granularity", "1M")
    assert code == 0 and answer["added"] is True and answer["granularity"] == MiB, err
    run(agent, "bitmap", "add", spec(loc), "c2")
    subprocess.run(["qemu-img", "bitmap", "--remove", path, "c2"], check=True)
    code, answer, err = run(agent, "bitmap", "list", spec(loc))
    assert code == 0, err
    assert [(b["name"], b["state"], b["reason"]) for b in answer["bitmaps"]] == [
        ("c1", "ok", None), ("c2", "broken", "missing")]
    proc = subprocess.run([sys.executable, "-m", "agent", "--config", str(agent.config_path),
                           "bitmap", "list", spec(loc)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "HOSTAGENT_CLIENT_CONFIG": "/dev/null",
                                          "COLUMNS": "120"})
    assert proc.returncode == 0 and "missing" in proc.stdout and "1.0 MiB" in proc.stdout, \
        proc.stdout + proc.stderr
    code, answer, err = run(agent, "backup", spec(loc), "/dev/null/x", "--incremental", "c2",
                            "--base", path)
    assert code == 1 and "BitmapBroken" in json.dumps(answer) + err, (answer, err)
    code, answer, err = run(agent, "bitmap", "clear", spec(loc))
    assert code == 0 and answer["removed"] == ["c1", "c2"], err
    code, answer, err = run(agent, "bitmap", "remove", spec(loc), "c1")
    assert code == 1 and "NoSuchBitmap" in json.dumps(answer) + err
