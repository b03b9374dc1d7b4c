"""The supervisor: one loop that owns everything.

`run_once` is the loop's phases: poll the sockets; read (requests are dispatched as they
come: admitted, answered inline or handed to a worker, aborted; workers' reports are
queued); reap children and enforce deadlines (their consequences queued too); transition
(each queued report moves its task: start, return, end); publish (the turn's events go
out); housekeep (the bounds). `run` repeats it. Signal handlers only wake the loop
(set_wakeup_fd); they do nothing else. There is no stop path: SIGTERM and SIGKILL leave the
same state behind, and start-up (`start`) is the only recovery there is.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import signal
import uuid

import zmq

from agent import api, errors, logs
from agent.supervisor import outcomes, sdnotify, startup, states
from agent.supervisor.backlog import Backlog
from agent.supervisor.copies import CopyMeter
from agent.supervisor.domains import Domains
from agent.supervisor.jobs import WorkerJob
from agent.supervisor.lockspaces import Lockspaces
from agent.supervisor.reports import Reports
from agent.supervisor.tasks import Full, IdInUse, TaskTable
from agent.supervisor.workertable import WorkerTable
from agent.system import System, set_child_subreaper
from agent.wire import intake, jsonrpc, peers, replies, security
from agent.wire.events import Publisher, fits
from agent.wire.verbs import Verb

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
STALL_GRACE = 1.0  # a loop turn this much later than its poll timeout: we were stopped
RPC_DRAIN = 256  # messages read from one RPC socket per turn, so no client starves the rest
EVENT_RESULT_BYTES = 4096  # a Task.state event carries its task's result up to this size


StartupError = startup.StartupError


class Supervisor:
    def __init__(self, config, system: System | None = None):
        self.config = config
        self.system = system or System()
        self.log = logs.get(component="supervisor", host_id=config.host_id)
        self.boot_id = uuid.uuid4().hex
        self.kernel_boot_id = startup.read_text("/proc/sys/kernel/random/boot_id")
        self.started_at = self.system.monotonic()
        self.started_wall = self.system.wall()
        self.ready_wall: float | None = None  # when start-up ended (Host.getStats)
        self.verbs = api.load_all()
        tcfg, rcfg = config["tasks"], config["rpc"]
        self.tasks = TaskTable(retain_seconds=tcfg["retain_seconds"], retain_max=tcfg["retain_max"],
                               max_active=rcfg["max_active_tasks"], wall=self.system.wall)
        self.workers = WorkerTable(config, self.system, Reports(self))
        self.domains = Domains(config)
        self._timers: list = []  # heap of (due, seq, fn): backoffs of retried copies
        self._timer_seq = itertools.count()
        self.recovering = True
        self.startup_jobs: set[str] = set()  # task IDs start-up waits for before it is ready
        self.backlog = Backlog(config["recovery"]["max_running"])
        self.lockspaces = Lockspaces(config)
        self.copies = CopyMeter(self.system.monotonic)  # copies' rates (Host.getStats, metrics)
        self.metrics = None  # agent/supervisor/metrics.py, when [metrics] endpoint is set
        self.metrics_url: str | None = None
        self._starting_backlog = False
        self._notification_seq = 0
        self._watchdog = sdnotify.Watchdog(self.system.monotonic)
        self._last_turn = self.system.monotonic()
        self._woken = False  # this turn's poll found the signal pipe readable (a SIGCHLD)
        self._next_reap = 0.0
        self.callback_errors = 0  # bugs the loop survived (each logged with its traceback)
        self._transitions: collections.deque = collections.deque()  # (fn, worker, args)
        self._outbox: list[tuple[str, dict]] = []  # this turn's events

    # -- start-up is recovery ----------------------------------------------------------

    def start(self) -> None:
        run_dir = self.config.run_dir
        self._lock_fd = startup.claim_run_dir(run_dir)
        self.gate = peers.Gate(self.log, peers.raise_limit(self.log), self.system.monotonic)
        rcfg = self.config["rpc"]
        self.ledger = replies.Ledger(rcfg["max_unread_reply_bytes"])
        self.dropped_messages = 0  # RPC messages of too many or too large routing frames
        # Events first: subscribers that connect early get the most time to join before
        # Host.booted. (Creating a context is safe here: we never fork, we posix_spawn.)
        self.ctx = zmq.Context()
        sec = self.config["security"]
        # The ZAP handler is bound before any socket that needs it (agent/wire/security.py).
        self.guard = security.Guard(self.ctx, sec["server_secret_key"],
                                    sec["authorized_keys_dir"]) if sec["server_secret_key"] \
            else None
        ecfg = self.config["events"]
        self.events = Publisher(self.ctx, ecfg["endpoints"], self.boot_id, guard=self.guard,
                                hwm=ecfg["max_queued"], max_bytes=ecfg["max_event_bytes"])
        startup.kill_leftover_workers(run_dir, self.log)
        startup.sweep_exports(run_dir, self.log)  # what killed workers left: theirs only
        set_child_subreaper()
        # Signals only wake the loop; SIGTERM and SIGINT keep their default: dying is stopping.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        self.workers.start_forkserver()
        self.rpc, rpc_endpoints = startup.rpc_socket(self.ctx, rcfg, self.guard)
        self.workers.bind(self.ctx)
        self.gate.watch(self.rpc, rpc_endpoints)
        self.gate.watch(self.events.sock, self.events.endpoints)
        self.gate.watch(self.workers.sock, [self.workers.endpoint])
        self.poller = zmq.Poller()
        for item in (self.rpc, self.workers.sock, self._wake_r, *self.gate.monitors,
                     *([self.guard.zap] if self.guard else [])):
            self.poller.register(item, zmq.POLLIN)
        self.gate.settle()
        self._control = self._control_fd = None
        self._watch_control()
        if self.config["metrics"]["endpoint"]:  # prometheus_client only if it is wanted
            from agent.supervisor import metrics
            self.metrics = metrics.Metrics()
            self.metrics_url = self.metrics.start(self)
        startup.write_endpoints(run_dir, {
            "pid": os.getpid(), "boot_id": self.boot_id, "rpc": rpc_endpoints,
            "events": self.events.endpoints, "metrics": self.metrics_url})
        self.log.info("listening", rpc=rpc_endpoints, events=self.events.endpoints,
                      metrics=self.metrics_url, boot_id=self.boot_id)
        if os.environ.get("HOSTAGENT_TEST_FAULTS"):
            self.log.warning("test_faults_enabled", faults=os.environ["HOSTAGENT_TEST_FAULTS"])
        startup.begin(self)  # storage recovery: re-issue leftover work found on disk
        self._last_turn = self.system.monotonic()
        self._maybe_ready()
        self._transition()
        self.flush()

    def _maybe_ready(self) -> None:
        if self.recovering and not self.startup_jobs:
            self.recovering = False
            self.ready_wall = self.system.wall()
            sdnotify.notify("READY=1", f"STATUS=serving, boot {self.boot_id}")
            self.publish("Host.booted", {"host_id": self.config.host_id,
                                                "pid": os.getpid()})
            self.log.info("ready", seconds=round(self.system.monotonic() - self.started_at, 3),
                          waiting=self.backlog.waiting())
            self._start_backlog()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.start()
        while True:
            self.run_once(1.0)

    def call_later(self, delay: float, fn) -> None:
        heapq.heappush(self._timers, (self.system.monotonic() + delay, next(self._timer_seq), fn))

    def _run_timers(self) -> float | None:
        now = self.system.monotonic()
        while self._timers and self._timers[0][0] <= now:
            self.guarded("timer", heapq.heappop(self._timers)[2])
        return self._timers[0][0] - now if self._timers else None

    def run_once(self, timeout: float) -> None:
        """One turn of the loop, in its phases (see the module's docstring): poll, read,
        reap, transition, publish, housekeep."""
        ready = self._poll(timeout)
        self._read(ready)
        self._reap()
        self._transition()
        self.flush()
        self._housekeep()
        self._last_turn = self.system.monotonic()

    def _poll(self, timeout: float) -> dict:
        for due in (self.workers.next_deadline(), self._run_timers()):
            if due is not None:
                timeout = min(timeout, due)
        timeout = self._watchdog.wait_at_most(timeout)
        ready = dict(self.poller.poll(int(timeout * 1000)))
        now = self.system.monotonic()
        if now - self._last_turn > timeout + STALL_GRACE:
            self.log.warning("supervisor_stalled", seconds=round(now - self._last_turn, 3))
            self.workers.forgive_stall()
        self._woken = self._wake_r in ready
        if self._woken:
            while True:
                try:
                    if not os.read(self._wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        return ready

    def _read(self, ready: dict) -> None:
        if self.guard and self.guard.zap in ready:
            self.guarded("zap", self.guard.answer)
        if self.workers.sock in ready:
            self._drain(self.workers.sock, self.workers.on_message, 4096)
        if self._control_fd in ready:
            self.guarded("forkserver", self.workers.on_control_readable)
        if self.rpc in ready:
            intake.drain(self, RPC_DRAIN)
        for mon in self.gate.monitors:
            if mon in ready:
                self.guarded("monitor", self.gate.on_monitor, mon)

    def _reap(self) -> None:
        # A child's end is a SIGCHLD, which wakes the loop (waitpid every turn was a system
        # call a request); once a second too: a wake-up missed delays a reap, never loses it.
        now = self.system.monotonic()
        if self._woken or now >= self._next_reap:
            self._next_reap = now + 1.0
            self.guarded("reap", self.workers.reap)
        # Only after every pending message was read: a supervisor that was itself stopped
        # (SIGSTOP) never mistakes queued heartbeats for silence.
        self.guarded("deadlines", self.workers.enforce_deadlines)

    def later(self, fn, w, *args) -> None:
        """A worker's report, applied in the transition phase (in the order they came)."""
        self._transitions.append((fn, w, args))

    def _transition(self) -> None:
        while self._transitions:  # (every turn: nothing to do is one test)
            fn, w, args = self._transitions.popleft()
            if not self.guarded("transition", fn, w, *args):
                self.workers.broke(w, "its report could not be handled")

    def _bounds(self) -> None:
        self.gate.tick()
        self.ledger.sweep()

    def publish(self, topic: str, params: dict) -> None:
        """An event, sent in this turn's publish phase (in the order published)."""
        self._outbox.append((topic, params))

    def flush(self) -> None:
        """The publish phase: this turn's events go out (bounded: a turn reads at most
        RPC_DRAIN requests and 4,096 worker messages)."""
        outbox, self._outbox = self._outbox, []
        for topic, params in outbox:
            self.events.publish(topic, params)

    def _housekeep(self) -> None:
        if self.gate.paused or self.ledger.queued:  # most turns: nothing to look after
            self.guarded("bounds", self._bounds)
        self._watch_control()
        self._watchdog.kick()
        self.lockspaces.tick(self)  # (every 2 s: the sanlock daemon still the same one?)
        if self.metrics is not None:
            self.metrics.tick(self)

    def _watch_control(self) -> None:
        """Poll the fork server's control socket, a new one after a fork server restart."""
        # pyzmq reports a plain socket by its fd number, so that is what we register.
        if self._control is not self.workers.control:
            if self._control_fd is not None:
                self.poller.unregister(self._control_fd)
            self._control = self.workers.control
            self._control_fd = self._control.fileno()
            self.poller.register(self._control_fd, zmq.POLLIN)

    def _drain(self, sock, handle, limit: int) -> None:
        for i in range(limit):
            # As agent/wire/intake.py's drain: is there a second, then read to the end.
            if i == 1 and not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.guarded("message", handle, frames)

    def guarded(self, where: str, fn, *args) -> bool:
        """Run one callback of the loop (a message, a timer, a reaped child). A bug in it is
        logged and counted, and costs only what it was serving: the loop, and every other
        task, goes on. False if it raised."""
        try:
            fn(*args)
            return True
        except Exception:
            self.callback_errors += 1
            self.log.exception("callback_crashed", where=where)
            return False

    # -- requests (read and dispatched by agent/wire/intake.py) --------------------------------

    def serves(self, verb: Verb) -> bool:
        return not verb.debug_only or self.config["debug"]

    def admit(self, task_id: str, method: str, limited: bool):
        """A new task, or the agent error that says why not (nothing touched)."""
        try:
            return self.tasks.admit(task_id, method, limited=limited)
        except IdInUse:
            raise errors.TaskIdInUse(f"task {task_id!r} is active", taskID=task_id) from None
        except Full as full:
            raise errors.ResourceExhausted(f"{full.args[0]} tasks are active",
                                           limit=full.args[0]) from None

    def notification_id(self) -> str:
        """A task ID of our naming, for a notification's work."""
        self._notification_seq += 1
        return f"notification:{self.boot_id[:8]}:{self._notification_seq}"

    def run_task(self, task, handler, params) -> None:
        """Run a verb's handler for `task`: inline to the end, or hand it to a worker."""
        try:
            outcome = handler(self, params)
            if isinstance(outcome, WorkerJob):
                task.job = outcome
                if self.lockspaces.park(task, outcome):  # its domain is still joining
                    self.publish_state(task)
                    return
                if not self.gate.spare_for_worker():
                    raise errors.ResourceExhausted(
                        "file descriptors are short: no worker can start now",
                        reason="descriptors", limit=self.gate.limit)
                task.worker = self.workers.spawn(task, outcome.op, outcome.args, outcome.deadline)
                if self.metrics is not None:
                    self.metrics.count.workers_started.inc()
                self.log.info("task_started", **task.about(), op=outcome.op)
                self.publish_state(task)
                return
        except errors.AgentError as exc:
            self.end(task, "fail", error=exc)
            return
        except Exception:
            self.log.exception("handler_crashed", **task.about())
            self.end(task, "fail", error=errors.InternalError("internal error"))
            return
        task.started = task.created
        self.end(task, "succeed", result=outcome)
        # A query's answer went out with its response (and its Task.state event); keeping
        # it too would let 10,000 retained records of Host.getCapabilities hold ~50 MB.
        task.result = None

    def submit(self, task_id: str, method: str, job: WorkerJob, *, startup: bool = False,
               queued: bool = True):
        """A task of the agent's own (recovery, retries): no client waits on it. `queued`
        ones wait in the backlog (agent/supervisor/backlog.py) until READY and a free slot;
        `startup` ones run at once and READY waits for them."""
        task = self.admit(task_id, method, limited=False)
        if startup:
            self.startup_jobs.add(task_id)
        if queued:
            self.backlog.add(task, job)
            self._start_backlog()
        else:
            self.run_task(task, lambda *_: job, None)
        return task

    def _start_backlog(self) -> None:
        if self.recovering or self._starting_backlog or not self.backlog.waiting():
            return  # not before READY; and a task ending while we start one changes nothing
        self._starting_backlog = True
        try:
            while batch := self.backlog.take():
                for task, job in batch:
                    self.run_task(task, lambda *_, job=job: job, None)
        finally:
            self._starting_backlog = False

    # -- what happens to tasks ---------------------------------------------------------

    def respond(self, task, result=None, error: errors.AgentError | None = None,
                reply=None) -> None:
        if task.returned:
            return
        task.returned = True
        reply = reply or task.reply
        if reply is not None:
            reply(jsonrpc.error_response(task.request_id, error) if error
                  else jsonrpc.result_response(task.request_id, result))

    def end(self, task, event: str, result=None, error: errors.AgentError | None = None) -> None:
        if not task.active:
            return
        if event == "fail":
            error = outcomes.final(task.state, error)
        # The hook runs before the answer: what it makes durable (an attachment written to
        # the run dir) must be on disk before a client is told, or a SIGKILL between the
        # two leaves a client told "attached" and an agent that forgets it. It is told the
        # state the task is about to take; if it fails, so does the task.
        hook = task.job.on_end if task.job is not None else None
        if hook:
            failure = None
            try:
                ok = event == "succeed"
                hook(self, task, states.next_state(task.state, event),
                     result if ok else None, None if ok else error)
            except errors.AgentError as exc:
                failure = exc
            except Exception:
                self.callback_errors += 1
                self.log.exception("end_hook_crashed", **task.about())
                failure = errors.InternalError("internal error")
            if failure is not None and event == "succeed":  # a failure keeps its own error
                event, result, error = "fail", None, outcomes.final(task.state, failure)
        task.result = result if event == "succeed" else task.result
        task.error = error.to_json() if error else None
        if error is not None and error.data.get("lockspace") == "lost":  # a worker found none
            self.lockspaces.lost(self, error.data.get("domainID"), error.message)
        reply = task.reply  # the transition drops it: an ended task holds no socket route
        self.tasks.transition(task, event)
        # Answered first: a query's round trip is what the loop does before its answer.
        self.respond(task, result, error, reply=reply)
        self.copies.forget(task.id)
        if self.metrics is not None:
            self.metrics.task_ended(task)
        self.publish_state(task)
        if task.job is not None or task.error is not None:  # a query that answered is no news
            self.log.info("task_ended", **task.about(), state=task.state,
                          error=task.error and task.error["data"]["name"])
        if task.id in self.startup_jobs:
            self.startup_jobs.discard(task.id)
            self._maybe_ready()
        self._start_backlog()  # a slot may be free now

    def abort(self, task) -> None:
        self.tasks.transition(task, "abort")
        self.publish_state(task)
        if task.worker is not None:
            self.workers.terminate(task.worker, "abort")
        elif self.backlog.discard(task) or self.lockspaces.discard(task):  # never started
            self.end(task, "fail")

    def publish_state(self, task) -> None:
        record = task.record()
        # A query's answer went to its caller; a worker's result rides along when it is
        # small. Either way an event stays small (a subscriber that never reads holds up to
        # [events] max_queued of them).
        if record["result"] is not None and (task.job is None or not fits(
                record["result"], EVENT_RESULT_BYTES)):
            record["result"], record["result_omitted"] = None, True
        self.publish("Task.state", {"task": record})
