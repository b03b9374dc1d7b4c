"""Waiting for work that may outlive its task: events first, polling when they fail.

This is the recommended way to track what an agent does (AsyncClient.wait_task):

1. Subscribe to events before starting the work, so nothing published after is missed.
2. Follow `Task.state` (the end), `Task.progress` and `Image.copy` (how far) for the task.
3. Whenever the events are silent for a poll interval, lost (a seq gap) or from a new life
   of the agent (a new boot_id), re-read the truth: `Task.getStatus`.
4. Tasks are transient: after a restart the agent answers 101 NoSuchTask. A copy persists
   through its destination (a merge through its base, followed the same way), so from then on (or once the copy's task failed after it owned
   the destination: the agent retries it by policy) the destination is followed on storage
   with `Image.getStatus`, which any host attached to the domain answers:
   - LEGAL, no marker: the copy is done;
   - a marker whose lease is live: someone copies it (a retry, the restarted agent's
     recovery, another host): keep following;
   - a marker that is abandoned, or whose lease stays free for `settle` seconds while no
     task of this agent works on it: it needs continuing (Image.copy again, or
     `continue_copy`), or deleting. The agent decides nothing for the engine here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from agent.client.protocol import (
    CallError,
    NeedsContinuing,
    TaskFailed,
    TaskLost,
    Timeout,
)

ACTIVE = ("pending", "running", "aborting")
OUTCOMES = ("done", "failed", "aborted", "needs_continuing", "lost")


@dataclass
class Progress:
    """How far a task is: percent (0-100) and, for a copy, bytes copied of total."""

    percent: float | None
    copied: int | None = None
    total: int | None = None
    source: str = "event"  # event, poll (Task.getStatus) or storage (Image.getStatus)


@dataclass
class Outcome:
    task_id: Any
    state: str  # one of OUTCOMES
    result: Any = None  # the task's result; for a copy followed on storage, its final status
    error: dict | None = None  # the task's error object (failed, aborted)
    task: dict | None = None  # the last task record seen
    image: dict | None = None  # the last Image.getStatus seen (copies)
    dst: dict | None = None
    restarted: bool = False  # the agent restarted while we waited
    via: str = "task"  # how the end was known: from the task, or from storage

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def raise_for_state(self) -> "Outcome":
        """Self if done; else TaskFailed (failed, aborted), NeedsContinuing, or TaskLost."""
        if self.state == "done":
            return self
        if self.state in ("failed", "aborted"):
            raise TaskFailed(self)
        if self.state == "needs_continuing":
            raise NeedsContinuing(self)
        raise TaskLost(self)


def _work(status: dict) -> dict | None:
    """The copy into the volume, or the merge into it (a base followed on storage)."""
    return status.get("copy") or status.get("merge")


def copy_verdict(status: dict) -> str:
    """What an Image.getStatus answer says of a copy (or a merge, followed on its base):
    done, abandoned, copying (its lease is live) or idle (recorded, nobody holds it:
    retried soon, or needing a continuation)."""
    copy = _work(status)
    if copy is None:
        return "done" if status.get("legality") == "LEGAL" else "idle"
    if copy.get("state") == "abandoned":
        return "abandoned"
    return "copying" if (copy.get("lease") or {}).get("live") else "idle"


def works_on(record: dict, volume_id: str) -> bool:
    """Whether an active task works on this destination: the agent's own recover:/retry:
    tasks name it, a client's copy says it in its first answer."""
    result = record.get("result")
    return volume_id in str(record.get("id")) or (
        isinstance(result, dict) and result.get("volumeID") == volume_id)


class Follower:
    def __init__(self, client, task_id, dst, timeout, poll_interval, settle,
                 unreachable_timeout, on_progress):
        self.client, self.task_id, self.dst = client, task_id, dst
        self.timeout, self.poll_interval, self.settle = timeout, poll_interval, settle
        self.unreachable_timeout = unreachable_timeout
        self.on_progress = on_progress
        self.loop = asyncio.get_running_loop()
        self.started = self.last_answer = self.loop.time()
        self.mode = "task"
        self.record: dict | None = None
        self.image: dict | None = None
        self.total: int | None = None
        self.shown = -1.0  # the furthest percent reported (it only moves forward...)
        self.idle_since: float | None = None
        self.restarted = False

    # -- the loop --------------------------------------------------------------------------

    async def run(self, sub) -> Outcome:
        poll_at = self.loop.time()
        while True:
            now = self.loop.time()
            if self.timeout is not None and now - self.started > self.timeout:
                raise Timeout(f"task {self.task_id!r} has not ended within {self.timeout} s")
            if now >= poll_at:
                outcome = await self.poll()
                if outcome is not None:
                    return outcome
                poll_at = self.loop.time() + self.poll_interval
                continue
            ev = await sub.next(poll_at - now)
            if ev is None:
                continue
            if ev.restarted:
                self.restarted = True
                self.shown = -1.0  # ...except after a restart: the copy resumes from its checkpoint
            if ev.stale:
                poll_at = self.loop.time()
            outcome, poll = self.on_event(ev)
            if outcome is not None:
                return outcome
            if poll:
                poll_at = self.loop.time()

    def outcome(self, state: str, **kw) -> Outcome:
        return Outcome(self.task_id, state, task=self.record, image=self.image, dst=self.dst,
                       restarted=self.restarted, **kw)

    # -- what events say -------------------------------------------------------------------

    def on_event(self, ev) -> tuple[Outcome | None, bool]:
        p = ev.params
        if ev.topic == "Task.state":
            rec = p.get("task") or {}
            if rec.get("id") == str(self.task_id) and self.mode == "task":
                return self.on_record(rec, "event")
            if self.mode == "storage" and self.dst and rec.get("state") not in ACTIVE \
                    and works_on(rec, self.dst["volumeID"]):
                return None, True  # a retry or a recovery of our copy ended: look
        elif ev.topic == "Task.progress" and p.get("taskID") == str(self.task_id):
            self.progress(p.get("progress"), None, "event")
        elif ev.topic in ("Image.copy", "Image.merge") and self.dst \
                and p.get("volumeID") == self.dst["volumeID"]:
            if isinstance(p.get("total"), int):
                self.total = p["total"]
            if p.get("state") in ("done", "abandoned"):
                return None, True
            if isinstance(p.get("copied"), int):
                self.progress(None, p["copied"], "event")
        return None, False

    def on_record(self, rec: dict, source: str) -> tuple[Outcome | None, bool]:
        self.record = rec
        state = rec.get("state")
        if isinstance(rec.get("result"), dict) and isinstance(rec["result"].get("total"), int):
            self.total = rec["result"]["total"]
        if state in ACTIVE:
            self.progress(rec.get("progress"), None, source)
            return None, False
        if state == "done":
            if rec.get("progress") is not None:
                self.progress(100.0, None, source)
            return self.outcome("done", result=rec.get("result")), False
        if self.dst and state == "failed" and rec.get("returned"):
            self.mode = "storage"  # it owned the destination: the policy may retry it
            return None, True
        return self.outcome("aborted" if state == "aborted" else "failed",
                            error=rec.get("error")), False

    def progress(self, percent, copied, source: str) -> None:
        total = self.total
        if percent is None and copied is not None and total:
            percent = 100.0 * copied / total
        if not isinstance(percent, (int, float)):
            return
        if copied is None and total is not None:
            copied = round(total * percent / 100.0)
        if percent < self.shown:
            return
        self.shown = percent
        if self.on_progress is not None:
            self.on_progress(Progress(float(percent), copied, total, source))

    # -- what polls say --------------------------------------------------------------------

    async def ask(self, method: str, params):
        """The agent's answer; None if it could not answer now (down, restarting).

        The supervisor answers Task.* at once, so their polls wait little: a request lost
        with an agent that died must not hold the follower for a whole client timeout.
        Image.getStatus runs in a worker (storage may be slow): the client's timeout."""
        quick = min(self.client.timeout, max(1.0, 2 * self.poll_interval))
        try:
            result = await self.client.call(method, params, timeout=quick
                                            if method.startswith("Task.") else None)
        except Timeout:
            self.check_reachable()
            return None
        except CallError as exc:
            self.last_answer = self.loop.time()
            if exc.name == "RecoveryInProgress":
                return None
            raise
        self.last_answer = self.loop.time()
        return result

    def check_reachable(self) -> None:
        silent = self.loop.time() - self.last_answer
        if silent > self.unreachable_timeout:
            raise Timeout(f"the agent at {self.client.endpoint} has not answered for "
                          f"{silent:.0f} s while waiting for task {self.task_id!r}")

    async def poll(self) -> Outcome | None:
        if self.mode == "task":
            try:
                rec = await self.ask("Task.getStatus", {"taskID": str(self.task_id)})
            except CallError as exc:
                if exc.name != "NoSuchTask":
                    raise
                if not self.dst:
                    return self.outcome("lost", error=exc.error)
                self.mode = "storage"  # the agent forgot it: the destination remembers
                self.shown = -1.0
                return await self.poll()
            if rec is None:
                return None
            outcome, again = self.on_record(rec, "poll")
            if outcome is not None or not again:
                return outcome
        return await self.poll_storage()

    async def poll_storage(self) -> Outcome | None:
        try:
            status = await self.ask("Image.getStatus", self.dst)
        except CallError as exc:  # NoSuchDomain, NoSuchVolume: nothing left to follow
            return self.outcome("failed", error=exc.error, via="storage")
        if status is None:
            return None
        self.image = status
        verdict = copy_verdict(status)
        if verdict == "done":
            return self.outcome("done", result=status, via="storage")
        if verdict == "abandoned":
            return self.outcome("needs_continuing", via="storage")
        copy = _work(status) or {}
        self.total = copy.get("total") or self.total
        self.progress(None, copy.get("copied"), "storage")
        if verdict == "copying":
            self.idle_since = None
            return None
        tasks = await self.ask("Task.getAll", {"states": list(ACTIVE)})
        if tasks is None or any(works_on(t, self.dst["volumeID"]) for t in tasks):
            self.idle_since = None  # a task is about to take it (or we cannot tell)
            return None
        now = self.loop.time()
        self.idle_since = self.idle_since if self.idle_since is not None else now
        if now - self.idle_since >= self.settle:
            return self.outcome("needs_continuing", via="storage")
        return None


async def follow(client, task_id, *, dst=None, timeout=None, poll_interval=1.0, settle=10.0,
                 unreachable_timeout=60.0, on_progress=None, subscription=None) -> Outcome:
    follower = Follower(client, task_id, dst, timeout, poll_interval, settle,
                        unreachable_timeout, on_progress)
    sub = subscription if subscription is not None else client.subscribe()
    try:
        return await follower.run(sub)
    finally:
        if subscription is None:
            sub.close()
