"""Copy markers: the state of copies in progress, in a domain's metadata (DomainDB's part).

A marker and its ILLEGAL destination carry one generation, the fencing token: take_over()
bumps both, and every later write by a copier names the generation it was given, so a
superseded copier (a stale task, a host that lost its lease) writes nothing. A marker is
bound to the source it copies (source_identity: the source's creation token, generation and
size), so a volume never turns LEGAL with data of a source re-created under the same IDs.
"""

from __future__ import annotations

import json
import time
import uuid

from agent.errors import CopyConflict, GenerationMismatch, InvalidParams, NoSuchVolume
from agent.ids import check_uuid

MAX_ERRORS = 20


def new_token() -> str:
    return uuid.uuid4().hex


def source_identity(row: dict) -> dict:
    """What binds a copy to the source it started from: IDs alone survive a re-creation."""
    return {"generation": row["generation"], "token": row["token"], "size": row["size"]}


def _marker(row: dict | None) -> dict | None:
    if row is not None:
        row = dict(row)
        row["errors"] = json.loads(row["errors"])
    return row


def size_checked(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidParams("size must be a non-negative integer", field="size")
    return size


class Markers:
    """DomainDB's copy-marker methods (it provides tx, db, get_volume, insert_volume)."""

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

    def begin_copy(self, dst_image: str, dst_volume: str, size: int, src: dict,
                   host_id: str | None, task_id: str | None,
                   src_identity: dict | None = None, fmt: str = "raw",
                   kind: str = "collapse", bitmaps: bool = False) -> dict:
        """Create the destination ILLEGAL (generation 0) with its copy marker, in one tx.

        ``src_identity`` (source_identity() of the source's row) binds the marker to the
        source volume it copies. VolumeExists if the destination exists: the caller decides
        continue-vs-conflict by looking at get_marker() first. ``bitmaps``: a collapse that
        ends by carrying the source's dirty bitmaps (whoever continues it).
        """
        return self.begin_chain([{"imageID": dst_image, "volumeID": dst_volume, "size": size,
                                  "src": src, "src_identity": src_identity, "format": fmt,
                                  "parent_id": None, "kind": kind, "bitmaps": bitmaps}],
                                host_id, task_id)[0]

    def begin_chain(self, layers: list[dict], host_id: str | None,
                    task_id: str | None) -> list[dict]:
        """Create every destination of ``layers`` (base first: {imageID, volumeID, size, src,
        src_identity, format, parent_id, kind}) ILLEGAL with its marker, in ONE tx: a chain
        copy's answer names volumes that all exist, and a crash leaves all or none."""
        rows = []
        for layer in layers:
            src = layer["src"]
            if not isinstance(src, dict):
                raise InvalidParams("src must be an object", field="src")
            rows.append((check_uuid(layer["imageID"], "imageID"),
                         check_uuid(layer["volumeID"], "volumeID"), size_checked(layer["size"]),
                         [check_uuid(src.get(k), f"src.{k}")
                          for k in ("domainID", "imageID", "volumeID")], layer))
        with self.tx("begin_copy") as db:
            for image, volume, size, src_ids, layer in rows:
                ident = layer.get("src_identity") or {}
                now = self.insert_volume(db, image, volume, size, "ILLEGAL",
                                         layer.get("format", "raw"), layer.get("parent_id"))
                db["copy_markers"].insert({
                    "volume_id": volume, "image_id": image, "src_domain": src_ids[0],
                    "src_image": src_ids[1], "src_volume": src_ids[2], "size": size,
                    "copied": 0, "generation": 0, "host_id": host_id, "task_id": task_id,
                    "state": "copying", "attempts": 1, "errors": "[]", "started": now,
                    "updated": now, "failures": 0, "src_generation": ident.get("generation"),
                    "src_token": ident.get("token"), "kind": layer.get("kind", "collapse"),
                    "bitmaps": int(bool(layer.get("bitmaps")))})
            return [self.get_marker(volume) for _, volume, _, _, _ in rows]

    def take_over(self, volume_id: str, host_id: str | None, task_id: str | None,
                  expect_generation: int | None = None, restart: bool = False,
                  src_identity: dict | None = None, failed_tasks: list | None = None,
                  previous_errors: list | None = None) -> dict:
        """Make the caller the copier of ``volume_id``; returns the marker with its new generation.

        Bumps the generation of volume and marker (fencing off every earlier copier), records
        host and task, counts the attempt; ``restart`` also resets ``copied`` to 0.
        ``src_identity`` is the source as the caller sees it now: CopyConflict if the marker
        was bound to another (re-created, re-copied, resized) source; a marker made before
        bindings existed is bound to it here. A client's continue (no expect_generation) is
        a person's decision to try again: it starts a new count of failures.
        ``previous_errors``, failures no worker could record (it died), are counted in the
        same transaction, so that a retry dying right after it leaves none of them out.
        NoSuchVolume if the volume does not exist; GenerationMismatch if it has no marker (the
        copy is finished) or its generation is not ``expect_generation`` (nor one raised by
        ``failed_tasks`` since: expected_generation).
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
            expected = expected_generation(marker, expect_generation, host_id, failed_tasks)
            if expected is not None and marker["generation"] != expected:
                raise GenerationMismatch("copy generation changed", volume_id=volume_id,
                                         expected=expect_generation,
                                         generation=marker["generation"])
            if src_identity is not None:
                check_source(marker, src_identity)
            ident = src_identity or {}
            gen, now = marker["generation"] + 1, time.time()
            added, kept = with_errors(marker, previous_errors if expect_generation is not None
                                      else None)
            db.execute("UPDATE volumes SET generation = ?, updated = ? WHERE volume_id = ?",
                       [gen, now, volume_id])
            db.execute(
                "UPDATE copy_markers SET generation = ?, host_id = ?, task_id = ?,"
                " state = 'copying', attempts = attempts + 1, updated = ?,"
                " copied = CASE WHEN ? THEN 0 ELSE copied END,"
                " failures = CASE WHEN ? THEN 0 ELSE failures + ? END, errors = ?,"
                " src_generation = COALESCE(src_generation, ?),"
                " src_token = COALESCE(src_token, ?) WHERE volume_id = ?",
                [gen, host_id, task_id, now, bool(restart), expect_generation is None, added,
                 kept, ident.get("generation"), ident.get("token"), volume_id])
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
        return self.record_errors(volume_id, generation, [error])

    def record_errors(self, volume_id: str, generation: int, found: list) -> bool:
        """record_error for each of ``found`` the marker does not hold yet (unrecorded())."""
        return count_errors(self, "record_error", "copy_markers",
                            check_uuid(volume_id, "volumeID"), generation, found)

    def fence(self, volume_id: str, generation: int) -> int:
        """Raise the generation of a volume (and of its copy marker) that is at
        ``generation``, so every writer that took it over before writes nothing more (206).
        Returns the new generation; GenerationMismatch if it moved on, NoSuchVolume."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("fence") as db:
            volume = self.get_volume(volume_id)
            if volume is None:
                raise NoSuchVolume("no such volume", volume_id=volume_id)
            if volume["generation"] != generation:
                raise GenerationMismatch("the volume's generation changed",
                                         volumeID=volume_id, expected=generation,
                                         generation=volume["generation"])
            now = time.time()
            db.execute("UPDATE volumes SET generation = ?, updated = ? WHERE volume_id = ?",
                       [generation + 1, now, volume_id])
            for table in ("copy_markers", "transfers", "merges"):  # a writer of any kind
                db.execute(f"UPDATE {table} SET generation = ?, updated = ?"
                           " WHERE volume_id = ? AND generation = ?",
                           [generation + 1, now, volume_id, generation])
            return generation + 1

    def abandon(self, volume_id: str, generation: int, errors: list | None = None) -> bool:
        """Mark the copy abandoned (kept for a later take_over), counting in the same
        transaction the ``errors`` no worker recorded (record_errors); False if superseded."""
        return count_errors(self, "abandon", "copy_markers",
                            check_uuid(volume_id, "volumeID"), generation, errors,
                            abandon=True)


def expected_generation(record: dict, expected: int | None, host_id: str | None,
                        failed_tasks: list | None) -> int | None:
    """The generation at which a retry (or an abandon) may take a copy's marker or a merge's
    record: `expected`, the last its supervisor heard of, or more if the last to take it
    over was one of `failed_tasks`, this host's tasks that died since, in order. A worker
    commits its take-over before it can say so and may die in between; its supervisor saw
    it die, so a generation it raised fences nobody else off. Each of them took it over at
    most once, so the one at position j raised it by at most j + 1."""
    if expected is None or not failed_tasks or record["host_id"] != host_id \
            or record["task_id"] not in failed_tasks:
        return expected
    last = len(failed_tasks) - failed_tasks[::-1].index(record["task_id"])  # retry IDs repeat
    if expected < record["generation"] <= expected + last:
        return record["generation"]
    return expected


def unrecorded(record: dict, found: list | None) -> list:
    """The errors of `found` that `record` (a marker or a merge) does not hold yet: a retry
    carries the errors of the workers that died before it, some of which may have recorded
    those before them (the same error is the same task's, at the same time; one that does
    not say when is always new)."""
    held = {(e.get("task_id"), e["time"]) for e in record["errors"] if "time" in e}
    return [e for e in found or [] if "time" not in e or (e.get("task_id"), e["time"]) not in held]


def count_errors(db, op: str, table: str, volume_id: str, generation: int,
                 found: list | None, abandon: bool = False) -> bool:
    """One transaction (`op`): the errors of `found` that the record at `generation` (a
    copy's marker in copy_markers, a merge in merges) does not hold yet, each counted as a
    failure with its reason, and the record marked abandoned if asked; False if superseded."""
    get = {"copy_markers": db.get_marker, "merges": db.get_merge}[table]
    with db.tx(op) as conn:
        record = get(volume_id, generation)
        if record is None:
            return False
        added, kept = with_errors(record, found)
        state = ", state = 'abandoned'" if abandon else ""
        conn.execute(f"UPDATE {table} SET errors = ?, failures = failures + ?, updated = ?"
                     f"{state} WHERE volume_id = ? AND generation = ?",
                     [kept, added, time.time(), volume_id, generation])
        return True


def with_errors(record: dict, found: list | None) -> tuple[int, str]:
    """(how many of `found` are new to `record`, its error list with them as stored: the
    last MAX_ERRORS)."""
    new = unrecorded(record, found)
    return len(new), json.dumps((record["errors"] + new)[-MAX_ERRORS:])


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
