"""Volume metadata of one storage domain, in SQLite via sqlite-utils.

Settings chosen for crash safety on a possibly shared (network) file system: journal_mode=DELETE
(WAL needs a shared-memory index that network file systems cannot share between hosts);
synchronous=FULL (a commit is on disk when COMMIT returns, so a reported checkpoint survives a
power cut); a 30 s busy timeout (processes and hosts share the file, a writer waits its turn);
foreign_keys=ON (a copy marker cannot outlive its volume).

Every change is ONE transaction opened with BEGIN IMMEDIATE: the write lock is taken before
anything is read, so a read-modify-write never has to upgrade a read lock, which SQLite answers
with an immediate SQLITE_BUSY whatever the busy timeout; a concurrent writer just waits.

Every volume has a creation token (random, new at every create), so a volume deleted and
re-created with the same IDs is a different volume; a copy marker records its source's
token, generation and size, and a copy checks them at every continue and before it commits.

A full disk. A write that finds no room is NoSpace (204), never a driver error. So that a
full domain always has a way out, format leaves a reserve file (RESERVE_BYTES) beside the
database: deleting a volume that finds no room for its journal gives the reserve back, deletes,
and the reserve is made again once the volume's data is gone (agent/storage/volumes.py).

Generations are the fencing token. A copy marker and its volume carry the same generation;
take_over() bumps both, and every later write by a copier names the generation it was given,
so a superseded copier (a stale task, a host that lost its lease) writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import errno
import fcntl
import sqlite3
import time
import urllib.parse
import uuid

import sqlite_utils

from agent.errors import (AgentError, CopyConflict, DomainExists, GenerationMismatch,
                          InvalidParams, NoSpace, NoSuchDomain, NoSuchVolume, OperationFailed,
                          VolumeExists)
from agent.storage.ids import check_uuid
from agent.storage.layout import DB_NAME, IMAGES, LEASES, Layout, fsync_dir

DOMAIN_VERSION = 2  # PRAGMA user_version; older domains are migrated when opened
BUSY_TIMEOUT = 30.0
MAX_ERRORS = 20
RESERVE_NAME = "metadata.reserve"
RESERVE_BYTES = 2 << 20  # room for a delete's journal on a full file system
FORMAT_LOCK = ".format.lock"  # held while a domain is formatted (never deleted)

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
        generation INTEGER NOT NULL, checksum TEXT, created REAL, updated REAL, token TEXT)""",
    "CREATE INDEX IF NOT EXISTS volumes_image_id ON volumes (image_id)",
    """CREATE TABLE IF NOT EXISTS copy_markers (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, src_domain TEXT, src_image TEXT, src_volume TEXT,
        size INTEGER, copied INTEGER NOT NULL, generation INTEGER NOT NULL,
        host_id TEXT, task_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('copying', 'abandoned')),
        attempts INTEGER NOT NULL DEFAULT 1, errors TEXT NOT NULL DEFAULT '[]',
        started REAL, updated REAL, failures INTEGER NOT NULL DEFAULT 0,
        src_generation INTEGER, src_token TEXT)""",
]

# Version 1 -> 2: what version 2 added to a table, for domains formatted before it.
_MIGRATIONS = {
    "volumes": [("token", "TEXT")],
    "copy_markers": [("failures", "INTEGER NOT NULL DEFAULT 0"), ("src_generation", "INTEGER"),
                     ("src_token", "TEXT")],
}

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


def _sqlite_error(op: str, e: sqlite3.Error) -> AgentError:
    """What a driver error means to a client: a full disk is NoSpace, the rest OperationFailed
    (locked beyond the busy timeout, an I/O error), never a driver exception."""
    code = getattr(e, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(e):
        return NoSpace(f"metadata {op}: no space left on the domain's file system",
                       sqlite=type(e).__name__)
    return OperationFailed(f"metadata {op} failed: {e}", sqlite=type(e).__name__)


def new_token() -> str:
    return uuid.uuid4().hex


def source_identity(row: dict) -> dict:
    """What binds a copy to the source it started from: IDs alone survive a re-creation."""
    return {"generation": row["generation"], "token": row["token"], "size": row["size"]}


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
        Formatters take turns (a lock file in root, held while formatting): of two formats of
        one directory, the second finds the first's domain (DomainExists).
        """
        domain_id = check_uuid(domain_id, "domainID")
        layout = Layout(root)
        try:
            os.makedirs(layout.root, 0o755, exist_ok=True)
        except FileExistsError:
            raise InvalidParams("root is not a directory", field="root") from None
        lock = os.open(os.path.join(layout.root, FORMAT_LOCK),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX)  # a format takes milliseconds: wait our turn
            cls._format_locked(layout, domain_id)
        except sqlite3.Error as e:
            raise _sqlite_error("format", e) from e
        finally:
            os.close(lock)
        return cls.open(layout.root, domain_id)

    @classmethod
    def _format_locked(cls, layout: Layout, domain_id: str) -> None:
        if os.path.lexists(layout.db_path):
            if os.path.isfile(layout.db_path) and not os.path.islink(layout.db_path) \
                    and os.path.getsize(layout.db_path) == 0:
                # Debris of a format that raced another before formats took a lock: an empty
                # file is no domain, so it must not block this one.
                os.unlink(layout.db_path)
            else:
                raise DomainExists("a domain already exists here", root=layout.root)
        tmp = layout.db_path + ".tmp"
        leftovers = {IMAGES, LEASES, DB_NAME + ".tmp", DB_NAME + ".tmp-journal", FORMAT_LOCK,
                     RESERVE_NAME}
        try:
            names = set(os.listdir(layout.root))
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
        if not ensure_reserve(layout.root):
            raise NoSpace("no room for the domain's metadata reserve", root=layout.root)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        self = cls(layout.root, _connect(tmp), domain_id)
        try:
            with self.tx("format"):
                for sql in _SCHEMA:
                    self.db.execute(sql)
                self.db.execute("INSERT INTO domain (id, version, created) VALUES (?, ?, ?)",
                                [domain_id, DOMAIN_VERSION, time.time()])
                self.db.execute(f"PRAGMA user_version = {DOMAIN_VERSION}")
        finally:
            self.db.close()
        os.rename(tmp, layout.db_path)
        fsync_dir(layout.root)

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
        self = cls(layout.root, db, row[0])
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] < DOMAIN_VERSION:
                self._migrate()
        except BaseException:
            db.close()
            raise
        return self

    def _migrate(self) -> None:
        """Bring a domain of an earlier version to this one, in one transaction (whoever
        opens it first does it; the others find it done)."""
        with self.tx("migrate") as db:
            if db.execute("PRAGMA user_version").fetchone()[0] >= DOMAIN_VERSION:
                return
            for table, columns in _MIGRATIONS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            # Volumes made before tokens existed get one now: from here on a re-creation
            # with the same IDs is told apart.
            for (volume_id,) in db.execute("SELECT volume_id FROM volumes WHERE token IS NULL"
                                           ).fetchall():
                db.execute("UPDATE volumes SET token = ? WHERE volume_id = ?",
                           [new_token(), volume_id])
            db.execute(f"PRAGMA user_version = {DOMAIN_VERSION}")

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
            raise _sqlite_error(op, e) from e
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
                                  "created": now, "updated": now, "token": new_token()})
        return self.get_volume(volume_id)

    def delete_volume(self, volume_id: str) -> None:
        """Forget a volume and its copy marker (the data file is the caller's to remove).

        On a full file system the reserve is given back for the journal's room: deleting is
        the way out of a full domain, so it must work there (ensure_reserve makes the
        reserve again once the data is gone)."""
        try:
            self._delete_volume(volume_id)
        except NoSpace:
            if not release_reserve(self.layout.root):
                raise
            self._delete_volume(volume_id)

    def _delete_volume(self, volume_id: str) -> None:
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("delete_volume") as db:
            if self.get_volume(volume_id) is None:
                raise NoSuchVolume("no such volume", volume_id=volume_id)
            db.execute("DELETE FROM copy_markers WHERE volume_id = ?", [volume_id])
            db.execute("DELETE FROM volumes WHERE volume_id = ?", [volume_id])

    def begin_copy(self, dst_image: str, dst_volume: str, size: int, src: dict,
                   host_id: str | None, task_id: str | None,
                   src_identity: dict | None = None) -> dict:
        """Create the destination ILLEGAL (generation 0) with its copy marker, in one tx.

        ``src_identity`` (source_identity() of the source's row) binds the marker to the
        source volume it copies. VolumeExists if the destination exists: the caller decides
        continue-vs-conflict by looking at get_marker() first.
        """
        ident = src_identity or {}
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
                                  "created": now, "updated": now, "token": new_token()})
            db["copy_markers"].insert({
                "volume_id": dst_volume, "image_id": dst_image, "src_domain": src_ids[0],
                "src_image": src_ids[1], "src_volume": src_ids[2], "size": size, "copied": 0,
                "generation": 0, "host_id": host_id, "task_id": task_id, "state": "copying",
                "attempts": 1, "errors": "[]", "started": now, "updated": now, "failures": 0,
                "src_generation": ident.get("generation"), "src_token": ident.get("token")})
            return self.get_marker(dst_volume)

    def take_over(self, volume_id: str, host_id: str | None, task_id: str | None,
                  expect_generation: int | None = None, restart: bool = False,
                  src_identity: dict | None = None) -> dict:
        """Make the caller the copier of ``volume_id``; returns the marker with its new generation.

        Bumps the generation of volume and marker (fencing off every earlier copier), records
        host and task, counts the attempt; ``restart`` also resets ``copied`` to 0.
        ``src_identity`` is the source as the caller sees it now: CopyConflict if the marker
        was bound to another (re-created, re-copied, resized) source; a marker made before
        bindings existed is bound to it here. A client's continue (no expect_generation) is
        a person's decision to try again: it starts a new count of failures.
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
            if src_identity is not None:
                check_source(marker, src_identity)
            ident = src_identity or {}
            gen, now = marker["generation"] + 1, time.time()
            db.execute("UPDATE volumes SET generation = ?, updated = ? WHERE volume_id = ?",
                       [gen, now, volume_id])
            db.execute(
                "UPDATE copy_markers SET generation = ?, host_id = ?, task_id = ?,"
                " state = 'copying', attempts = attempts + 1, updated = ?,"
                " copied = CASE WHEN ? THEN 0 ELSE copied END,"
                " failures = CASE WHEN ? THEN 0 ELSE failures END,"
                " src_generation = COALESCE(src_generation, ?),"
                " src_token = COALESCE(src_token, ?) WHERE volume_id = ?",
                [gen, host_id, task_id, now, bool(restart), expect_generation is None,
                 ident.get("generation"), ident.get("token"), volume_id])
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
        """Count a failure of the copy and append its ``error`` to the marker's error list
        (the last MAX_ERRORS are kept): every failure counted has its reason recorded."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("record_error") as db:
            marker = self.get_marker(volume_id, generation)
            if marker is None:
                return False
            errors = (marker["errors"] + [error])[-MAX_ERRORS:]
            db.execute("UPDATE copy_markers SET errors = ?, updated = ?, failures = failures + 1"
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


def check_source(marker: dict, identity: dict) -> None:
    """CopyConflict unless ``identity`` (source_identity() of the source now) is the source
    the marker's copy started from. A marker made before bindings existed matches any."""
    if marker["size"] != identity["size"]:
        raise CopyConflict("the source's size changed since the copy began",
                           volumeID=marker["volume_id"], reason="size",
                           expected=marker["size"], found=identity["size"])
    bound = (marker.get("src_token"), marker.get("src_generation"))
    if bound[0] is not None and bound != (identity["token"], identity["generation"]):
        raise CopyConflict("the source is not the volume the copy began from (deleted and "
                           "re-created, or written by a copy, since)",
                           volumeID=marker["volume_id"], reason="source-replaced")


def ensure_reserve(root: str) -> bool:
    """Make the domain's reserve file whole (RESERVE_BYTES, allocated); False if there is no
    room for it now (a later call makes it)."""
    path = os.path.join(root, RESERVE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_blocks * 512 >= RESERVE_BYTES:
            return True
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(fd, 0)  # a half-allocated reserve would promise room it lacks
                return False
            os.pwrite(fd, bytes(RESERVE_BYTES), 0)  # no fallocate here: write it
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def release_reserve(root: str) -> bool:
    """Give the reserve's room back to the file system; False if there was none."""
    path = os.path.join(root, RESERVE_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        had = os.fstat(fd).st_blocks > 0
        os.ftruncate(fd, 0)
        return had
    finally:
        os.close(fd)
