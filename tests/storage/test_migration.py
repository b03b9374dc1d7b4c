"""A domain formatted by an earlier version (schema 1) is brought to this one when opened:
every volume gets a creation token, every marker a failure count of 0 and, at its next
take-over, the identity of its source. Nothing else changes."""

import sqlite3
import uuid

import pytest

from agent.errors import CopyConflict, DomainUnusable
from agent.storage.markers import source_identity
from agent.storage.metadata import DomainDB
from agent.storage.schema import DOMAIN_VERSION

V1 = [
    "CREATE TABLE domain (id TEXT PRIMARY KEY, version INTEGER, created REAL)",
    """CREATE TABLE volumes (
        volume_id TEXT PRIMARY KEY, image_id TEXT NOT NULL, size INTEGER NOT NULL,
        legality TEXT NOT NULL CHECK (legality IN ('LEGAL', 'ILLEGAL')),
        generation INTEGER NOT NULL, checksum TEXT, created REAL, updated REAL)""",
    """CREATE TABLE copy_markers (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, src_domain TEXT, src_image TEXT, src_volume TEXT,
        size INTEGER, copied INTEGER NOT NULL, generation INTEGER NOT NULL,
        host_id TEXT, task_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('copying', 'abandoned')),
        attempts INTEGER NOT NULL DEFAULT 1, errors TEXT NOT NULL DEFAULT '[]',
        started REAL, updated REAL)""",
]


def ids():
    return str(uuid.uuid4())


@pytest.fixture
def v1_domain(tmp_path):
    dom, img, src, dst = ids(), ids(), ids(), ids()
    (tmp_path / "images").mkdir()
    (tmp_path / "leases").mkdir()
    db = sqlite3.connect(tmp_path / "metadata.db")
    for sql in V1:
        db.execute(sql)
    db.execute("INSERT INTO domain VALUES (?, 1, 0)", [dom])
    db.execute("INSERT INTO volumes VALUES (?, ?, 4096, 'LEGAL', 0, NULL, 1, 1)", [src, img])
    db.execute("INSERT INTO volumes VALUES (?, ?, 4096, 'ILLEGAL', 3, NULL, 1, 1)", [dst, img])
    db.execute("INSERT INTO copy_markers VALUES (?, ?, ?, ?, ?, 4096, 1024, 3, 'h', 't',"
               " 'copying', 2, '[]', 1, 1)", [dst, img, dom, img, src])
    db.commit()
    db.close()
    return tmp_path, dom, img, src, dst


def test_a_schema_1_domain_is_migrated_when_opened(v1_domain):
    root, dom, img, src, dst = v1_domain
    with DomainDB.open(root, dom) as db:
        assert db.db.execute("PRAGMA user_version").fetchone()[0] == DOMAIN_VERSION
        source = db.get_volume(src)
        assert source["token"] and db.get_volume(dst)["token"] != source["token"]
        # Version 3: volumes made before formats existed are raw and have no parent; copies
        # in progress are collapse copies.
        assert (source["format"], source["parent_id"]) == ("raw", None)
        assert db.chain(src) == [source] and db.children(src) == []
        # Version 5: no merges yet, and how a volume was made is not known.
        assert db.list_merges() == [] and db.get_merged(src) is None
        assert source["preallocation"] is None
        marker = db.get_marker(dst)
        assert marker["kind"] == "collapse"
        # Version 6: no dirty bitmaps, and a copy in progress carries none.
        assert db.bitmaps_of(src) == [] and marker["bitmaps"] == 0
        db.record_bitmap(src, "b1", 65536)
        assert [b["name"] for b in db.bitmaps_of(src)] == ["b1"]
        assert (marker["copied"], marker["generation"], marker["attempts"], marker["failures"],
                marker["src_token"]) == (1024, 3, 2, 0, None)
        # Its next take-over binds it to the source as it is then; a continue from another
        # source is refused from there on.
        taken = db.take_over(dst, "h", "t2", expect_generation=3,
                             src_identity=source_identity(source))
        assert taken["src_token"] == source["token"] and taken["copied"] == 1024
        other = {**source_identity(source), "token": "another"}
        with pytest.raises(CopyConflict):
            db.take_over(dst, "h", "t3", src_identity=other)
    with DomainDB.open(root, dom) as db:  # a second open finds it done
        assert db.get_volume(src)["token"] == source["token"]


def test_a_domain_of_a_newer_version_is_refused_untouched(v1_domain):
    root, dom, *_ = v1_domain
    db = sqlite3.connect(root / "metadata.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    before = (root / "metadata.db").read_bytes()
    with pytest.raises(DomainUnusable) as exc:
        DomainDB.open(root, dom)
    assert exc.value.data["reason"] == "newer-version"
    assert (root / "metadata.db").read_bytes() == before
