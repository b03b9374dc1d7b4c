"""What a worker's reports do to its task: the worker table's listener.

The table (agent/supervisor/workertable.py) decides nothing about tasks; it tells this listener
what happened to a worker, and this moves the task (agent/supervisor/outcomes.py decides what
one that did not succeed ends with) and publishes what subscribers should hear.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent import errors
from agent.supervisor import outcomes, states

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

PROGRESS_EVENT_INTERVAL = 0.1
# What a worker (or an operation's process, agent/supervisor/workertable.py) may ask us to publish.
WORKER_EVENT_TOPICS = frozenset({"Image.copy", "Image.merge", "Operation.state",
                                 "Export.state"})


class Reports:
    """Each report is queued as it is read (agent.later) and applied in the loop's
    transition phase, in the order they came; a bug while applying one costs that worker."""

    def __init__(self, agent: Supervisor):
        self.agent = agent

    # What the worker table calls, as it reads: each queues its report.
    def worker_started(self, w):
        self.agent.later(self._started, w)

    def worker_progress(self, w, progress):
        self.agent.later(self._progress, w, progress)

    def worker_returned(self, w, result):
        self.agent.later(self._returned, w, result)

    def worker_event(self, w, topic, params):
        self.agent.later(self._event, w, topic, params)

    def worker_succeeded(self, w, result):
        self.agent.later(self._succeeded, w, result)

    def worker_failed(self, w, error):
        self.agent.later(self._failed, w, error)

    def worker_stopped(self, w):
        self.agent.later(self._stopped, w)

    def worker_gone(self, w, error):
        self.agent.later(self._gone, w, error)

    # What each does to its task, in the transition phase.

    def _started(self, w) -> None:
        if w.task.state == states.PENDING:
            self.agent.tasks.transition(w.task, "start")
            self.agent.publish_state(w.task)

    def _progress(self, w, progress) -> None:
        task = w.task
        if not isinstance(progress, (int, float)) or not math.isfinite(progress) \
                or not task.active:
            return  # a worker's NaN must never reach a record a client will read
        task.progress = progress
        now = self.agent.system.monotonic()
        if now - task.last_progress_event >= PROGRESS_EVENT_INTERVAL or progress >= 100:
            task.last_progress_event = now
            self.agent.publish("Task.progress",
                                      {"taskID": task.id, "progress": progress})

    def _returned(self, w, result) -> None:
        w.task.result = result
        self.agent.respond(w.task, result)

    def _event(self, w, topic, params) -> None:
        if topic in WORKER_EVENT_TOPICS and isinstance(params, dict):
            self.agent.publish(topic, {**params, "taskID": w.task.id})
            if topic in ("Image.copy", "Image.merge") \
                    and self.agent.tasks.active.get(w.task.id) is w.task:
                copied = self.agent.copies.report(w.task.id, params)
                if copied and self.agent.metrics is not None:
                    self.agent.metrics.count.copy_bytes.inc(copied)

    def _succeeded(self, w, result) -> None:
        if w.task.progress is not None:
            w.task.progress = 100.0
        self.agent.end(w.task, "succeed", result=result)

    def _failed(self, w, error: errors.AgentError) -> None:
        if outcomes.defers(w.task.state):
            w.stop_error = error
        else:
            self.agent.end(w.task, "fail", error=error)

    def _stopped(self, w) -> None:
        """It stopped when asked; the task ends when the process is gone (worker_gone)."""
        w.stop_error = w.stop_error or outcomes.stopped(w.kill_reason)

    def _gone(self, w, error: errors.AgentError) -> None:
        """The worker's process has been reaped (or never existed)."""
        # Killed: by us, for a reason (abort, timeout, protocol), or by someone else's
        # signal (the OOM killer, sanlock, an operator).
        reason = w.kill_reason or ("signal" if "signal" in (w.exit or {}) else None)
        if reason and self.agent.metrics is not None:
            self.agent.metrics.count.workers_killed.labels(reason).inc()
        if not w.task.active:
            return  # it reported its outcome, and that ended the task already
        error = w.stop_error or error
        self.agent.log.warning("worker_gone", **w.task.about(), worker_pid=w.pid,
                               error=error.message)
        self.agent.end(w.task, "fail", error=error)
