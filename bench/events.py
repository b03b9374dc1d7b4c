"""Events: Task.progress events/s to one subscriber, against bare PUB/SUB of the same payload.

Both publishers are helper processes bound on ipc, publishing as fast as they can; this
process is the one subscriber and counts what it receives in a fixed window (a PUB socket
drops what a subscriber cannot take in time, so what arrives is the rate that counts):

  agent's publisher  agent.wire.events.Publisher.publish("Task.progress", {"taskID", "progress"}):
                     the agent's own code for every event (params, seq, boot_id, JSON, send)
  bare PUB/SUB       the same [topic, body] frames, the body serialized once in advance

The agent itself sends a task's Task.progress at most ~10 times a second by design (the
worker and the supervisor both throttle), so a running agent never publishes near either
rate; the row also reports what one agent delivers with many Debug.sleep tasks reporting.

    python -m bench.events pub agent|bare ENDPOINT SECONDS
"""

from __future__ import annotations

import json
import sys
import time

import zmq

from bench.common import (
    Events,
    Row,
    Rpc,
    Scratch,
    alternate,
    median,
    python_module,
    ratio,
)

GOAL = 0.5
E2E_TASKS = 100
E2E_SECONDS = 2.0


def publisher(kind: str, endpoint: str, seconds: float) -> None:
    ctx = zmq.Context()
    if kind == "agent":
        from agent.wire.events import Publisher

        pub = Publisher(ctx, [endpoint], "0" * 32)
        send = lambda i: pub.publish("Task.progress", {"taskID": "bench-task",  # noqa: E731
                                                       "progress": i % 100 + 0.5})
    else:
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.bind(endpoint)
        body = json.dumps({"jsonrpc": "2.0", "method": "Task.progress", "params": {
            "taskID": "bench-task", "progress": 42.5, "seq": 123456, "boot_id": "0" * 32}},
            separators=(",", ":")).encode()
        send = lambda i: sock.send_multipart([b"Task.progress", body])  # noqa: E731
    print("bound", flush=True)
    end = time.monotonic() + seconds
    i = 0
    while True:
        for _ in range(1000):
            i += 1
            send(i)
        if time.monotonic() > end:
            break
    ctx.destroy(0)


def receive_rate(s: Scratch, kind: str, seconds: float, warmup: float = 0.3) -> float:
    endpoint = f"ipc://{s.path}/ev-{kind}-{time.monotonic_ns()}.sock"
    proc = python_module(s, "bench.events", "pub", kind, endpoint, str(seconds + warmup + 2),
                         stdout=-1)
    proc.stdout.readline()  # bound
    sub = Events(endpoint, "Task.progress")
    try:
        sub.next(timeout=10)
        start = time.perf_counter() + warmup
        end = start + seconds
        counted = 0
        while True:
            if not sub.sock.poll(1000):
                raise TimeoutError("the publisher stopped early")
            sub.sock.recv_multipart()
            now = time.perf_counter()
            if now >= end:
                return counted / seconds
            if now >= start:
                counted += 1
    finally:
        sub.close()
        proc.kill()
        proc.wait()


def agent_rate(s: Scratch) -> dict:
    """Task.progress events/s one agent delivers while E2E_TASKS Debug.sleep tasks run."""
    agent = s.agent("events").start()
    rpc = Rpc(agent.rpc_endpoint)
    sub = Events(agent.events_endpoint, "Task.progress")
    try:
        time.sleep(0.2)
        for i in range(E2E_TASKS):
            rpc.send("Debug.sleep", {"seconds": E2E_SECONDS + 3}, id=f"ev{i}")
        sub.next(timeout=30)
        time.sleep(1.0)  # all started
        while sub.sock.poll(0):
            sub.sock.recv_multipart()
        n, end = 0, time.perf_counter() + E2E_SECONDS
        while time.perf_counter() < end:
            if sub.sock.poll(50):
                sub.sock.recv_multipart()
                n += 1
        return {"agent_tasks": E2E_TASKS, "agent_events_per_s": round(n / E2E_SECONDS, 1),
                "agent_design_cap_per_s": E2E_TASKS * 10}
    finally:
        sub.close()
        rpc.close()
        agent.stop()


def run(opts) -> list[Row]:
    if "events" not in opts.only:
        return []
    with Scratch() as s:
        a, b = alternate(opts.repeats, lambda: receive_rate(s, "agent", opts.events_seconds),
                         lambda: receive_rate(s, "bare", opts.events_seconds))
        extra = agent_rate(s)
    r = ratio(median(a), median(b))
    return [Row(key="events", title="events: Task.progress to one subscriber", unit="events/s",
                project=a, baselines={"bare PUB/SUB": b}, ratio=r,
                ratio_of="agent's publisher / bare", goal=f">= {GOAL}x",
                met=r is not None and r >= GOAL,
                extra={**extra, "seconds_per_sample": opts.events_seconds})]


if __name__ == "__main__":
    if sys.argv[1:2] == ["pub"]:
        publisher(sys.argv[2], sys.argv[3], float(sys.argv[4]))
