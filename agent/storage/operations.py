"""Operations that outlive tasks, as rows of a domain's metadata: the `operations` table, the
operation lease, and the volume checksums a scrub records.

A task lives in one agent's memory and is forgotten when that agent dies. An operation (a
scrub) lives here, on the domain's storage: any host attached to the domain reads it, and it
outlives the task and the agent that started it. Its states on disk:

    NOT_STARTED -> STARTED               the task registered it; its process says it runs
    STARTED -> COMPLETED | FAILED | STOPPED   written by that process when it ends
    NOT_STARTED | STARTED -> FAILED      (OperationLost) the next start of that type found it
                                         dead: only done under the type's lease

Who runs an operation is decided by its type's **operation lease** (an OFD lock on
`leases/<type>.lease`, agent/storage/leases/local.py) whose holder record names the operation ID.
The lease, not the row, says whether it is alive: a NOT_STARTED or STARTED row whose lease is
free, or held for another operation, reads as UNKNOWN (its process died). UNKNOWN is never
written; the next start of that type turns it into FAILED, in the transaction that registers
the new one.

Every change is one transaction (DomainDB.tx: BEGIN IMMEDIATE), like every other metadata write.
"""

from __future__ import annotations

import json
import os
import time

from agent import errors
from agent.ids import check_uuid
from agent.storage.leases import local
from agent.storage.metadata import DomainDB
from agent.storage.schema import OPERATIONS_SCHEMA

TYPES = ("scrub",)
STATES = ("NOT_STARTED", "STARTED", "COMPLETED", "FAILED", "STOPPED", "UNKNOWN")
ACTIVE = ("NOT_STARTED", "STARTED")
ENDED = ("COMPLETED", "FAILED", "STOPPED")
RETAIN_ENDED = 100  # ended operations kept per domain; older ones are pruned at the next start


def lease_path(ddb: DomainDB, op_type: str) -> str:
    """The lease that admits one operation of ``op_type`` at a time on this domain.

    Its name is never a UUID, so it cannot collide with a volume's lease.
    """
    if op_type not in TYPES:
        raise errors.InvalidParams(f"unknown operation type {op_type!r}", field="type")
    return os.path.join(ddb.layout.leases_dir, f"{op_type}.lease")


def ensure_schema(ddb: DomainDB) -> None:
    """Create the operations table in a domain formatted before it existed (idempotent)."""
    with ddb.tx("ensure_operations") as db:
        for sql in OPERATIONS_SCHEMA:
            db.execute(sql)


def _has_table(ddb: DomainDB) -> bool:
    return ddb.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                          " AND name = 'operations'").fetchone() is not None


def _decode(row) -> dict | None:
    if row is None:
        return None
    row = dict(row)
    for key in ("result", "error"):
        row[key] = json.loads(row[key]) if row[key] else None
    return row


def get(ddb: DomainDB, operation_id: str) -> dict | None:
    operation_id = check_uuid(operation_id, "operationID")
    if not _has_table(ddb):
        return None
    rows = list(ddb.db.query("SELECT * FROM operations WHERE operation_id = ?", [operation_id]))
    return _decode(rows[0]) if rows else None


def listing(ddb: DomainDB) -> list[dict]:
    if not _has_table(ddb):
        return []
    return [_decode(r) for r in ddb.db.query("SELECT * FROM operations ORDER BY started")]


def live(ddb: DomainDB, row: dict, probe: dict | None = ...) -> bool:
    """Whether the operation's process holds its lease: the lock is live AND its holder record
    names this operation (a live lease of the next operation does not make an old row live)."""
    if probe is ...:
        probe = local.probe(lease_path(ddb, row["type"]))
    return bool(probe and probe.get("live") and probe.get("operation_id") == row["operation_id"])


def effective_state(ddb: DomainDB, row: dict, probe: dict | None = ...) -> str:
    """The state a reader reports: the stored one, or UNKNOWN for an active row nobody runs."""
    if row["state"] in ACTIVE and not live(ddb, row, probe):
        return "UNKNOWN"
    return row["state"]


def register(ddb: DomainDB, operation_id: str, op_type: str, host_id: str | None,
             task_id: str | None) -> dict:
    """Record a new operation, NOT_STARTED, progress 0, in one transaction.

    Call it only while holding the type's operation lease: the same transaction turns every
    earlier NOT_STARTED or STARTED operation of that type into FAILED (OperationLost), since
    holding the lease proves their processes are gone, and prunes ended operations beyond
    RETAIN_ENDED. OperationExists if the ID was used before in this domain.
    """
    operation_id = check_uuid(operation_id, "operationID")
    lease_path(ddb, op_type)  # checks the type
    now = time.time()
    with ddb.tx("register_operation") as db:
        if list(db.query("SELECT 1 FROM operations WHERE operation_id = ?", [operation_id])):
            raise errors.OperationExists("an operation with this ID exists in this domain",
                                         operationID=operation_id)
        lost = errors.OperationLost(
            "its process died without finishing; found when the next operation started",
            found_by=operation_id).to_json()
        db.execute("UPDATE operations SET state = 'FAILED', error = ?, ended = ?, updated = ?"
                   " WHERE type = ? AND state IN ('NOT_STARTED', 'STARTED')",
                   [json.dumps(lost), now, now, op_type])
        db.execute("DELETE FROM operations WHERE operation_id IN (SELECT operation_id FROM"
                   " operations WHERE state IN ('COMPLETED', 'FAILED', 'STOPPED')"
                   " ORDER BY ended DESC LIMIT -1 OFFSET ?)", [RETAIN_ENDED])
        db["operations"].insert({
            "operation_id": operation_id, "type": op_type, "state": "NOT_STARTED",
            "progress": 0.0, "host_id": host_id, "task_id": task_id, "pid": None,
            "started": now, "updated": now, "ended": None, "stop_requested": None,
            "result": None, "error": None})
        return get(ddb, operation_id)


def mark_started(ddb: DomainDB, operation_id: str, pid: int) -> dict | None:
    """The operation's own process says it runs: STARTED with its pid. None if the row is
    gone or has ended (then the process must not run)."""
    with ddb.tx("start_operation") as db:
        cur = db.execute("UPDATE operations SET state = 'STARTED', pid = ?, updated = ?"
                         " WHERE operation_id = ? AND state IN ('NOT_STARTED', 'STARTED')",
                         [pid, time.time(), operation_id])
        return get(ddb, operation_id) if cur.rowcount == 1 else None


def report_progress(ddb: DomainDB, operation_id: str, progress: float) -> dict | None:
    """Progress (0-100) and the heartbeat `updated`; returns the row, so the caller sees a
    stop request (stop_requested), or None if the operation is no longer STARTED."""
    with ddb.tx("operation_progress") as db:
        cur = db.execute("UPDATE operations SET progress = ?, updated = ?"
                         " WHERE operation_id = ? AND state = 'STARTED'",
                         [round(progress, 2), time.time(), operation_id])
        return get(ddb, operation_id) if cur.rowcount == 1 else None


def finish(ddb: DomainDB, operation_id: str, state: str, result: dict | None = None,
           error: dict | None = None, progress: float | None = None) -> bool:
    """End the operation: COMPLETED, FAILED or STOPPED. False if it had ended already."""
    if state not in ENDED:
        raise errors.InvalidParams(f"{state} is not an end state", field="state")
    now = time.time()
    with ddb.tx("finish_operation") as db:
        cur = db.execute(
            "UPDATE operations SET state = ?, result = ?, error = ?, ended = ?, updated = ?,"
            " progress = COALESCE(?, progress)"
            " WHERE operation_id = ? AND state IN ('NOT_STARTED', 'STARTED')",
            [state, json.dumps(result) if result is not None else None,
             json.dumps(error) if error is not None else None, now, now, progress,
             operation_id])
        return cur.rowcount == 1


def request_stop(ddb: DomainDB, operation_id: str) -> dict:
    """Record a stop request that the operation's process acts on at its next progress write.

    NoSuchOperation if there is no such row; OperationNotRunning if it has ended or its
    process is gone (it reads UNKNOWN). Returns the row with stop_requested set.
    """
    operation_id = check_uuid(operation_id, "operationID")
    if not _has_table(ddb):
        raise errors.NoSuchOperation("no such operation", operationID=operation_id)
    with ddb.tx("stop_operation") as db:
        row = get(ddb, operation_id)
        if row is None:
            raise errors.NoSuchOperation("no such operation", operationID=operation_id)
        state = effective_state(ddb, row)
        if state not in ACTIVE:
            raise errors.OperationNotRunning(f"the operation is not running: {state}",
                                             operationID=operation_id, state=state)
        if row["stop_requested"] is None:
            db.execute("UPDATE operations SET stop_requested = ? WHERE operation_id = ?",
                       [time.time(), operation_id])
        return get(ddb, operation_id)


_VOLUME_IDENTITY = ("image_id", "generation", "legality", "created", "checksum")


def settle_checksum(ddb: DomainDB, seen: dict, found: str) -> str:
    """Compare the checksum a scrub computed for a volume with the recorded one, in one tx.

    ``seen`` is the volume's row as read before hashing. Returns "recorded" (it had none:
    ``found`` is now its checksum), "match", "mismatch" (nothing is written: a mismatch is
    reported, never overwritten), or "changed" (deleted, re-created, re-copied or given a
    checksum meanwhile: the hash is of data nobody vouches for, so nothing is said).
    """
    with ddb.tx("scrub_checksum") as db:
        now = ddb.get_volume(seen["volume_id"])
        if now is None or any(now[k] != seen[k] for k in _VOLUME_IDENTITY):
            return "changed"
        if now["checksum"] is None:
            db.execute("UPDATE volumes SET checksum = ? WHERE volume_id = ? AND checksum IS NULL",
                       [found, seen["volume_id"]])
            return "recorded"
        return "match" if now["checksum"] == found else "mismatch"


def legal_volumes(ddb: DomainDB) -> list[dict]:
    """Every LEGAL volume's row, in a stable order (what a scrub reads)."""
    return list(ddb.db.query("SELECT * FROM volumes WHERE legality = 'LEGAL'"
                             " ORDER BY image_id, volume_id"))
