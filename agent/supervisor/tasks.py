"""The task table: transient, in memory only, keyed by the caller's ID.

A task's ID is the JSON-RPC id. While a task is active its ID is refused to anyone else
(TaskIdInUse); once it has ended the ID is free at once, and its record stays readable
until the ID is reused, `retain_seconds` pass, or `retain_max` newer records push it out.
A restart forgets everything here, by design: what must survive lives on storage.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.supervisor import states


class IdInUse(Exception):
    """A task with this ID is active."""


class Full(Exception):
    """max_active limited tasks are active."""


@dataclass(eq=False)
class Task:
    id: str
    method: str
    state: str = states.PENDING
    progress: float | None = None
    returned: bool = False
    result: Any = None
    error: dict | None = None
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    # Runtime only, never part of the record.
    limited: bool = False  # counts against max_active_tasks
    reply: Callable[[dict | None], None] | None = field(default=None, repr=False)
    request_id: Any = None
    worker: Any = field(default=None, repr=False)
    job: Any = field(default=None, repr=False)  # the WorkerJob it runs, if any
    last_progress_event: float = 0.0

    def record(self) -> dict:
        return {
            "id": self.id,
            "method": self.method,
            "state": self.state,
            "progress": self.progress,
            "returned": self.returned,
            "result": self.result,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
        }

    @property
    def active(self) -> bool:
        return self.state in states.ACTIVE

    def about(self) -> dict:
        """What every log line about this task carries: its ID and method, and the volume
        its job writes (a copy's destination, a create's or delete's volume)."""
        fields = {"task_id": self.id, "method": self.method}
        args = self.job.args if self.job is not None else {}
        dst = args.get("dst") if isinstance(args.get("dst"), dict) else {}
        volume_id = dst.get("volumeID") or args.get("volumeID")
        if volume_id:
            fields["volume_id"] = volume_id
        return fields


class TaskTable:
    def __init__(self, *, retain_seconds: float, retain_max: int, max_active: int,
                 wall: Callable[[], float] = time.time):
        self.retain_seconds = retain_seconds
        self.retain_max = retain_max
        self.max_active = max_active
        self.wall = wall
        self.active: dict[str, Task] = {}
        self.limited_active = 0
        # Tasks per state, kept as they move: Host.getStats answers without a walk over
        # 10,000 retained records (docs/performance.md, "queries").
        self._counts = dict.fromkeys(states.STATES, 0)
        # Ended tasks in the order they ended, so the oldest is always first.
        self.finished: OrderedDict[str, Task] = OrderedDict()

    def admit(self, task_id: str, method: str, *, limited: bool) -> Task:
        """A new task under `task_id`, or IdInUse / Full (nothing touched)."""
        if task_id in self.active:
            raise IdInUse(task_id)
        if limited and self.limited_active >= self.max_active:
            raise Full(self.max_active)
        old = self.finished.pop(task_id, None)  # reusing an ended ID replaces its record
        if old is not None:
            self._counts[old.state] -= 1
        task = Task(id=task_id, method=method, created=self.wall(), limited=limited)
        self._counts[task.state] += 1
        self.active[task_id] = task
        self.limited_active += limited
        return task

    def transition(self, task: Task, event: str) -> str:
        """Move `task` along one edge of states.TRANSITIONS; returns the old state."""
        old = task.state
        task.state = states.next_state(old, event)
        self._counts[old] -= 1
        self._counts[task.state] += 1
        now = self.wall()
        if task.state == states.RUNNING and task.started is None:
            task.started = now
        if task.state in states.ENDED:
            task.ended = now
            del self.active[task.id]
            self.limited_active -= task.limited
            task.reply = task.worker = None
            self.finished[task.id] = task
            self.prune()
        return old

    def prune(self) -> None:
        horizon = self.wall() - self.retain_seconds
        while self.finished:
            oldest = next(iter(self.finished.values()))
            if len(self.finished) > self.retain_max or oldest.ended < horizon:
                self.finished.popitem(last=False)
                self._counts[oldest.state] -= 1
            else:
                break

    def get(self, task_id: str) -> Task | None:
        self.prune()
        return self.active.get(task_id) or self.finished.get(task_id)

    def all(self, wanted: set[str] | None = None) -> list[Task]:
        self.prune()
        if wanted is not None and not set(wanted) - states.ACTIVE:
            # Only active states (what an engine polls): never a walk over the retained.
            return [t for t in self.active.values() if t.state in wanted]
        tasks = list(self.active.values()) + list(self.finished.values())
        return [t for t in tasks if wanted is None or t.state in wanted]

    def counts(self) -> dict[str, int]:
        self.prune()
        return dict(self._counts)
