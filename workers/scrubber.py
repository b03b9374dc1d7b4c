"""The scrub process: check every LEGAL volume of a domain against its recorded checksum.

    python -m workers.scrubber --domain-path P --domain-id D --operation-id O --lease-fd N ...

Started by the StorageDomain.startScrub worker (workers/ops/operation.py), it is NOT a worker of
the supervisor: a fresh interpreter in a session of its own, with no parent-death signal, so
it keeps running when the agent is killed or restarted (its command line never names
workers.forkserver, which is what start-up kills). It inherits, as --lease-fd, a descriptor of
the domain's scrub lease that the worker took: an OFD lock belongs to the open file
description, so the lease passes from the worker to this process without a gap, and the
kernel frees it when this process dies, however it dies.

Everything it has to say goes to the domain's `operations` table (agent/storage/operations.py),
which any host reads: STARTED with its pid when it begins, progress and the heartbeat
`updated` at most about once a second, then COMPLETED with {volumes_checked, recorded,
skipped, bytes_read, mismatches}, STOPPED (a stop request, read at every progress write, or
SIGTERM) with the partial result, or FAILED with the error. Operation.state events are a
best-effort extra, sent to the agent's worker socket (identity op:<operationID>:<mac>,
workers/protocol.py) and lost if no agent listens there.

Reads are throttled to --max-bytes-per-second (0: unlimited; holes are never read, so they
cost nothing against the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

import zmq

from agent import errors, logs
from agent.storage import checksum, operations, qemu_nbd
from agent.storage.copy import nbd
from agent.storage.metadata import DomainDB
from workers import protocol
from workers.protocol import EVENT_IDENTITY_ENV

PROGRESS_INTERVAL = 1.0  # seconds between progress writes (each one also reads stop requests)
SLEEP_SLICE = 0.2  # a throttle sleep is cut in slices this long, so stops are seen promptly
FINAL_EVENT_PATIENCE = 1.0  # how long the last event may wait for a connection to the agent


class _Stop(Exception):
    """A stop was requested (stopOperation, or SIGTERM)."""


class _Lost(Exception):
    """Our row is no longer STARTED: someone else decided its fate; write nothing more."""


class EventSender:
    """Operation.state events to the agent, if one listens on the run dir: never blocking.

    ZMQ_IMMEDIATE queues messages only on a finished connection, so with no agent a send
    fails at once (the event is lost, as documented) instead of piling up for a later one.
    """

    def __init__(self, run_dir: str, identity: str, task_id: str | None):
        self.task_id = task_id
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.SNDHWM, 16)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.LINGER, int(FINAL_EVENT_PATIENCE * 1000))
        self.sock.connect(protocol.endpoint(run_dir))

    def send(self, params: dict, patience: float = 0.0) -> bool:
        data = json.dumps({"t": "event", "topic": "Operation.state", "task_id": self.task_id,
                           "params": params}).encode()
        deadline = time.monotonic() + patience
        while True:
            try:
                self.sock.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()  # waits at most LINGER for an event already queued
        self.ctx.term()


class Scrub:
    def __init__(self, ddb: DomainDB, operation_id: str, rate: int, log):
        self.ddb = ddb
        self.operation_id = operation_id
        self.rate = rate
        self.log = log
        self.signalled = False  # SIGTERM: stop at the next chunk
        self.result = {"volumes_checked": 0, "recorded": 0, "skipped": 0, "bytes_read": 0,
                       "mismatches": []}
        self.total = 0
        self.done = 0  # logical bytes of the volumes finished so far
        self.began = time.monotonic()
        self.last_write = 0.0

    # -- progress, stops and the throttle ----------------------------------------------

    def progress(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    def tick(self, force: bool = False) -> None:
        """Write progress and read stop requests, at most every PROGRESS_INTERVAL."""
        if self.signalled:
            raise _Stop()
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_INTERVAL:
            return
        self.last_write = now
        row = operations.report_progress(self.ddb, self.operation_id, min(self.progress(), 99.99))
        if row is None:
            raise _Lost()
        if row["stop_requested"] is not None:
            raise _Stop()

    def throttle(self) -> None:
        if not self.rate:
            return
        while (ahead := self.result["bytes_read"] / self.rate
               - (time.monotonic() - self.began)) > 0:
            time.sleep(min(ahead, SLEEP_SLICE))
            self.tick()

    # -- the scrub ---------------------------------------------------------------------

    def run(self) -> dict:
        volumes = operations.legal_volumes(self.ddb)
        self.total = sum(v["size"] for v in volumes)
        self.tick(force=True)
        for vol in volumes:
            self.check_volume(vol)
            self.done += vol["size"]
            self.tick()
        return self.result

    def check_volume(self, vol: dict) -> None:
        base = self.done
        path = self.ddb.layout.data_path(vol)

        def on_chunk(offset: int, read: int) -> None:
            self.result["bytes_read"] += read
            self.done = base + min(offset, vol["size"])
            self.throttle()
            self.tick()

        try:
            kind = checksum.kind_of(vol["checksum"])
            if vol.get("format", "raw") == "raw":
                found = checksum.file_checksum(path, on_chunk, kind)
            else:  # a qcow2 is read through qemu: its guest view, as its copy hashed it
                found = nbd.guest_checksum(self.ddb, vol, on_chunk, kind)
        except FileNotFoundError:
            found = None
        except errors.AgentError as exc:  # refused before qemu opened it, or unreadable
            self._mismatch(vol, None, exc.message, exc.data.get("reason"))
            return
        finally:
            self.done = base
        if found is None:
            # Deleted meanwhile (the row goes first), or a LEGAL volume without its data.
            if self.ddb.get_volume(vol["volume_id"]) is None:
                self.result["skipped"] += 1
            else:
                self._mismatch(vol, None, "the volume's data file is missing")
            return
        verdict = operations.settle_checksum(self.ddb, vol, found)
        if verdict == "changed":
            self.result["skipped"] += 1
            return
        self.result["volumes_checked"] += 1
        if verdict == "recorded":
            self.result["recorded"] += 1
        elif verdict == "mismatch":
            self._mismatch(vol, found)

    def _mismatch(self, vol: dict, found: str | None, why: str | None = None,
                  reason: str | None = None) -> None:
        entry = {"domainID": self.ddb.domain_id, "imageID": vol["image_id"],
                 "volumeID": vol["volume_id"], "expected": vol["checksum"], "found": found}
        if why:
            entry["error"] = why
            if reason:
                entry["reason"] = reason
            self.result["volumes_checked"] += 1
        self.result["mismatches"].append(entry)
        self.log.warning("checksum_mismatch", **entry)


def _hand_over_lease(fd: int) -> None:
    """Keep the inherited lease to ourselves (no child of ours inherits it) and name us as its
    holder, keeping the record's other fields (operation_id, host_id, since)."""
    os.set_inheritable(fd, False)
    try:
        old = os.pread(fd, 64 * 1024, 0)
        record = json.loads(old)
    except (OSError, ValueError):
        old, record = b"", {}
    if not isinstance(record, dict):
        record = {}
    record.update(pid=os.getpid(), process="scrub")
    data = json.dumps(record, sort_keys=True).encode()
    # Padded, never truncated first: a reader must never see an empty or half record.
    os.pwrite(fd, data.ljust(len(old)), 0)
    os.fsync(fd)


def _ready(fd: int | None) -> None:
    if fd is not None:
        os.write(fd, b"1")
        os.close(fd)


def _arguments(argv):
    parser = argparse.ArgumentParser(prog="hostagent-scrubber")
    parser.add_argument("--domain-path", required=True)
    parser.add_argument("--domain-id", required=True)
    parser.add_argument("--operation-id", required=True)
    parser.add_argument("--lease-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--host-id")
    parser.add_argument("--task-id")
    parser.add_argument("--max-bytes-per-second", type=int, default=0)
    return parser.parse_args(argv)


def _run(scrub: Scrub, log) -> tuple:
    """(state, result, error, progress) of the scrub, however it ended; None if another
    process decided its fate meanwhile (its row is no longer ours to write)."""
    try:
        return "COMPLETED", scrub.run(), None, 100.0
    except _Stop:
        return "STOPPED", scrub.result, None, None
    except _Lost:
        log.warning("operation_ended_elsewhere")
        return None
    except errors.AgentError as exc:
        return "FAILED", scrub.result, exc.to_json(), None
    except Exception as exc:  # a bug: logged here, named in the row
        traceback.print_exc(file=sys.stderr)
        return "FAILED", scrub.result, errors.InternalError(
            f"{type(exc).__name__} in the scrub process").to_json(), None


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logs.setup()
    qemu_nbd.configure(protocol.exports_dir(args.run_dir))
    log = logs.get(component="scrub", operation_id=args.operation_id, domain_id=args.domain_id)
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)
    try:
        ddb = DomainDB.open(args.domain_path, args.domain_id)
    except errors.AgentError as exc:
        log.error("cannot_open_domain", error=exc.message)
        return 2  # nothing written: the operation reads UNKNOWN once we are gone
    _hand_over_lease(args.lease_fd)
    if operations.mark_started(ddb, args.operation_id, os.getpid()) is None:
        log.warning("operation_ended_before_its_process_started")
        return 3
    _ready(args.ready_fd)
    scrub = Scrub(ddb, args.operation_id, max(0, args.max_bytes_per_second), log)
    signal.signal(signal.SIGTERM, lambda *_: setattr(scrub, "signalled", True))
    # The identity the agent that started us signed (workers/protocol.py); without it (a
    # scrub started by hand) the agent drops our events, which are best effort anyway.
    identity = os.environ.get(EVENT_IDENTITY_ENV) or f"op:{args.operation_id}:unsigned"
    events = EventSender(args.run_dir, identity, args.task_id)
    log.info("scrub_started", pid=os.getpid())
    ended = _run(scrub, log)
    if ended is None:
        events.close()
        return 4
    state, result, error, progress = ended
    code = 0
    try:
        operations.finish(ddb, args.operation_id, state, result=result, error=error,
                          progress=progress)
    except errors.AgentError as exc:  # storage gone: the row stays STARTED, reads UNKNOWN
        log.error("cannot_record_end", error=exc.message)
        code = 5
    log.info("scrub_ended", state=state, mismatches=len((result or {}).get("mismatches", [])))
    events.send({"domainID": ddb.domain_id, "operationID": args.operation_id, "type": "scrub",
                 "state": state, "progress": progress if progress is not None
                 else round(scrub.progress(), 2), "host_id": args.host_id,
                 "result": result, "error": error}, patience=FINAL_EVENT_PATIENCE)
    events.close()
    ddb.close()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
