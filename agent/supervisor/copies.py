"""Copies in progress, as their workers report them: bytes copied and a rate for each.

A copy's worker publishes an Image.copy event at its checkpoints (about once a second; a
merge's, an Image.merge event, counted here as a copy into its base, of kind merge):
{domainID, imageID, volumeID, state, copied, total}. The supervisor passes each one here, so
`hostagent status`, `hostagent top` (through Host.getStats) and the metrics can say how fast
each copy goes without asking storage. One entry per active task, forgotten when the task
ends, so this holds no more than the task table does. A chain copy reports each layer under
its own volumeID: a new layer starts a new entry's rate.
"""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.5  # weight of the newest interval's rate: steady, yet follows a throttle


@dataclass
class Copy:
    task_id: str
    domain_id: str
    image_id: str
    volume_id: str
    copied: int
    total: int | None
    began: float
    at: float
    rate: float | None = None  # bytes a second, once two reports are in
    kind: str = "copy"  # or merge: a merge's commit, reported on its base

    def record(self) -> dict:
        return {"taskID": self.task_id, "domainID": self.domain_id, "imageID": self.image_id,
                "volumeID": self.volume_id, "kind": self.kind, "copied": self.copied,
                "total": self.total,
                "rate": None if self.rate is None else round(self.rate),
                "seconds": round(self.at - self.began, 3)}


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


class CopyMeter:
    def __init__(self, clock):
        self.clock = clock
        self._by_task: dict[str, Copy] = {}

    def report(self, task_id: str, params: dict) -> int:
        """Take one Image.copy event's params; returns the bytes it says were newly copied
        (0 for a copy's first report: its `copied` may be a resumed prefix, not new work)."""
        copied, volume_id = _count(params.get("copied")), params.get("volumeID")
        if copied is None or not isinstance(volume_id, str):
            return 0
        now = self.clock()
        entry = self._by_task.get(task_id)
        if entry is None or entry.volume_id != volume_id:
            self._by_task[task_id] = Copy(task_id, str(params.get("domainID")),
                                          str(params.get("imageID")), volume_id, copied,
                                          _count(params.get("total")), now, now,
                                          kind="merge" if "topVolumeID" in params else "copy")
            return 0
        delta, elapsed = max(0, copied - entry.copied), now - entry.at
        if elapsed > 0:
            rate = delta / elapsed
            entry.rate = rate if entry.rate is None else \
                SMOOTHING * rate + (1 - SMOOTHING) * entry.rate
        entry.copied, entry.at = max(entry.copied, copied), now
        entry.total = _count(params.get("total")) or entry.total
        return delta

    def forget(self, task_id: str) -> None:
        self._by_task.pop(task_id, None)

    def keep_only(self, task_ids) -> None:
        """Forget every copy whose task is not among `task_ids` (the active ones)."""
        for task_id in [t for t in self._by_task if t not in task_ids]:
            del self._by_task[task_id]

    def __len__(self) -> int:
        return len(self._by_task)

    def running(self) -> list[dict]:
        return [c.record() for c in self._by_task.values()]
