"""`hostagent backup`, full and incremental, with real qemu tools and a real agent: a disk
written, a full backup with a checkpoint, more writes (data, zeros, discards), incremental
backups of only the changed extents (the bytes read counted), and the chain of backups
restored equal to the disk (`qemu-img compare`); across a snapshot, a merge and a chain
copy to another domain in between."""

from __future__ import annotations

import subprocess

import pytest

from tests.images.chains import compare, needs_qemu, qemu_io
from tests.support.storage_flow import MiB, new_id
from tests.transfers.helpers import run

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
