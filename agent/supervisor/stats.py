"""What the loop holds, in one snapshot: the one source of Host.getStats (agent/api/host.py)
and of the metrics' snapshot (agent/supervisor/metrics.py), so the two cannot disagree.

Cheap by design (it runs for every Host.getStats and once a second for the metrics): the
loop's own counters and tables, no storage and no process inspection.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the loop's object
    from agent.supervisor.loop import Supervisor


def snapshot(agent: Supervisor) -> dict:
    """The loop's state as Host.getStats answers it (its docstring says each field)."""
    return {
        "agent": {"pid": os.getpid(),
                  "uptime_seconds": agent.system.monotonic() - agent.started_at,
                  "boot_id": agent.boot_id, "callback_errors": agent.callback_errors,
                  "ready": not agent.recovering, "started": agent.started_wall,
                  "ready_since": agent.ready_wall, "metrics": agent.metrics_url},
        "workers_running": agent.workers.running(),
        "workers": [{"taskID": w.task.id, "op": w.op, "pid": w.pid}
                    for w in agent.workers.by_token.values()],
        "forkserver_pid": agent.workers.forkserver_pid,
        "tasks": agent.tasks.counts(),
        "copies": agent.copies.running(),
        "backlog": agent.backlog.waiting(),
        "lockspace_waiting": agent.lockspaces.waiting(),
        "limits": {
            "descriptors": agent.gate.stats(),
            "rpc": {**agent.ledger.stats(), "messages_dropped": agent.dropped_messages},
            "events": {"published": agent.events.seq, "dropped": agent.events.dropped,
                       "oversized": agent.events.oversized},
            "workers": {"strangers": agent.workers.strangers,
                        "misbehaved": agent.workers.misbehaved},
        },
    }


def active_by_method(agent: Supervisor) -> dict[tuple[str, str], int]:
    """Active tasks counted by (method, state): bounded by [rpc] max_active_tasks and the
    agent's own."""
    out: dict[tuple[str, str], int] = {}
    for task in agent.tasks.active.values():
        key = (task.method, task.state)
        out[key] = out.get(key, 0) + 1
    return out
