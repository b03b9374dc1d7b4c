"""The supervisor's table of workers: who each is, what each says, when each must go.

The table decides nothing about tasks: it tells its listener (the supervisor) what happened to
a worker (started, reported, returned, finished, died) and the listener moves the task. It
reads the workers' messages (workers/protocol.py), enforces their deadlines (silent past its
deadline: SIGTERM, then SIGKILL; reported but not gone within the grace: SIGKILL), and reaps
every child, expected or not. Workers come from the fork server
(agent/supervisor/forkclient.py).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from types import SimpleNamespace

import zmq

from agent import errors, logs
from agent.supervisor.forkclient import ForkClient
from agent.system import describe_status
from workers import protocol


@dataclass(eq=False)
class Worker:
    token: str
    task: object
    op: str
    spawned: float
    last_seen: float
    deadline: float  # silent for longer than this many seconds: killed
    pid: int | None = None
    hello: bool = False
    reported: bool = False  # its final message (result, error, stopped) arrived
    reported_at: float = 0.0  # when: from then on it has nothing to do but exit
    kill_at: float | None = None  # when SIGKILL is due after a SIGTERM
    kill_reason: str | None = None  # "abort" or "timeout"
    exit: dict | None = field(default=None)
    stop_error: object = None  # what to fail the task with once the process is gone


class WorkerTable:
    def __init__(self, config, system, listener):
        self.run_dir = config.run_dir
        self.settings = dict(config["workers"]) | {"copy": dict(config["copy"]),
                                                   "exports": dict(config["exports"]),
                                                   "leases": config.leases}
        self.host_id = config.host_id
        self.system = system
        self.listener = listener
        self.log = logs.get(component="workers")
        self.by_token: dict[str, Worker] = {}
        self.by_pid: dict[int, Worker] = {}
        self.unclaimed: dict[int, tuple] = {}  # pid -> (status, reaped at): whose, unknown
        self.fork = ForkClient(self.run_dir, self.log)
        self._seq = 0
        self.sock: zmq.Socket | None = None
        self.key = protocol.new_key()  # signs operation processes' identities (this life only)
        self.strangers = 0  # messages from identities we never handed out: dropped
        self.misbehaved = 0  # workers stopped for breaking the protocol

    # -- the fork server ---------------------------------------------------------------

    @property
    def forkserver_pid(self) -> int | None:
        return self.fork.pid

    @property
    def control(self):
        return self.fork.control

    def start_forkserver(self) -> None:
        self.fork.start()

    def bind(self, ctx: zmq.Context) -> None:
        from agent.wire import transport

        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = transport.bind_all(self.sock, [protocol.endpoint(self.run_dir)])[0]

    def spawn(self, task, op: str, args: dict, deadline: float | None = None) -> Worker:
        self._seq += 1
        now = self.system.monotonic()
        w = Worker(token=protocol.new_token(self._seq), task=task, op=op, spawned=now,
                   last_seen=now, deadline=deadline or self.settings["deadline_seconds"])
        self.by_token[w.token] = w
        request = {"token": w.token, "op": op, "args": args, "task_id": task.id,
                   "about": task.about(),  # what its log lines carry (logs.bind)
                   "host_id": self.host_id, "run_dir": str(self.run_dir),
                   "settings": self.settings}
        try:
            self.fork.request(request)
        except OSError as exc:
            self.log.error("forkserver_unreachable", error=str(exc))
            self._forget(w)
            raise errors.WorkerDied(f"cannot reach the fork server: {exc}") from None
        return w

    def on_control_readable(self) -> None:
        for reply in self.fork.replies():
            w = self.by_token.get(reply["token"])
            if w is None:
                continue
            if "error" in reply:
                self._forget(w)
                self.listener.worker_failed(w, errors.WorkerDied(reply["error"]))
            else:
                self._claim(w, reply["pid"])

    def _claim(self, w: Worker, pid: int) -> None:
        if w.pid is not None:
            return
        w.pid = pid
        self.by_pid[pid] = w
        if w.kill_reason and w.kill_at is None:  # aborted before its pid was known
            self.terminate(w, w.kill_reason)
        stray = self.unclaimed.pop(pid, None)
        # Only an exit reaped after this worker was asked for can be its own: an older one
        # is another process that had this pid (a scrub we adopted, say) before it was reused.
        if stray is not None and stray[1] >= w.spawned:
            self._ended(w, stray[0])

    # -- messages from workers ---------------------------------------------------------

    def on_message(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if identity.startswith(protocol.OPERATION_PREFIX):
            self._on_operation_message(frames)
            return
        w = self.by_token.get(identity.decode("ascii", errors="replace"))
        if w is None:
            self.strangers += 1  # a forger, or a worker we have forgotten: nothing it says counts
            return
        w.last_seen = self.system.monotonic()
        try:
            if len(frames) != 2:
                raise protocol.ProtocolError(f"{len(frames) - 1} frames")
            self._on_worker_message(w, protocol.decode(frames[1]))
        except protocol.ProtocolError as exc:
            self._misbehaved(w, str(exc))
        except Exception:  # our bug, while serving this worker: it costs the worker only
            self._misbehaved(w, "its message could not be handled")
            raise  # for the loop's guard to log and count

    def _on_worker_message(self, w: Worker, msg: dict) -> None:
        kind = msg["t"]
        if w.reported:
            raise protocol.ProtocolError(f"{kind!r} after its final report")
        if kind == "hello":
            w.hello = True
            self._claim(w, msg["pid"])
            self.listener.worker_started(w)
        elif kind == "progress":
            self.listener.worker_progress(w, msg["progress"])
        elif kind == "return":
            self.listener.worker_returned(w, msg.get("result"))
        elif kind == "event":
            self.listener.worker_event(w, msg["topic"], msg["params"])
        elif kind in protocol.FINAL:
            w.reported, w.reported_at = True, self.system.monotonic()
            self.sock.send_multipart([w.token.encode(), protocol.ACK])
            if kind == "result":
                self.listener.worker_succeeded(w, msg.get("result"))
            elif kind == "error":
                self.listener.worker_failed(w, errors.from_json(msg["error"]))
            else:
                self.listener.worker_stopped(w)

    def broke(self, w, why: str) -> None:
        """A worker whose report our loop could not handle: it goes, its task fails. (An
        operation's process is no worker of ours: nothing to stop.)"""
        if self.by_token.get(getattr(w, "token", None)) is w:
            self._misbehaved(w, why)

    def _misbehaved(self, w: Worker, why: str) -> None:
        """A worker that broke the protocol is stopped; its task fails with why."""
        self.misbehaved += 1
        self.log.error("worker_misbehaved", **w.task.about(), worker_pid=w.pid, why=why)
        if w.stop_error is None:
            w.stop_error = errors.WorkerDied(f"the worker broke the worker protocol: {why}")
        if w.kill_reason is None:
            self.terminate(w, "protocol")

    def _on_operation_message(self, frames: list[bytes]) -> None:
        """An event from an operation's process (workers/scrubber.py), which is no worker of
        ours: published as if from the task that started it, and nothing else is accepted.
        Its identity must carry the mac of this life's key (workers/protocol.py)."""
        if protocol.operation_of(self.key, frames[0]) is None or len(frames) != 2:
            self.strangers += 1
            return
        try:
            msg = protocol.decode_operation_event(frames[1])
        except protocol.ProtocolError as exc:
            self.log.warning("bad_operation_message", why=str(exc))
            return
        sender = SimpleNamespace(task=SimpleNamespace(id=msg.get("task_id")))
        self.listener.worker_event(sender, msg["topic"], msg["params"])

    def operation_identity(self, operation_id: str) -> str:
        return protocol.operation_identity(self.key, operation_id)

    # -- stopping and reaping ----------------------------------------------------------

    def terminate(self, w: Worker, reason: str) -> None:
        """Ask a worker to stop: an abort message and SIGTERM now, SIGKILL after a grace."""
        w.kill_reason = w.kill_reason or reason
        if self.sock is not None:
            self.sock.send_multipart([w.token.encode(), protocol.ABORT])
        if w.pid is None:
            return  # done once its pid is known (_claim)
        self.system.kill(w.pid, signal.SIGTERM)
        # A stopped process cannot act on SIGTERM; SIGCONT lets it, SIGKILL works anyway.
        self.system.kill(w.pid, signal.SIGCONT)
        w.kill_at = self.system.monotonic() + self.settings["kill_grace_seconds"]

    def stop(self, w: Worker) -> None:
        """Ask a worker to end its work as planned (an export's stop): a message, no signal;
        its task ends as the worker reports (done). Its deadline still holds."""
        if self.sock is not None:
            self.sock.send_multipart([w.token.encode(), protocol.STOP])

    def _due(self, w: Worker) -> float | None:
        if w.kill_at is not None:
            return w.kill_at
        if w.reported:  # its task has ended; it must be gone within the grace, say by SIGKILL
            return w.reported_at + self.settings["kill_grace_seconds"]
        return w.last_seen + w.deadline

    def next_deadline(self) -> float | None:
        """Seconds until some worker's deadline, for the loop's poll timeout (kills nothing)."""
        dues = [d for w in self.by_token.values() if (d := self._due(w)) is not None]
        return max(0.0, min(dues) - self.system.monotonic()) if dues else None

    def forgive_stall(self) -> None:
        """The supervisor itself was not running (SIGSTOP, a frozen VM): silence measured
        across that gap is ours, not the workers', so every deadline starts afresh."""
        now = self.system.monotonic()
        for w in self.by_token.values():
            w.last_seen = max(w.last_seen, now)
            if w.reported:
                w.reported_at = max(w.reported_at, now)

    def enforce_deadlines(self) -> None:
        """Kill silent workers and escalate SIGTERM to SIGKILL. Called only after the loop
        has read every pending message, so a supervisor that was itself stopped (SIGSTOP)
        never mistakes queued heartbeats for silence."""
        now = self.system.monotonic()
        for w in list(self.by_token.values()):
            due = self._due(w)
            if due is None or now < due:
                continue
            if w.kill_at is not None or w.reported:
                # After a SIGTERM's grace; or a worker that reported but did not exit (found
                # by the chaos suite: a copy worker SIGSTOPped between its result and its
                # exit lingered for ever, since a reported worker had no deadline).
                self.log.warning("worker_sigkill", **w.task.about(), worker_pid=w.pid,
                                 reported=w.reported)
                if w.reported:  # lingered after its report (metrics count it by this)
                    w.kill_reason = w.kill_reason or "linger"
                if w.pid is not None:
                    self.system.kill(w.pid, signal.SIGKILL)
                w.kill_at = now + 3600  # once; the reaper takes it from here
                continue
            self.log.warning("worker_silent", **w.task.about(), worker_pid=w.pid,
                             silent_seconds=round(now - w.last_seen, 3))
            self.terminate(w, "timeout")
            if w.pid is None:  # never even forked: nothing to wait for
                self._forget(w)
                self.listener.worker_gone(w, errors.WorkerTimeout("the worker never started"))

    def reap(self) -> None:
        for pid, status in self.system.reap():
            if pid == self.forkserver_pid:
                self._forkserver_died(status)
                continue
            w = self.by_pid.get(pid)
            if w is None:
                self.unclaimed[pid] = (status, self.system.monotonic())
                if len(self.unclaimed) > 1024:  # strays from an earlier life; keep it bounded
                    self.unclaimed.pop(next(iter(self.unclaimed)))
                continue
            self._ended(w, status)

    def _ended(self, w: Worker, status: int) -> None:
        w.exit = describe_status(status)
        self._forget(w)
        code = w.exit.get("exit_code")
        how = (f"killed by {w.exit['signal']}" if "signal" in w.exit
               else f"exited with code {code}" + (f" ({protocol.EXIT_MEANINGS[code]})"
                                                   if code in protocol.EXIT_MEANINGS else ""))
        if w.kill_reason == "timeout":
            err = errors.WorkerTimeout(f"worker silent past its deadline, {how}", **w.exit)
        else:
            err = errors.WorkerDied(f"worker {how}", **w.exit)
        self.listener.worker_gone(w, err)

    def _forkserver_died(self, status: int) -> None:
        self.log.error("forkserver_died", **describe_status(status))
        self.fork.died()
        for w in [w for w in self.by_token.values() if w.pid is None]:
            self._forget(w)
            self.listener.worker_gone(w, errors.WorkerDied("the fork server died"))
        self.start_forkserver()

    def _forget(self, w: Worker) -> None:
        self.by_token.pop(w.token, None)
        if w.pid is not None:
            self.by_pid.pop(w.pid, None)

    def running(self) -> int:
        return len(self.by_token)
