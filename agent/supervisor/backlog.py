"""The agent's own work, started a bounded number at a time.

Start-up may find 1,000 copies to resume on a shared domain; retries come in bursts when a
disk fills. Forking a worker for each at once starves the supervisor's own loop (and so
READY, and every client) and makes the fork queue outlast worker deadlines. So the tasks the
agent issues itself (recovered and retried copies, abandons) are admitted at once, as
`pending` tasks a client can read and abort, and wait here in order; at most
`[recovery] max_running` of them run at a time. Scans are not held here: start-up waits for
them, and they are short.

Nothing here survives a restart, and nothing needs to: what is waiting is derived from
storage again by the next start-up.
"""

from __future__ import annotations

from collections import deque


class Backlog:
    def __init__(self, limit: int):
        self.limit = limit
        self._waiting: deque = deque()  # (task, job), oldest first
        self._running: list = []  # tasks we let start; pruned of ended ones as we go

    def add(self, task, job) -> None:
        self._waiting.append((task, job))

    def discard(self, task) -> bool:
        """Take `task` out if it is still waiting (it is being aborted); False if it is not."""
        for i, (waiting, _) in enumerate(self._waiting):
            if waiting is task:
                del self._waiting[i]
                return True
        return False

    def take(self) -> list[tuple]:
        """The (task, job) pairs that may start now, in the order they were added."""
        self._running = [t for t in self._running if t.active]
        out = []
        while self._waiting and len(self._running) < self.limit:
            task, job = self._waiting.popleft()
            if task.active:
                self._running.append(task)
                out.append((task, job))
        return out

    def waiting(self) -> int:
        return len(self._waiting)
