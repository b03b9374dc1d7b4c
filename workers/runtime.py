"""What a worker process runs: adopt the supervisor as parent, run one operation, report.

Talks to the supervisor over a DEALER socket on ipc in the run dir, identity = its spawn
token; the messages, identities and exit codes are workers/protocol.py's. The worker waits
for the ack before it exits, so the supervisor never mistakes a finished worker for a dead
one because the exit was reaped before the result was read.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
import traceback

import zmq

from agent import errors, logs, system
from agent.storage import leases, qemu_nbd
from workers import (
    protocol,
    testseams,  # here, so the fork server has it loaded for every worker
)

PROGRESS_INTERVAL = 0.1  # at most ~10 progress reports a second


class Context:
    """What an operation sees of the world: its params' context, reporting and stopping."""

    def __init__(self, sock: zmq.Socket, request: dict):
        self.sock = sock
        self.task_id: str = request["task_id"]
        self.host_id: str = request["host_id"]
        self.run_dir: str = request["run_dir"]
        self.settings: dict = request.get("settings", {})
        self.heartbeat = float(self.settings.get("heartbeat_seconds", 1.0))
        self._stop = False
        self.stop_reason = "abort"
        self._last_sent = 0.0
        self._last_progress = 0.0

    def send(self, msg: dict) -> None:
        self.sock.send(json.dumps(msg, separators=(",", ":")).encode())
        self._last_sent = time.monotonic()

    def beat(self) -> None:
        """Cheap to call often: sends a heartbeat only when one is due."""
        if time.monotonic() - self._last_sent >= self.heartbeat / 2:
            self.send({"t": "beat"})

    def progress(self, percent: float, **extra) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL or percent >= 100:
            self._last_progress = now
            self.send({"t": "progress", "progress": round(min(max(percent, 0.0), 100.0), 2),
                       **extra})
        else:
            self.beat()

    def returned(self, result) -> None:
        """Answer the JSON-RPC request now; the task goes on running."""
        self.send({"t": "return", "result": result})

    def event(self, topic: str, params: dict) -> None:
        self.send({"t": "event", "topic": topic, "params": params})

    def stop_requested(self) -> bool:
        """Asked to stop: an abort (or SIGTERM), or a planned stop (`stop_reason` "stop")."""
        if not self._stop:
            while self.sock.poll(0):
                message = self.sock.recv()
                if message in (protocol.ABORT, protocol.STOP):
                    self._stop = True
                    self.stop_reason = "stop" if message == protocol.STOP else "abort"
        return self._stop

    def check(self) -> None:
        """Heartbeat, and raise Stopped if asked to stop."""
        self.beat()
        if self.stop_requested():
            raise protocol.Stopped()

    def pause(self, seconds: float) -> None:
        """Sleep, heartbeating; return early (without raising) when asked to stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.stop_requested():
            self.beat()
            self.sock.poll(int(min(left, self.heartbeat / 2) * 1000) + 1)

    def wait(self, seconds: float) -> None:
        """Sleep, heartbeating and raising Stopped when asked to stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check()
            if self.sock.poll(int(min(left, self.heartbeat / 2) * 1000) + 1):
                self.check()


def _adopt(supervisor_pid: int, intermediate: int | None = None) -> None:
    """Wait to be adopted by the supervisor (a subreaper), then die when it dies."""
    deadline = time.monotonic() + 5
    while (ppid := os.getppid()) != supervisor_pid:
        # Adopted by someone else (the supervisor is gone), or never: give up.
        elsewhere = intermediate is not None and ppid != intermediate
        if elsewhere or time.monotonic() > deadline:
            os._exit(protocol.EXIT_NOT_ADOPTED)
        time.sleep(0.0002)
    system.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != supervisor_pid:  # it died between our check and prctl
        os._exit(protocol.EXIT_NOT_ADOPTED)


def prepare(supervisor_pid: int, intermediate: int | None = None):
    """What a worker does before it knows its request: its ZeroMQ socket (the context's
    threads start meanwhile), then the adoption (the intermediate exits meanwhile)."""
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    _adopt(supervisor_pid, intermediate)
    return zctx, sock


def spare(fd: int, supervisor_pid: int, intermediate: int | None = None) -> None:
    """A worker forked ahead of its request: prepare, then wait for the request on `fd`
    (one JSON line from the fork server). End-of-file: the fork server is gone; exit."""
    try:
        prepared = prepare(supervisor_pid, intermediate)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 65536)
            if not chunk:
                os._exit(0)
            data += chunk
        os.close(fd)
        request = json.loads(data)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(protocol.EXIT_RUNTIME_FAILED)
    main(request, supervisor_pid, prepared)


def main(request: dict, supervisor_pid: int, prepared=None,
         intermediate: int | None = None) -> None:
    code = 0
    try:
        zctx, sock = prepared or prepare(supervisor_pid, intermediate)
        from workers import ops

        logs.bind(**request.get("about", {}), op=request["op"])
        log = logs.get(component="worker")
        op = ops.get(request["op"])
        if testseams.install_from_env(request["op"]):
            log.warning("test_faults_enabled", faults=os.environ[testseams.ENV])
        sock.setsockopt(zmq.IDENTITY, request["token"].encode())
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(protocol.endpoint(request["run_dir"]))
        ctx = Context(sock, request)
        leases.configure(ctx.settings.get("leases"), heartbeat=ctx.beat)
        qemu_nbd.configure(protocol.exports_dir(request["run_dir"]))
        # SIGTERM asks for a stop, like the abort message; the op stops at its next check.
        signal.signal(signal.SIGTERM, lambda *_: setattr(ctx, "_stop", True))
        ctx.send({"t": "hello", "pid": os.getpid()})
        try:
            final = {"t": "result", "result": op(ctx, request["args"])}
        except protocol.Stopped:
            final = {"t": "stopped"}
        except errors.AgentError as exc:
            final = {"t": "error", "error": exc.to_json()}
        except OSError as exc:  # the world refused (EIO, EACCES, ...): not a bug of ours
            log.exception("os_error")
            final = {"t": "error", "error": errors.from_os_error(exc, request["op"]).to_json()}
        except sqlite3.Error as exc:  # a domain's metadata we cannot use: not a bug of ours
            log.exception("metadata_error")
            err = errors.OperationFailed(f"{request['op']}: metadata: {exc}",
                                         sqlite=type(exc).__name__)
            final = {"t": "error", "error": err.to_json()}
        except Exception as exc:  # a bug: log it here, never send a traceback to a client
            log.exception("worker_crashed")
            err = errors.InternalError(f"{type(exc).__name__} in {request['op']}")
            final = {"t": "error", "error": err.to_json()}
        ctx.send(final)
        # Acked: all we sent has arrived, so close and term have nothing to flush and the
        # context's threads end with the process (os._exit below). Else linger a last time.
        if not sock.poll(protocol.ACK_TIMEOUT_MS):
            code = protocol.EXIT_NO_ACK
            sock.close()
            zctx.term()
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        code = protocol.EXIT_RUNTIME_FAILED
    finally:
        sys.stderr.flush()
        os._exit(code)
