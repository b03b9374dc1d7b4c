"""How the cost of a query grows with the work the agent holds.

  queries  three stages, each a fresh agent whose `[tasks] retain_max` is the stage's count,
           filled to it (so the queries measured, themselves tasks, keep it there): 10
           retained tasks and a domain of 10 volumes; then 1,000 and 10,000 retained tasks
           with a domain of `volumes` volumes (100,000 in the full profile), built directly
           with the storage library as the boot row builds it. Retained tasks are made with
           pipelined Host.ping (each one a task record, as any request is). At each stage every query
           is asked `query_samples` times in a row, one in flight, and its latency (request
           to answer) recorded: Task.getAll for the active states (what an engine polls),
           Host.getStats, Image.getStatus of a volume in the domain of that stage; and, for
           the record, Task.getAll of everything (its answer grows with the tasks: linear by
           nature, no goal). The ratio is the worst of the three goal queries' p50 at
           10,000 tasks over its p50 at 10.
"""

from __future__ import annotations

import os
import sqlite3
import time

from bench.boot import build_domain
from bench.common import Row, Rpc, Scratch, data_dir, median, percentile

GOAL = 2.0
ACTIVE = {"states": ["pending", "running", "aborting"]}
STAGES = (10, 1000, 10000)


def _volume(root: str, domain_id: str) -> dict:
    conn = sqlite3.connect(f"file:{root}/metadata.db?mode=ro", uri=True)
    try:
        image, volume = conn.execute("SELECT image_id, volume_id FROM volumes "
                                     "ORDER BY created LIMIT 1").fetchone()
    finally:
        conn.close()
    return {"domainID": domain_id, "imageID": image, "volumeID": volume}


def _latency(rpc: Rpc, method: str, params, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        t = time.perf_counter()
        rpc.call(method, params)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _fill(rpc: Rpc, target: int) -> int:
    """Retained tasks up to `target` (pipelined Host.ping); the count the agent reports."""
    have = sum(rpc.call("Host.getStats")["tasks"].values())
    while have < target:
        n = min(500, target - have)
        for _ in range(n):
            rpc.send("Host.ping")
        for _ in range(n):
            rpc.recv()
        have = sum(rpc.call("Host.getStats")["tasks"].values())
    return have


def run(opts) -> list[Row]:
    if "queries" not in opts.only:
        return []
    samples = opts.query_samples
    with data_dir(opts, "queries") as data, Scratch() as s:
        small_root, big_root = os.path.join(data, "small"), os.path.join(data, "big")
        small_id, _ = build_domain(small_root, 10, 0, "bench-queries")
        big_id, _ = build_domain(big_root, opts.volumes, 0, "bench-queries")
        domains = {10: (small_id, small_root)}
        domains.update({n: (big_id, big_root) for n in STAGES[1:]})
        targets = {10: _volume(small_root, small_id)}
        targets.update({n: _volume(big_root, big_id) for n in STAGES[1:]})
        queries = {"Task.getAll active": ("Task.getAll", ACTIVE),
                   "Host.getStats": ("Host.getStats", None),
                   "Image.getStatus": ("Image.getStatus", None),
                   "Task.getAll everything (no goal)": ("Task.getAll", None)}
        results: dict[str, dict[int, list[float]]] = {q: {} for q in queries}
        retained = {}
        for stage in STAGES:
            domain_id, root = domains[stage]
            agent = s.agent(f"queries-{stage}", tasks={"retain_max": stage},
                            storage={"domains": {domain_id: root}}).start()
            rpc = Rpc(agent.rpc_endpoint)
            retained[stage] = _fill(rpc, stage)
            for _ in range(opts.repeats):
                for name, (method, params) in queries.items():
                    params = targets[stage] if method == "Image.getStatus" else params
                    results[name].setdefault(stage, []).extend(
                        _latency(rpc, method, params, samples))
            retained[stage] = sum(rpc.call("Host.getStats")["tasks"].values())
            rpc.close()
            agent.stop()
    summary = {name: {str(stage): {"p50_ms": median(xs), "p95_ms": percentile(xs, 95)}
                      for stage, xs in by_stage.items()} for name, by_stage in results.items()}
    goal_queries = [q for q in queries if "no goal" not in q]
    growth = {q: median(results[q][STAGES[-1]]) / median(results[q][STAGES[0]])
              for q in queries}
    worst = max(goal_queries, key=lambda q: growth[q])
    return [Row(key="queries", title=f"queries with {STAGES[-1]:,} retained tasks and "
                                     f"{opts.volumes:,} volumes, one in flight",
                unit=f"ms p50 ({worst}, the worst)", project=results[worst][STAGES[-1]],
                baselines={f"{worst} with {STAGES[0]} tasks, 10 volumes":
                           results[worst][STAGES[0]]},
                ratio=growth[worst], ratio_of=f"p50 at {STAGES[-1]:,} tasks / at {STAGES[0]}",
                goal=f"<= {GOAL:g}x the cost with 10 tasks",
                met=all(growth[q] <= GOAL for q in goal_queries),
                extra={"growth": growth, "latency": summary,
                       "retained_tasks": retained, "volumes": opts.volumes})]
