"""StorageDomain: format, attach and inspect storage domains (directories, maybe shared)."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from agent.supervisor import recovery
from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


# SQLite's unix VFS takes paths of at most 512 bytes (SQLITE_MAX_PATHNAME); a domain's
# metadata.db and its journal, and the files under images/ and dom_md/, must fit beneath.
DOMAIN_PATH_MAX, NAME_MAX = 400, 255


def _abs_path(value: str) -> str:
    """An absolute path every part of a domain can live under: at most DOMAIN_PATH_MAX
    bytes, each name at most NAME_MAX, no NUL. Refused here, as the params they are, not by
    an OS or SQLite call deep in a worker (a path of 2,500 nested names made os.makedirs
    recurse past Python's limit; one of 600 bytes is a file SQLite cannot open)."""
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\0" in value:
        raise ValueError("must not hold a NUL byte")
    path = os.path.normpath(value)
    encoded = os.fsencode(path)
    if len(encoded) > DOMAIN_PATH_MAX:
        raise ValueError(f"must be at most {DOMAIN_PATH_MAX} bytes")
    if any(len(name) > NAME_MAX for name in encoded.split(b"/")):
        raise ValueError(f"each name in it must be at most {NAME_MAX} bytes")
    return path




@verb("StorageDomain.create", Param("domainID", "uuid"), Param("path", "str", check=_abs_path),
      worker=True)
def create(agent: Supervisor, params):
    """Format an empty (or absent) directory as a new domain and attach it.

    Result: the domain's info (as StorageDomain.getInfo). Errors: 208 DomainExists (the
    directory already holds a domain; the ID or the path is attached, or a create or attach
    of either is in progress), -32602 with data.param "path" (not empty, not a directory,
    or a path the OS refuses: data.errno says why), 204 NoSpace.
    """
    agent.domains.reserve(params["domainID"], params["path"])  # released when the task ends
    return WorkerJob("domain.create", params, on_end=recovery.domain_created)


@verb("StorageDomain.attach", Param("domainID", "uuid"), Param("path", "str", check=_abs_path),
      worker=True, events=("Image.recovered",))
def attach(agent: Supervisor, params):
    """Attach an existing domain (for example one that another host formatted).

    Its copy markers are then scanned and the recovery policy applied, as at start-up.
    Result: the domain's info. Errors: 200 NoSuchDomain (no domain with that ID there),
    208 DomainExists (the ID or the path is attached, or being created or attached), 214
    DomainUnusable (its metadata is damaged, not a hostagent schema, or of a newer version:
    data.reason; nothing is written). A domain of an older schema is brought to this one.
    """
    agent.domains.reserve(params["domainID"], params["path"])  # released when the task ends
    return WorkerJob("domain.attach", params, on_end=recovery.domain_attached)


@verb("StorageDomain.getInfo", Param("domainID", "uuid"), worker=True)
def get_info(agent: Supervisor, params):
    """Capacity, free space and volume count of an attached domain.

    Result: {domainID, path, capacity, free, volumes, copies}. Errors: 200 NoSuchDomain.
    """
    return WorkerJob("domain.info", {**params, "path": agent.domains.path(params["domainID"])})


@verb("StorageDomain.list")
def listing(agent: Supervisor, params):
    """The domains this agent has attached (no storage is touched), with this host's place in
    each one's lockspace.

    Result: [{domainID, path, attached_by: "config" | "attach", lockspace: "joined" |
    "joining" | "failed" | "unjoined", error: null | the join's error}]. With the local lease
    manager every domain is "joined"; with sanlock, work that takes leases in a domain
    (copies, creates, deletes, recovery) waits as pending tasks while it is "joining".
    """
    return [{**d, "lockspace": agent.lockspaces.state_of(d["domainID"]),
             "error": agent.lockspaces.errors.get(d["domainID"])}
            for d in agent.domains.listing()]


# -- operations that outlive tasks (docs/crash-model.md, "Operations that outlive tasks") --

@verb("StorageDomain.startScrub", Param("domainID", "uuid"),
      Param("operationID", "uuid", required=False,
            doc="names the operation; a new UUID if absent"),
      worker=True, events=("Operation.state",))
def start_scrub(agent: Supervisor, params):
    """Start a scrub of the domain: an operation that outlives this task and this agent.

    The task takes the domain's scrub lease, registers the operation in the domain's
    metadata (one transaction), starts the scrub process (not a worker: it survives the
    agent's death and restart) and answers once that process says it runs. The scrub reads
    every LEGAL volume (holes are not read), computes its checksum (of its record's kind;
    "blake3-4m:<hex>" when none is recorded, see docs/crash-model.md) and compares it with
    the recorded one: none recorded yet, it records it; a mismatch is reported in the
    result and never overwritten. Its reads are throttled by `[scrub] max_bytes_per_second`. Follow
    it with StorageDomain.getOperationStatuses, from any host attached to the domain.
    Result: the operation as on disk once its process runs, as in getOperationStatuses
    (state STARTED, or already ended for a domain with little to read; pid: the scrub
    process), plus launcher ("spawn" or "systemd-run").
    Errors: 200 NoSuchDomain, 203 LeaseHeld (a scrub runs on this domain; data.holder names
    its operation_id, host_id and pid), 210 OperationExists (the operationID was used),
    105 OperationFailed (the scrub process did not start; the operation is FAILED).
    Events: Operation.state (STARTED from this task; COMPLETED, FAILED or STOPPED from the
    scrub process, best effort, while an agent serves the run dir it was started from).
    """
    operation_id = params["operationID"] or str(uuid.uuid4())
    scrub = agent.config["scrub"]
    return WorkerJob("scrub.start", {
        "domainID": params["domainID"], "path": agent.domains.path(params["domainID"]),
        "operationID": operation_id, "max_bytes_per_second": scrub["max_bytes_per_second"],
        "launcher": scrub["launcher"],
        "event_identity": agent.workers.operation_identity(operation_id)})


@verb("StorageDomain.getOperationStatuses", Param("domainID", "uuid"), worker=True)
def get_operation_statuses(agent: Supervisor, params):
    """Every operation of the domain, read from its storage: the same answer on any host.

    Result: {domainID, operations: [{domainID, operationID, type, state, progress, host_id,
    task_id, pid, started, updated, ended, stop_requested, result, error}]}, oldest first.
    state is NOT_STARTED, STARTED, COMPLETED, FAILED, STOPPED or UNKNOWN: UNKNOWN is an
    operation registered as running whose process no longer holds its lease (it died); it
    stays UNKNOWN until the next operation of its type starts, which records it as FAILED
    (OperationLost). progress is 0-100; updated is rewritten about once a second while it
    runs; times are Unix seconds. A scrub's result: {volumes_checked, recorded, skipped,
    bytes_read, mismatches: [{domainID, imageID, volumeID, expected, found}]} (partial if
    STOPPED or FAILED); error a JSON-RPC error object. Errors: 200 NoSuchDomain.
    """
    return WorkerJob("operation.statuses", {**params,
                                            "path": agent.domains.path(params["domainID"])})


@verb("StorageDomain.stopOperation", Param("domainID", "uuid"), Param("operationID", "uuid"),
      worker=True)
def stop_operation(agent: Supervisor, params):
    """Ask a running operation to stop; it ends STOPPED (with its partial result) within
    about a second, whichever host runs it.

    The request is recorded in the domain's metadata and read by the operation's process at
    its next progress write. Result: the operation (as in getOperationStatuses) with
    stop_requested set; its state changes to STOPPED when the process acts on it.
    Errors: 200 NoSuchDomain, 209 NoSuchOperation, 211 OperationNotRunning (it has ended, or
    its process died: data.state is COMPLETED, FAILED, STOPPED or UNKNOWN).
    """
    return WorkerJob("operation.stop", {**params,
                                        "path": agent.domains.path(params["domainID"])})
