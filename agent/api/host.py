"""Host: liveness, statistics and what this agent can do."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import psutil

from agent import __version__
from agent.supervisor import states, stats
from agent.wire.verbs import REGISTRY, describe, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


@verb("Host.ping")
def ping(agent: Supervisor, params):
    """Answer true: the agent is up and its loop is turning.

    Result: true. Errors: 99 RecoveryInProgress while start-up is still running.
    """
    return True


@verb("Host.getStats")
def get_stats(agent: Supervisor, params):
    """Host and agent statistics from psutil.

    Result: {cpu_percent, cpu_count, memory: {total, available, percent}, load: [1, 5, 15],
    uptime_seconds, agent: {pid, rss_bytes, uptime_seconds, boot_id, callback_errors, ready:
    start-up is done, started and ready_since: seconds since the epoch (ready_since null
    until ready), metrics: the URL of the metrics endpoint or null}, workers_running,
    workers: [{taskID, op, pid}], forkserver_pid, tasks: {state: count}, copies: the copies
    in progress as their workers last reported, [{taskID, domainID, imageID, volumeID,
    copied, total, rate: bytes a second (null before a second report), seconds}], backlog:
    the agent's own tasks (recovered and retried copies) pending for a free slot of
    `[recovery] max_running`, lockspace_waiting: tasks waiting for their domain's lockspace
    to be joined, limits: what the agent refused or dropped to stay within its
    bounds (docs/crash-model.md, "Bounds"): {descriptors: {limit, in_use, peers, listening,
    pauses, refused_workers}, rpc: {unread_reply_bytes, clients_with_unread_replies,
    replies_refused, replies_dropped, messages_dropped}, events: {published, dropped,
    oversized},
    workers: {strangers, misbehaved}}}. callback_errors counts bugs the loop survived.
    """
    vm = psutil.virtual_memory()
    loop = stats.snapshot(agent)
    loop["agent"]["rss_bytes"] = psutil.Process().memory_info().rss
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
        "load": list(os.getloadavg()),
        "uptime_seconds": time.time() - psutil.boot_time(),
        **loop,
    }


@verb("Host.getCapabilities")
def get_capabilities(agent: Supervisor, params):
    """What this agent is and every method it serves, with its params.

    Result: {version, host_id, boot_id, kernel_boot_id, task_states, methods: [{name, params,
    doc, runs_in}]}.
    """
    return {
        "version": __version__,
        "host_id": agent.config.host_id,
        "boot_id": agent.boot_id,
        "kernel_boot_id": agent.kernel_boot_id,
        "task_states": list(states.STATES),
        "methods": [describe(v) for v in sorted(REGISTRY.values(), key=lambda v: v.name)
                    if agent.serves(v)],
    }
