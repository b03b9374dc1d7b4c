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

Copy markers and their generations, the fencing token: agent/storage/markers.py; transfers:
agent/storage/transfers.py; merges: agent/storage/merges.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
import urllib.parse

import sqlite_utils

from agent import system
from agent.errors import (
    AgentError,
    DomainExists,
    DomainUnusable,
    ImageInvalid,
    InvalidParams,
    NoSpace,
    NoSuchDomain,
    NoSuchVolume,
    OperationFailed,
    VolumeExists,
    VolumeHasChildren,
    VolumeIllegal,
    VolumeInUse,
)
from agent.ids import check_uuid
from agent.storage.bitmaps import Bitmaps
from agent.storage.layout import DB_NAME, DOM_MD, IMAGES, LEASES, Layout
from agent.storage.markers import Markers, new_token, size_checked
from agent.storage.merges import Merges
from agent.storage.reserve import RESERVE_NAME, ensure_reserve, release_reserve
from agent.storage.schema import (
    DOMAIN_VERSION,
    MIGRATION_INDEXES,
    MIGRATIONS,
    NEW_TABLES,
    REQUIRED,
    SCHEMA,
)
from agent.storage.transfers import Transfers
from agent.system import fsync_dir

BUSY_TIMEOUT = 30.0
FORMAT_LOCK = ".format.lock"  # held while a domain is formatted (never deleted)

# Crash-point test seam. When a test sets this to a callable it is called with "commit:<op>"
# right after every COMMIT, including those of a superseded call that changed nothing (op is
# the method name: format, create_volume, begin_copy, take_over, checkpoint, ...), so a crash
# test can SIGKILL the process at the N-th write and check what start-up recovers from that
# exact state. Never set outside tests.
_after_write_hook = None
# The same, called with "begin:<op>" before each write transaction begins (a worker killed
# before it could write at all). Never set outside tests.
_before_write_hook = None


def _connect(path: str) -> sqlite_utils.Database:
    # mode=rw: opening must never create an empty database where a domain was expected.
    uri = "file:" + urllib.parse.quote(path) + "?mode=rw"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # No sqlite-utils plugins: whatever else is installed has no say in the agent's
        # connections, and finding them (every package's entry points) cost each worker
        # tens of milliseconds before its first query (docs/performance.md).
        return sqlite_utils.Database(conn, execute_plugins=False)
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


class DomainDB(Markers, Transfers, Merges, Bitmaps):
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
            system.makedirs(layout.root, 0o755)
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
        leftovers = {IMAGES, LEASES, DOM_MD, DB_NAME + ".tmp", DB_NAME + ".tmp-journal",
                     FORMAT_LOCK, RESERVE_NAME}
        try:
            names = set(os.listdir(layout.root))
        except NotADirectoryError:
            raise InvalidParams("root is not a directory", field="root") from None
        # Only the debris of an earlier, interrupted format may be here.
        if not names <= leftovers or any(
                os.listdir(os.path.join(layout.root, d)) for d in (IMAGES, LEASES) if d in names):
            raise InvalidParams("root must be empty or absent", field="root")
        if DOM_MD in names and os.listdir(os.path.join(layout.root, DOM_MD)):
            raise InvalidParams("root must be empty or absent", field="root")
        for name in (tmp, tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        os.makedirs(layout.images_dir, 0o755, exist_ok=True)
        os.makedirs(layout.leases_dir, 0o755, exist_ok=True)
        os.makedirs(os.path.join(layout.root, DOM_MD), 0o755, exist_ok=True)
        if not ensure_reserve(layout.root):
            raise NoSpace("no room for the domain's metadata reserve", root=layout.root)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        self = cls(layout.root, _connect(tmp), domain_id)
        try:
            with self.tx("format"):
                for sql in SCHEMA:
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
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > DOMAIN_VERSION:
                raise DomainUnusable("the domain was made by a newer version of the agent",
                                     root=layout.root, reason="newer-version",
                                     version=version, supported=DOMAIN_VERSION)
            if version < DOMAIN_VERSION:
                self._check_schema(set(MIGRATIONS) | set(NEW_TABLES))  # what migrating adds
                self._migrate()
            self._check_schema()
        except BaseException:
            db.close()
            raise
        return self

    def _check_schema(self, exempt: set = frozenset()) -> None:
        """DomainUnusable unless every table this version uses is a table with its columns
        (`exempt`: the columns a migration is about to add are not required yet)."""
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, columns in REQUIRED.items():
            if table not in tables and not (table in exempt and table in NEW_TABLES):
                raise DomainUnusable(f"the domain's metadata has no {table} table",
                                     root=self.layout.root, reason="damaged", table=table)
            if table not in tables:
                continue  # a table the migration makes whole
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            added = {name for name, _ in MIGRATIONS.get(table, ())} if table in exempt else set()
            missing = sorted(columns - have - added)
            if missing:
                raise DomainUnusable(f"the domain's {table} table lacks {', '.join(missing)}",
                                     root=self.layout.root, reason="damaged", table=table)

    def _migrate(self) -> None:
        """Bring a domain of an earlier version to this one, in one transaction (whoever
        opens it first does it; the others find it done)."""
        with self.tx("migrate") as db:
            if db.execute("PRAGMA user_version").fetchone()[0] >= DOMAIN_VERSION:
                return
            for table, columns in MIGRATIONS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            for sql in MIGRATION_INDEXES:
                db.execute(sql)
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
        if _before_write_hook is not None:
            _before_write_hook(f"begin:{op}")
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

    def data_files(self) -> set[tuple[str, str, str]]:
        """(imageID, volumeID, format) of every row: the data files the metadata names."""
        return set(self.db.execute("SELECT image_id, volume_id, format FROM volumes"))

    # Inside a tx the write lock is held, so what these read stays true until COMMIT.
    def get_volume(self, volume_id: str) -> dict | None:
        volume_id = check_uuid(volume_id, "volumeID")
        rows = list(self.db.query("SELECT * FROM volumes WHERE volume_id = ?", [volume_id]))
        return rows[0] if rows else None

    def create_volume(self, image_id: str, volume_id: str, size: int, fmt: str = "raw",
                      parent_id: str | None = None, preallocation: str | None = None,
                      bitmaps: tuple = ()) -> dict:
        """Record a new LEGAL volume of generation 0. VolumeExists if the id is taken; with
        a parent, the parent must be the LEGAL leaf of the same image (chains are linear).
        `bitmaps`: the rows of the dirty bitmaps its file was made with (a snapshot's)."""
        image_id = check_uuid(image_id, "imageID")
        volume_id = check_uuid(volume_id, "volumeID")
        size = size_checked(size)
        with self.tx("create_volume") as db:
            if parent_id is not None:
                self.check_new_parent(image_id, parent_id, size)
            self.insert_volume(db, image_id, volume_id, size, "LEGAL", fmt, parent_id,
                               preallocation)
            for b in bitmaps:
                self.insert_bitmap(db, volume_id, b["name"], b["granularity"],
                                   b.get("continues", False))
        return self.get_volume(volume_id)

    def insert_volume(self, db, image_id: str, volume_id: str, size: int,
                      legality: str, fmt: str = "raw", parent_id: str | None = None,
                      preallocation: str | None = None) -> float:
        """A new volume's row (inside a tx): generation 0 and a fresh creation token.
        VolumeExists if the ID is taken. Returns its creation time. ``preallocation``: how
        it was made, if it was made whole or sparse on purpose (None: a copy's, a
        transfer's, or one made before the column existed)."""
        if self.get_volume(volume_id) is not None:
            raise VolumeExists("volume exists", volume_id=volume_id)
        now = time.time()
        db["volumes"].insert({"volume_id": volume_id, "image_id": image_id, "size": size,
                              "legality": legality, "generation": 0, "checksum": None,
                              "created": now, "updated": now, "token": new_token(),
                              "format": fmt, "parent_id": parent_id,
                              "preallocation": preallocation})
        return now

    def extend_volume(self, volume_id: str, generation: int, size: int) -> bool:
        """A volume's new virtual size (its file grown first) with generation + 1, if it is
        still at ``generation``, LEGAL, with no children (checked again under the lock). Its
        recorded checksum is of the shorter guest view: dropped, so a scrub records the new
        one instead of calling the grown volume a mismatch."""
        with self.tx("extend_volume") as db:
            row = self.get_volume(volume_id)
            if row is None or row["generation"] != generation or row["legality"] != "LEGAL" \
                    or self.children(volume_id):
                return False
            db.execute("UPDATE volumes SET size = ?, generation = ?, checksum = NULL,"
                       " updated = ? WHERE volume_id = ?",
                       [size, generation + 1, time.time(), volume_id])
            return True

    def check_new_parent(self, image_id: str, parent_id: str, size: int) -> dict:
        """The parent a new snapshot may be layered on (inside a tx): a LEGAL volume of the
        same image, no copy in progress, no child yet, no larger than the snapshot."""
        parent = self.get_volume(parent_id)
        if parent is None or parent["image_id"] != image_id:
            raise NoSuchVolume("no such parent volume in this image", volumeID=parent_id,
                               imageID=image_id)
        if parent["legality"] != "LEGAL" or self.get_marker(parent_id) is not None:
            raise VolumeIllegal("the parent volume is not LEGAL", volumeID=parent_id)
        children = self.children(parent_id)
        if children:
            raise VolumeHasChildren("the parent already has a snapshot: snapshots are taken "
                                    "of the chain's leaf", volumeID=parent_id,
                                    children=children)
        if size < parent["size"]:
            raise InvalidParams("a snapshot cannot be smaller than its parent", field="size",
                                parent_size=parent["size"])
        return parent

    def children(self, volume_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT volume_id FROM volumes WHERE parent_id = ? ORDER BY created",
            [volume_id])]

    def chain(self, volume_id: str) -> list[dict]:
        """The volume and its ancestors, base first. ImageInvalid if a parent is missing or
        in another image, or the links loop (metadata damaged behind the agent's back)."""
        rows, seen = [], set()
        row = self.get_volume(volume_id)
        while row is not None:
            if row["volume_id"] in seen or (rows and row["image_id"] != rows[-1]["image_id"]):
                raise ImageInvalid("the volume's chain loops or leaves its image",
                                   volumeID=volume_id, reason="chain")
            seen.add(row["volume_id"])
            rows.append(row)
            if row["parent_id"] is None:
                return rows[::-1]
            parent = self.get_volume(row["parent_id"])
            if parent is None:
                raise ImageInvalid("a volume of the chain is missing", volumeID=volume_id,
                                   missing=row["parent_id"], reason="chain")
            row = parent
        raise NoSuchVolume("no such volume", volume_id=volume_id)

    def image_volumes(self, image_id: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM volumes WHERE image_id = ? ORDER BY created",
                                  [check_uuid(image_id, "imageID")]))

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
            children = self.children(volume_id)
            if children:
                raise VolumeHasChildren("the volume has snapshots layered on it: delete them "
                                        "first", volumeID=volume_id, children=children)
            merge = self.merge_of(volume_id)
            if merge is not None and volume_id in (merge["volume_id"], merge["top_id"]):
                raise VolumeInUse("the volume is in a merge: continue the merge (Image.merge) "
                                  "to end it", volumeID=volume_id, reason="merge",
                                  base=merge["volume_id"], top=merge["top_id"])
            db.execute("DELETE FROM copy_markers WHERE volume_id = ?", [volume_id])
            db.execute("DELETE FROM transfers WHERE volume_id = ?", [volume_id])
            db.execute("DELETE FROM volumes WHERE volume_id = ?", [volume_id])
