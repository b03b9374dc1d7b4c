"""DomainDB on real SQLite files: format/open, volumes, and generation-fenced copy markers."""

from __future__ import annotations

import os
import sqlite3

import pytest
from storage_helpers import UUIDS

from agent.errors import (
    DomainExists,
    GenerationMismatch,
    InvalidParams,
    NoSuchDomain,
    NoSuchVolume,
    OperationFailed,
    VolumeExists,
)
from agent.storage import metadata
from agent.storage.metadata import DomainDB

DOM, OTHER_DOM, IMG, VOL, VOL2 = UUIDS[:5]
SRC = {"domainID": UUIDS[10], "imageID": UUIDS[11], "volumeID": UUIDS[12]}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "dom"


@pytest.fixture
def db(root):
    d = DomainDB.format(root, DOM)
    yield d
    d.close()


def test_format_creates_layout_and_open_finds_it(root):
    DomainDB.format(root, DOM.upper()).close()
    assert sorted(os.listdir(root)) == [".format.lock", "dom_md", "images", "leases",
                                        "metadata.db", "metadata.reserve"]
    with DomainDB.open(root) as d:
        assert d.domain_id == DOM
        assert d.integrity_check() == "ok"
        assert d.volume_count() == 0
    with DomainDB.open(root, expect_domain_id=DOM) as d:
        assert d.domain_id == DOM


def test_open_refuses_missing_foreign_or_mismatched_domain(tmp_path, root):
    with pytest.raises(NoSuchDomain):
        DomainDB.open(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # opening never creates anything
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(NoSuchDomain):
        DomainDB.open(tmp_path / "junk")
    DomainDB.format(root, DOM).close()
    with pytest.raises(NoSuchDomain) as e:
        DomainDB.open(root, expect_domain_id=OTHER_DOM)
    assert e.value.data["found"] == DOM and e.value.data["expected"] == OTHER_DOM


def test_format_refuses_existing_domain_and_non_empty_root(tmp_path, root):
    DomainDB.format(root, DOM).close()
    with pytest.raises(DomainExists):
        DomainDB.format(root, OTHER_DOM)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "somebody-elses-file").write_text("x")
    with pytest.raises(InvalidParams):
        DomainDB.format(busy, DOM)
    with pytest.raises(InvalidParams):
        DomainDB.format(busy / "somebody-elses-file", DOM)
    with pytest.raises(InvalidParams):
        DomainDB.format(tmp_path / "new", "../etc")
    assert not (tmp_path / "new").exists()


def test_format_interrupted_before_the_rename_can_be_rerun(root):
    (root / "images").mkdir(parents=True)
    (root / "leases").mkdir()
    (root / "metadata.db.tmp").write_bytes(b"half a database")
    (root / "metadata.db.tmp-journal").write_bytes(b"hot journal")
    with DomainDB.format(root, DOM) as d:
        assert d.integrity_check() == "ok"
    assert sorted(os.listdir(root)) == [".format.lock", "dom_md", "images", "leases",
                                        "metadata.db", "metadata.reserve"]


def test_connection_settings(db):
    q = lambda sql: db.db.execute(sql).fetchone()[0]  # noqa: E731
    assert q("PRAGMA journal_mode") == "delete"
    assert q("PRAGMA synchronous") == 2  # FULL
    assert q("PRAGMA foreign_keys") == 1
    assert q("PRAGMA busy_timeout") == 30000


def test_create_get_delete(db):
    assert db.get_volume(VOL) is None
    v = db.create_volume(IMG, VOL.upper(), 1 << 30)
    assert (v["volume_id"], v["image_id"], v["size"], v["legality"], v["generation"]) == \
        (VOL, IMG, 1 << 30, "LEGAL", 0)
    assert db.get_volume(VOL) == v and db.volume_count() == 1
    with pytest.raises(VolumeExists):
        db.create_volume(IMG, VOL, 1)
    for bad in (-1, "10", True, 1.5):
        with pytest.raises(InvalidParams):
            db.create_volume(IMG, VOL2, bad)
    db.delete_volume(VOL)
    assert db.get_volume(VOL) is None and db.volume_count() == 0
    with pytest.raises(NoSuchVolume):
        db.delete_volume(VOL)
    with pytest.raises(InvalidParams):
        db.get_volume("../metadata.db")


def test_schema_refuses_bad_legality_and_orphan_markers(db):
    with pytest.raises(sqlite3.IntegrityError):
        db.db.execute("INSERT INTO volumes (volume_id, image_id, size, legality, generation)"
                      " VALUES ('x', 'y', 1, 'MAYBE', 0)")
    with pytest.raises(sqlite3.IntegrityError):
        db.db.execute("INSERT INTO copy_markers (volume_id, image_id, copied, generation, state)"
                      " VALUES ('nope', 'y', 0, 0, 'copying')")


def test_copy_lifecycle_with_generation_fencing(db):
    m = db.begin_copy(IMG, VOL, 100, SRC, "host-a", "task-1")
    assert (m["copied"], m["generation"], m["state"], m["attempts"], m["errors"]) == \
        (0, 0, "copying", 1, [])
    assert (m["src_domain"], m["src_image"], m["src_volume"]) == \
        (SRC["domainID"], SRC["imageID"], SRC["volumeID"])
    assert db.get_volume(VOL)["legality"] == "ILLEGAL"
    with pytest.raises(VolumeExists):
        db.begin_copy(IMG, VOL, 100, SRC, "host-b", "task-2")

    assert db.checkpoint(VOL, 0, 10) is True
    m1 = db.take_over(VOL, "host-b", "task-2", expect_generation=0)
    assert (m1["generation"], m1["host_id"], m1["task_id"], m1["attempts"], m1["copied"]) == \
        (1, "host-b", "task-2", 2, 10)
    assert db.get_volume(VOL)["generation"] == 1

    # The old copier (generation 0) is fenced off: nothing it does is written.
    assert db.checkpoint(VOL, 0, 99) is False
    assert db.record_error(VOL, 0, {"message": "stale"}) is False
    assert db.abandon(VOL, 0) is False
    assert db.complete_copy(VOL, 0, "stale-sum") is False
    assert db.get_marker(VOL) == m1
    assert db.get_volume(VOL)["legality"] == "ILLEGAL"
    with pytest.raises(GenerationMismatch) as e:
        db.take_over(VOL, "host-a", "task-3", expect_generation=0)
    assert e.value.data["generation"] == 1
    assert db.get_marker(VOL) == m1

    assert db.checkpoint(VOL, 1, 60) is True
    assert db.get_marker(VOL)["copied"] == 60
    assert db.complete_copy(VOL, 1, "sha256:abc") is True
    v = db.get_volume(VOL)
    assert (v["legality"], v["generation"], v["checksum"]) == ("LEGAL", 2, "sha256:abc")
    assert db.get_marker(VOL) is None and db.list_markers() == []
    assert db.complete_copy(VOL, 1) is False  # done once only

    with pytest.raises(GenerationMismatch):
        db.take_over(VOL, "host-a", "task-4")  # finished: no copy to take over
    with pytest.raises(NoSuchVolume):
        db.take_over(VOL2, "host-a", "task-4")


def test_take_over_restart_resets_progress(db):
    db.begin_copy(IMG, VOL, 100, SRC, "host-a", "t1")
    db.checkpoint(VOL, 0, 50)
    assert db.take_over(VOL, "host-a", "t2")["copied"] == 50
    m = db.take_over(VOL, "host-a", "t3", restart=True)
    assert (m["copied"], m["generation"], m["attempts"]) == (0, 2, 3)


def test_errors_abandon_and_marker_listing(db):
    db.begin_copy(IMG, VOL, 100, SRC, "host-a", "t1")
    db.begin_copy(IMG, VOL2, 100, SRC, "host-a", "t2")
    for i in range(25):
        assert db.record_error(VOL, 0, {"n": i}) is True
    assert db.get_marker(VOL)["errors"] == [{"n": i} for i in range(5, 25)]
    assert db.abandon(VOL, 0) is True
    assert db.get_marker(VOL)["state"] == "abandoned"
    assert db.take_over(VOL, "host-b", "t3")["state"] == "copying"
    assert sorted(m["volume_id"] for m in db.list_markers()) == [VOL, VOL2]
    db.delete_volume(VOL2)
    assert [m["volume_id"] for m in db.list_markers()] == [VOL]
    assert db.get_marker(VOL2) is None


def test_failed_call_changes_nothing_and_hook_sees_only_commits(db, monkeypatch):
    seen = []
    monkeypatch.setattr(metadata, "_after_write_hook", seen.append)
    db.create_volume(IMG, VOL, 1)
    with pytest.raises(VolumeExists):
        db.begin_copy(IMG, VOL, 1, SRC, "h", "t")
    db.begin_copy(IMG, VOL2, 1, SRC, "h", "t")
    db.checkpoint(VOL2, 0, 1)
    db.complete_copy(VOL2, 0)
    db.delete_volume(VOL)
    assert seen == ["commit:create_volume", "commit:begin_copy", "commit:checkpoint",
                    "commit:complete_copy", "commit:delete_volume"]
    assert db.volume_count() == 1 and db.list_markers() == []
    assert not db.db.conn.in_transaction


def test_lock_held_past_the_busy_timeout_is_a_typed_error_and_changes_nothing(root, db):
    other = sqlite3.connect(root / "metadata.db", isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")
    db.db.conn.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(OperationFailed, match="locked"):
        db.create_volume(IMG, VOL, 1)
    assert not db.db.conn.in_transaction
    other.execute("COMMIT")
    other.close()
    db.create_volume(IMG, VOL, 1)
    assert db.volume_count() == 1


def dead_take_over(db, task: str, expect: int, failed: list, errors: list) -> dict:
    """A retry's take-over on host-a, told the generation last heard of and the tasks (and
    the errors) of the workers that died since."""
    return db.take_over(VOL, "host-a", task, expect_generation=expect, failed_tasks=failed,
                        previous_errors=errors)


def test_a_retry_takes_over_what_its_dead_predecessors_took_and_nothing_else(db):
    """A worker commits its take-over before it can say so: the retry after it is told the
    generation last heard of (0) and the tasks that died since. It takes the marker at the
    generation they raised, each at most once, and at no other: not after a fence, not
    after another host's or task's take-over."""
    db.begin_copy(IMG, VOL, 100, SRC, "host-a", "t0")
    e0 = {"message": "t0 died", "task_id": "t0", "time": 1.0}
    m = dead_take_over(db, "r1", 0, [], [e0])  # r1 takes it over, then dies unheard
    assert (m["generation"], m["failures"], m["errors"]) == (1, 1, [e0])
    e1 = {"message": "r1 died", "task_id": "r1", "time": 2.0}
    # r2 is told generation 0 and [r1]: r1 raised it to 1, so r2 takes it at 1.
    m = dead_take_over(db, "r2", 0, ["r1"], [e0, e1])
    assert (m["generation"], m["task_id"], m["failures"]) == (2, "r2", 2)
    assert m["errors"] == [e0, e1]  # e0 was recorded by r1: counted once
    # r3, told [r1, r2]: the second of them may have raised it by two.
    assert dead_take_over(db, "r3", 0, ["r1", "r2"], [])["generation"] == 3
    with pytest.raises(GenerationMismatch):  # r3, first of two, raised 1 by one at most
        dead_take_over(db, "r4", 1, ["r3", "r9"], [])
    for who, failed in (("host-b", ["r3"]),  # another host's task of that name
                        ("host-a", ["r9"])):  # a task not among the failed
        expect = db.get_marker(VOL)["generation"]
        db.take_over(VOL, who, "r3", expect_generation=expect)
        with pytest.raises(GenerationMismatch):
            dead_take_over(db, "r5", expect, failed, [])
    # A fence after the dead task's take-over fences the retry off too.
    taken = dead_take_over(db, "r6", 5, [], [])
    assert taken["generation"] == 6
    db.fence(VOL, 6)
    with pytest.raises(GenerationMismatch):
        dead_take_over(db, "r7", 5, ["r6"], [])
    assert db.get_marker(VOL)["failures"] == 2  # nothing refused was counted


def test_errors_no_worker_recorded_are_counted_once(db):
    db.begin_copy(IMG, VOL, 100, SRC, "host-a", "t0")
    e0 = {"message": "gone", "task_id": "t0", "time": 1.0}
    assert db.record_errors(VOL, 0, [e0]) is True
    assert db.record_errors(VOL, 0, [e0, {**e0, "time": 2.0}]) is True
    assert db.record_error(VOL, 0, {"message": "says no time"}) is True
    assert db.record_error(VOL, 0, {"message": "says no time"}) is True
    m = db.get_marker(VOL)
    assert m["failures"] == 4 and [e.get("time") for e in m["errors"]] == [1.0, 2.0, None, None]
    # A client's continue starts a new count of failures: what it carries is not counted.
    assert db.take_over(VOL, "h", "c", previous_errors=[{**e0, "time": 3.0}])["failures"] == 0
