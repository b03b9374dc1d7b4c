"""Real processes on one metadata.db: concurrent writers take turns (BEGIN IMMEDIATE) and lose
nothing; a writer SIGKILLed after a commit keeps it, one killed inside a transaction loses it
and does not leave the database locked."""

from __future__ import annotations

import pytest
from storage_helpers import UUIDS

from agent.errors import OperationFailed
from agent.storage.metadata import DomainDB

DOM, IMG, VOL = UUIDS[:3]
SRC = {"domainID": UUIDS[10], "imageID": UUIDS[11], "volumeID": UUIDS[12]}
ROUNDS = 60

# Each round is two read-modify-write transactions on the one shared marker (take_over reads
# the generation and writes generation+1; record_error reads the list and appends) plus a
# create_volume of its own. A deferred BEGIN would fail these with SQLITE_BUSY on the lock
# upgrade; a lost update would show in the final numbers.
WRITER = r"""
import sys
import pytest

from agent.errors import OperationFailed
from agent.storage.metadata import DomainDB
root, shared, image, name, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
db = DomainDB.open(root)
print("ready", flush=True)
sys.stdin.readline()
for i, vol in enumerate(ids):
    m = db.take_over(shared, name, f"{name}-{i}")
    db.record_error(shared, m["generation"], {"by": name, "i": i})
    db.create_volume(image, vol, 4096)
print("done", flush=True)
"""


def test_two_processes_write_concurrently_and_nothing_is_lost(tmp_path, spawn):
    root = tmp_path / "dom"
    with DomainDB.format(root, DOM) as db:
        db.begin_copy(IMG, VOL, 1 << 20, SRC, "host-0", "t0")

    writers = []
    for w in range(2):
        ids = [f"{w + 1:08x}-1111-4111-8111-{i:012x}" for i in range(ROUNDS)]
        writers.append(spawn(WRITER, root, VOL, IMG, f"w{w}", *ids))
    for child in writers:
        assert child.expect() == "ready"
    for child in writers:
        child.send("go")
    for child in writers:
        assert child.expect(timeout=60) == "done"
    for child in writers:
        assert child.proc.wait(timeout=30) == 0

    with DomainDB.open(root, DOM) as db:
        marker = db.get_marker(VOL)
        assert marker["generation"] == 2 * ROUNDS
        assert db.get_volume(VOL)["generation"] == 2 * ROUNDS
        assert marker["attempts"] == 2 * ROUNDS + 1
        assert len(marker["errors"]) == 20
        assert db.volume_count() == 2 * ROUNDS + 1
        assert db.integrity_check() == "ok"


# Dies by SIGKILL through the crash seam right after the named commit.
DIE_AFTER = r"""
import os, signal, sys
from agent.storage import metadata
root, vol, label = sys.argv[1:4]
db = metadata.DomainDB.open(root)
metadata._after_write_hook = lambda seen: seen == label and os.kill(os.getpid(), signal.SIGKILL)
db.checkpoint(vol, 0, 4096)
db.take_over(vol, "host-x", "t-x")
print("survived", flush=True)
"""

# Dies by SIGKILL in the middle of a transaction, holding the database's write lock.
DIE_INSIDE = r"""
import sys
import pytest

from agent.errors import OperationFailed
from agent.storage.metadata import DomainDB
db = DomainDB.open(sys.argv[1])
db.db.conn.execute("BEGIN IMMEDIATE")
db.db.conn.execute("UPDATE copy_markers SET copied = 999, generation = 77")
print("inside", flush=True)
sys.stdin.readline()
"""


def test_sigkill_after_a_commit_keeps_it(tmp_path, spawn):
    root = tmp_path / "dom"
    with DomainDB.format(root, DOM) as db:
        db.begin_copy(IMG, VOL, 1 << 20, SRC, "host-0", "t0")
    child = spawn(DIE_AFTER, root, VOL, "commit:take_over")
    assert child.proc.wait(timeout=30) == -9
    with DomainDB.open(root) as db:
        marker = db.get_marker(VOL)
        assert (marker["copied"], marker["generation"], marker["task_id"]) == (4096, 1, "t-x")
        assert db.integrity_check() == "ok"


def test_sigkill_inside_a_transaction_loses_it_and_frees_the_lock(tmp_path, spawn):
    root = tmp_path / "dom"
    with DomainDB.format(root, DOM) as db:
        db.begin_copy(IMG, VOL, 1 << 20, SRC, "host-0", "t0")
    child = spawn(DIE_INSIDE, root)
    assert child.expect() == "inside"
    with DomainDB.open(root) as db:
        db.db.conn.execute("PRAGMA busy_timeout = 100")
        with pytest.raises(OperationFailed, match="locked"):
            db.checkpoint(VOL, 0, 1)  # the live child holds the write lock
        child.proc.kill()
        assert child.proc.wait(timeout=30) == -9
        # Its locks died with it: the next writer goes ahead and sees none of its changes.
        assert db.checkpoint(VOL, 0, 2048) is True
        marker = db.get_marker(VOL)
        assert (marker["copied"], marker["generation"]) == (2048, 0)
        assert db.integrity_check() == "ok"
