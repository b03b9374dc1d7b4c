"""What a copy reports as it goes (progress, checkpoints, events) and records when it fails."""

from __future__ import annotations

import time

from agent import errors, logs
from agent.storage.metadata import DomainDB

EVENT_INTERVAL = 1.0


def record_error(db: DomainDB, volume_id: str, gen: int, exc: errors.AgentError, task_id) -> None:
    """Keep the error in the marker, if the metadata can still be written (a full disk may
    hold the metadata too); mark it recorded so a retry does not record it again."""
    try:
        if db.record_error(volume_id, gen, {**exc.to_json(), "time": time.time(),
                                            "task_id": task_id}):
            exc.data["recorded"] = True
    except errors.AgentError as meta:
        logs.get(component="worker").warning("copy_error_not_recorded", error=meta.message)


class Reporter:
    """What a copy says as it goes: checkpoints (with an Image.copy event about once a
    second), progress, the checksum follower told where the copy is, and the rate limit.
    ``share`` (layer index, layers): a chain copy's progress counts every layer."""

    def __init__(self, ctx, dst_db: DomainDB, volume_id: str, gen: int, size: int,
                 base: dict, follower, rate: int, share: tuple = (0, 1),
                 topic: str = "Image.copy", save=None):
        self.ctx, self.dst_db, self.volume_id, self.gen = ctx, dst_db, volume_id, gen
        self.size, self.base = size, base
        self.follower, self.rate, self.share = follower, rate, share
        self.topic = topic
        # Where a checkpoint is recorded: the copy marker, or (a merge) its own row.
        self.save = save or (lambda offset: dst_db.checkpoint(volume_id, gen, offset))
        self.began = self.last_event = time.monotonic()

    def checkpoint(self, offset: int) -> bool:
        ok = self.save(offset)
        now = time.monotonic()
        if ok and now - self.last_event >= EVENT_INTERVAL:
            self.last_event = now
            running = "copying" if self.topic == "Image.copy" else "merging"
            self.ctx.event(self.topic, {**self.base, "state": running, "copied": offset,
                                        "percent": round(100.0 * offset / self.size, 2)
                                        if self.size else 100.0})
        return ok

    def waiting(self, reason: str) -> None:
        """Said once when the copy waits for something outside it (a killed writer's lock)."""
        self.ctx.event(self.topic, {**self.base, "state": "waiting", "reason": reason})

    def progress(self, offset: int, moved: int) -> None:
        """Every byte below `offset` is written; `moved` bytes of data were, in this life.
        The rate limit paces the data moved: a hole, read and written as nothing, costs no
        I/O, and a sparse 8 TiB disk must not take 8 TiB's time (oVirt/vdsm#221)."""
        if self.follower is not None:
            self.follower.advance(offset)
        done, layers = self.share
        fraction = offset / self.size if self.size else 1.0
        self.ctx.progress(100.0 * (done + fraction) / layers)
        if self.rate:  # behind the allowed rate's schedule? wait (an abort cuts it short)
            ahead = moved / self.rate - (time.monotonic() - self.began)
            if ahead > 0:
                self.ctx.pause(ahead)
