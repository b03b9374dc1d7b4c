"""Memory: the supervisor idle and with `tasks` active Debug.sleep tasks, and per worker.

RSS counts every page a process maps, shared ones included, so for forked workers (which
share most of their pages with the fork server, copy-on-write) it says little about what one
more worker costs; USS (pages only this process has) and PSS (shared pages split among their
sharers), from psutil's memory_full_info (/proc/PID/smaps), are reported beside it.
Each sample is a fresh agent. No baseline: the goal is absolute.
"""

from __future__ import annotations

import time

import psutil

from bench.common import MiB, Row, Rpc, Scratch, median

GOAL_SUPERVISOR_MIB = 60
GOAL_WORKER_MIB = 30


def _mem(p: psutil.Process) -> dict:
    m = p.memory_full_info()
    return {"rss": m.rss / MiB, "uss": m.uss / MiB, "pss": m.pss / MiB}


def sample(s: Scratch, tasks: int, n: int) -> dict:
    agent = s.agent(f"mem{n}", rpc={"max_active_tasks": max(256, tasks)}).start()
    rpc = Rpc(agent.rpc_endpoint)
    try:
        for i in range(3):  # every code path of a task run once
            rpc.call("Debug.sleep", {"seconds": 0})
        time.sleep(0.5)
        sup = psutil.Process(agent.proc.pid)
        idle = _mem(sup)
        for i in range(tasks):
            rpc.send("Debug.sleep", {"seconds": 120}, id=f"m{n}-{i}")
        deadline = time.monotonic() + 120
        while rpc.call("Host.getStats")["workers_running"] < tasks or \
                len(rpc.call("Task.getAll", {"states": ["running"]})) < tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tasks} tasks never all ran")
            time.sleep(0.2)
        time.sleep(0.5)
        busy = _mem(sup)
        pids = {w["pid"] for w in rpc.call("Host.getStats")["workers"]}
        workers = [_mem(psutil.Process(pid)) for pid in pids]
        forkserver = _mem(psutil.Process(rpc.call("Host.getStats")["forkserver_pid"]))
        return {"idle": idle, "busy": busy, "forkserver": forkserver,
                "worker": {k: median([w[k] for w in workers]) for k in ("rss", "uss", "pss")},
                "worker_max": {k: max(w[k] for w in workers) for k in ("rss", "uss", "pss")}}
    finally:
        rpc.close()
        agent.stop()


def run(opts) -> list[Row]:
    if "memory" not in opts.only:
        return []
    with Scratch() as s:
        samples = [sample(s, opts.tasks, n) for n in range(min(opts.repeats, 3))]

    def pick(path):
        a, b = path
        return [round(x[a][b], 2) for x in samples]

    busy_rss = median(pick(("busy", "rss")))
    worker_rss = median(pick(("worker", "rss")))
    worker_uss = median(pick(("worker", "uss")))
    extra = {f"{a}_{b}_mib": median(pick((a, b)))
             for a in ("idle", "busy", "forkserver", "worker", "worker_max")
             for b in ("rss", "uss", "pss")}
    extra["tasks"] = opts.tasks
    met = busy_rss <= GOAL_SUPERVISOR_MIB and worker_rss <= GOAL_WORKER_MIB
    return [Row(key="memory", title=f"memory: supervisor RSS with {opts.tasks} active tasks",
                unit="MiB", project=pick(("busy", "rss")),
                baselines={"supervisor idle RSS": pick(("idle", "rss")),
                           "worker RSS": pick(("worker", "rss")),
                           "worker USS": pick(("worker", "uss")),
                           "worker PSS": pick(("worker", "pss"))},
                ratio=busy_rss / GOAL_SUPERVISOR_MIB, ratio_of="of the supervisor's goal",
                goal=f"supervisor <= {GOAL_SUPERVISOR_MIB} MiB; worker <= {GOAL_WORKER_MIB} MiB",
                met=met, extra={**extra, "worker_goal_met_by_uss": worker_uss <= GOAL_WORKER_MIB})]
