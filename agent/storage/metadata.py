"""Volume metadata of one storage domain, in SQLite via sqlite-utils.

Settings chosen for crash safety on a possibly shared (network) file system: journal_mode=DELETE
(WAL needs a shared-memory index that network file systems cannot share between hosts);
synchronous=FULL (a commit is on disk when COMMIT returns, so a reported checkpoint survives a
power cut); a 30 s busy timeout (processes and hosts share the file, a writer waits its turn);
foreign_keys=ON (a copy marker cannot outlive its volume).

Every change is ONE transaction opened with BEGIN IMMEDIATE: the write lock is taken before
anything is read, so a read-modify-write never has to upgrade a read lock, which SQLite answers
with an immediate SQLITE_BUSY whatever the busy timeout; a concurrent writer just waits.

Generations are the fencing token. A copy marker and its volume carry the same generation;
take_over() bumps both, and every later write by a copier names the generation it was given,
so a superseded copier (a stale task, a host that lost its lease) writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse

import sqlite_utils

from agent.errors import (DomainExists, GenerationMismatch, InvalidParams, NoSuchDomain,
                          NoSuchVolume, OperationFailed, VolumeExists)
from agent.storage.ids import check_uuid
from agent.storage.layout import DB_NAME, IMAGES, LEASES, Layout, fsync_dir

DOMAIN_VERSION = 1
BUSY_TIMEOUT = 30.0
MAX_ERRORS = 20

# Crash-point test seam. When a test sets this to a callable it is called with "commit:<op>"
# right after every COMMIT, including those of a superseded call that changed nothing (op is
# the method name: format, create_volume, begin_copy, take_over, checkpoint, ...), so a crash
# test can SIGKILL the process at the N-th write and check what start-up recovers from that
# exact state. Never set outside tests.
_after_write_hook = None

# copy_markers is its own table so the boot scan for unfinished copies is one cheap query,
# however many volumes the domain holds.
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS domain (id TEXT PRIMARY KEY, version INTEGER, created REAL)",
    """CREATE TABLE IF NOT EXISTS volumes (
        volume_id TEXT PRIMARY KEY, image_id TEXT NOT NULL, size INTEGER NOT NULL,
        legality TEXT NOT NULL CHECK (legality IN ('LEGAL', 'ILLEGAL')),
        generation INTEGER NOT NULL, checksum TEXT, created REAL, updated REAL)""",
    "CREATE INDEX IF NOT EXISTS volumes_image_id ON volumes (image_id)",
    """CREATE TABLE IF NOT EXISTS copy_markers (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, src_domain TEXT, src_image TEXT, src_volume TEXT,
        size INTEGER, copied INTEGER NOT NULL, generation INTEGER NOT NULL,
        host_id TEXT, task_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('copying', 'abandoned')),
        attempts INTEGER NOT NULL DEFAULT 1, errors TEXT NOT NULL DEFAULT '[]',
        started REAL, updated REAL)""",
]

# Operations that outlive tasks (a scrub): one row each, written by the process that runs it
# (agent/storage/operations.py). UNKNOWN is never stored: it is what a NOT_STARTED or STARTED
# row reads as when its operation lease is free. Domains formatted before this table existed
# get it on their first operation (operations.ensure_schema).
OPERATIONS_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS operations (
        operation_id TEXT PRIMARY KEY, type TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('NOT_STARTED', 'STARTED', 'COMPLETED', 'FAILED', 'STOPPED')),
        progress REAL NOT NULL DEFAULT 0, host_id TEXT, task_id TEXT, pid INTEGER,
        started REAL, updated REAL, ended REAL, stop_requested REAL,
        result TEXT, error TEXT)""",
    "CREATE INDEX IF NOT EXISTS operations_started ON operations (started)",
]
_SCHEMA += OPERATIONS_SCHEMA


def _connect(path: str) -> sqlite_utils.Database:
    # mode=rw: opening must never create an empty database where a domain was expected.
    uri = "file:" + urllib.parse.quote(path) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return sqlite_utils.Database(conn)
    except BaseException:
        conn.close()
        raise


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidParams("size must be a non-negative integer", field="size")
    return size


def _marker(row: dict | None) -> dict | None:
    if row is not None:
        row = dict(row)
        row["errors"] = json.loads(row["errors"])
    return row


class DomainDB:
    def __init__(self, root: str, db: sqlite_utils.Database, domain_id: str):
        self.layout = Layout(root)
        self.db = db
        self.domain_id = domain_id

    @classmethod
    def format(cls, root: str | os.PathLike, domain_id: str) -> "DomainDB":
        """Create a domain at ``root`` (absent or empty) and return it open.

        The database is built as metadata.db.tmp and renamed into place, so metadata.db either
        does not exist or is complete; a format that crashed half-way may simply be re-run.
        """
        domain_id = check_uuid(domain_id, "domainID")
        layout = Layout(root)
        if os.path.lexists(layout.db_path):
            raise DomainExists("a domain already exists here", root=layout.root)
        tmp = layout.db_path + ".tmp"
        leftovers = {IMAGES, LEASES, DB_NAME + ".tmp", DB_NAME + ".tmp-journal"}
        try:
            names = set(os.listdir(layout.root))
        except FileNotFoundError:
            names = set()
        except NotADirectoryError:
            raise InvalidParams("root is not a directory", field="root") from None
        # Only the debris of an earlier, interrupted format may be here.
        if not names <= leftovers or any(
                os.listdir(os.path.join(layout.root, d)) for d in (IMAGES, LEASES) if d in names):
            raise InvalidParams("root must be empty or absent", field="root")
        for name in (tmp, tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        os.makedirs(layout.images_dir, 0o755, exist_ok=True)
        os.makedirs(layout.leases_dir, 0o755, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        self = cls(layout.root, _connect(tmp), domain_id)
        try:
            with self.tx("format"):
                for sql in _SCHEMA:
                    self.db.execute(sql)
                self.db.execute("INSERT INTO domain (id, version, created) VALUES (?, ?, ?)",
                                [domain_id, DOMAIN_VERSION, time.time()])
        finally:
            self.db.close()
        os.rename(tmp, layout.db_path)
        fsync_dir(layout.root)
        return cls.open(layout.root, domain_id)

    @classmethod
    def open(cls, root: str | os.PathLike, expect_domain_id: str | None = None) -> "DomainDB":
        """Open the domain at ``root``; NoSuchDomain if there is none or it has another id."""
        layout = Layout(root)
        if expect_domain_id is not None:
            expect_domain_id = check_uuid(expect_domain_id, "domainID")
        try:
            db = _connect(layout.db_path)
        except sqlite3.DatabaseError:
            raise NoSuchDomain("no storage domain here", root=layout.root) from None
        try:
            row = db.execute("SELECT id FROM domain").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None or (expect_domain_id is not None and row[0] != expect_domain_id):
            db.close()
            raise NoSuchDomain("no such storage domain here", root=layout.root,
                               expected=expect_domain_id, found=row and row[0])
        return cls(layout.root, db, row[0])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "DomainDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self, op: str):
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            # Locked beyond the busy timeout, disk I/O error, a full disk: say so as an
            # agent error rather than leak a driver exception through the RPC layer.
            raise OperationFailed(f"metadata {op} failed: {e}", sqlite=type(e).__name__) from e
        if _after_write_hook is not None:
            _after_write_hook(f"commit:{op}")

    def integrity_check(self) -> str:
        return "\n".join(r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall())

    def volume_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM volumes").fetchone()[0]

    # Inside a tx the write lock is held, so what these read stays true until COMMIT.
    def get_volume(self, volume_id: str) -> dict | None:
        volume_id = check_uuid(volume_id, "volumeID")
        rows = list(self.db.query("SELECT * FROM volumes WHERE volume_id = ?", [volume_id]))
        return rows[0] if rows else None

    def get_marker(self, volume_id: str, generation: int | None = None) -> dict | None:
        """The copy marker of ``volume_id`` (of that ``generation``, if given), or None."""
        sql = "SELECT * FROM copy_markers WHERE volume_id = ?"
        args = [check_uuid(volume_id, "volumeID")]
        if generation is not None:
            sql, args = sql + " AND generation = ?", args + [generation]
        rows = list(self.db.query(sql, args))
        return _marker(rows[0]) if rows else None

    def list_markers(self) -> list[dict]:
        return [_marker(r) for r in self.db.query("SELECT * FROM copy_markers ORDER BY started")]

    def create_volume(self, image_id: str, volume_id: str, size: int) -> dict:
        """Record a new LEGAL volume of generation 0. VolumeExists if the id is taken."""
        image_id = check_uuid(image_id, "imageID")
        volume_id = check_uuid(volume_id, "volumeID")
        size = _check_size(size)
        now = time.time()
        with self.tx("create_volume") as db:
            if self.get_volume(volume_id) is not None:
                raise VolumeExists("volume exists", volume_id=volume_id)
            db["volumes"].insert({"volume_id": volume_id, "image_id": image_id, "size": size,
                                  "legality": "LEGAL", "generation": 0, "checksum": None,
                                  "created": now, "updated": now})
        return self.get_volume(volume_id)

    def delete_volume(self, volume_id: str) -> None:
        """Forget a volume and its copy marker (the data file is the caller's to remove)."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("delete_volume") as db:
            if self.get_volume(volume_id) is None:
                raise NoSuchVolume("no such volume", volume_id=volume_id)
            db.execute("DELETE FROM copy_markers WHERE volume_id = ?", [volume_id])
            db.execute("DELETE FROM volumes WHERE volume_id = ?", [volume_id])

    def begin_copy(self, dst_image: str, dst_volume: str, size: int, src: dict,
                   host_id: str | None, task_id: str | None) -> dict:
        """Create the destination ILLEGAL (generation 0) with its copy marker, in one tx.

        VolumeExists if the destination exists: the caller decides continue-vs-conflict by
        looking at get_marker() first.
        """
        dst_image = check_uuid(dst_image, "imageID")
        dst_volume = check_uuid(dst_volume, "volumeID")
        size = _check_size(size)
        if not isinstance(src, dict):
            raise InvalidParams("src must be an object", field="src")
        src_ids = [check_uuid(src.get(k), f"src.{k}") for k in ("domainID", "imageID", "volumeID")]
        now = time.time()
        with self.tx("begin_copy") as db:
            if self.get_volume(dst_volume) is not None:
                raise VolumeExists("volume exists", volume_id=dst_volume)
            db["volumes"].insert({"volume_id": dst_volume, "image_id": dst_image, "size": size,
                                  "legality": "ILLEGAL", "generation": 0, "checksum": None,
                                  "created": now, "updated": now})
            db["copy_markers"].insert({
                "volume_id": dst_volume, "image_id": dst_image, "src_domain": src_ids[0],
                "src_image": src_ids[1], "src_volume": src_ids[2], "size": size, "copied": 0,
                "generation": 0, "host_id": host_id, "task_id": task_id, "state": "copying",
                "attempts": 1, "errors": "[]", "started": now, "updated": now})
            return self.get_marker(dst_volume)

    def take_over(self, volume_id: str, host_id: str | None, task_id: str | None,
                  expect_generation: int | None = None, restart: bool = False) -> dict:
        """Make the caller the copier of ``volume_id``; returns the marker with its new generation.

        Bumps the generation of volume and marker (fencing off every earlier copier), records
        host and task, counts the attempt; ``restart`` also resets ``copied`` to 0.
        NoSuchVolume if the volume does not exist; GenerationMismatch if it has no marker (the
        copy is finished) or its generation is not ``expect_generation``.
        """
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("take_over") as db:
            marker = self.get_marker(volume_id)
            if marker is None:
                volume = self.get_volume(volume_id)
                if volume is None:
                    raise NoSuchVolume("no such volume", volume_id=volume_id)
                raise GenerationMismatch("volume has no copy in progress", volume_id=volume_id,
                                         expected=expect_generation,
                                         generation=volume["generation"],
                                         legality=volume["legality"])
            if expect_generation is not None and marker["generation"] != expect_generation:
                raise GenerationMismatch("copy generation changed", volume_id=volume_id,
                                         expected=expect_generation,
                                         generation=marker["generation"])
            gen, now = marker["generation"] + 1, time.time()
            db.execute("UPDATE volumes SET generation = ?, updated = ? WHERE volume_id = ?",
                       [gen, now, volume_id])
            db.execute(
                "UPDATE copy_markers SET generation = ?, host_id = ?, task_id = ?,"
                " state = 'copying', attempts = attempts + 1, updated = ?,"
                " copied = CASE WHEN ? THEN 0 ELSE copied END WHERE volume_id = ?",
                [gen, host_id, task_id, now, bool(restart), volume_id])
            return self.get_marker(volume_id)

    def checkpoint(self, volume_id: str, generation: int, copied: int) -> bool:
        """Record that ``copied`` bytes are durable; False (nothing written) if superseded."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("checkpoint") as db:
            cur = db.execute("UPDATE copy_markers SET copied = ?, updated = ?"
                             " WHERE volume_id = ? AND generation = ?",
                             [copied, time.time(), volume_id, generation])
            return cur.rowcount == 1

    def complete_copy(self, volume_id: str, generation: int, checksum: str | None = None) -> bool:
        """Volume LEGAL with generation+1 and marker gone, in one tx; False if superseded."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("complete_copy") as db:
            if self.get_marker(volume_id, generation) is None:
                return False
            db.execute("UPDATE volumes SET legality = 'LEGAL', generation = ?, checksum = ?,"
                       " updated = ? WHERE volume_id = ?",
                       [generation + 1, checksum, time.time(), volume_id])
            db.execute("DELETE FROM copy_markers WHERE volume_id = ?", [volume_id])
            return True

    def record_error(self, volume_id: str, generation: int, error: dict) -> bool:
        """Append ``error`` to the marker's error list (the last MAX_ERRORS are kept)."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("record_error") as db:
            marker = self.get_marker(volume_id, generation)
            if marker is None:
                return False
            errors = (marker["errors"] + [error])[-MAX_ERRORS:]
            db.execute("UPDATE copy_markers SET errors = ?, updated = ?"
                       " WHERE volume_id = ? AND generation = ?",
                       [json.dumps(errors), time.time(), volume_id, generation])
            return True

    def abandon(self, volume_id: str, generation: int) -> bool:
        """Mark the copy abandoned (kept for a later take_over); False if superseded."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("abandon") as db:
            cur = db.execute("UPDATE copy_markers SET state = 'abandoned', updated = ?"
                             " WHERE volume_id = ? AND generation = ?",
                             [time.time(), volume_id, generation])
            return cur.rowcount == 1
