"""RPC round trips/s: Host.ping against a bare pyzmq ROUTER echo server speaking the same JSON.

The echo server is a separate process, like the agent, bound on ipc in the same kind of
short /tmp dir: it parses each request with the stdlib json module and answers
{"jsonrpc": "2.0", "id": <the id>, "result": true}, which is what Host.ping answers. One
client (this process) drives both the same way: `inflight` requests outstanding, a new one
sent as each response arrives, for a fixed time; only the responses received in that time
count. The client is kept lean (requests are built from bytes, responses checked by a byte
search) so that it is not what limits either side.

    python -m bench.rpc echo ENDPOINT      # the echo server
"""

from __future__ import annotations

import json
import sys
import time

import zmq

from bench.common import Row, Scratch, alternate, median, paired_ratio, python_module, ratio

GOALS = {1: 0.9, 64: 0.75}


def echo_server(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart()
        req = json.loads(frames[-1])
        body = json.dumps({"jsonrpc": "2.0", "id": req.get("id"), "result": True},
                          separators=(",", ":")).encode()
        sock.send_multipart([*frames[:-1], body])


def load(endpoint: str, inflight: int, seconds: float, warmup: float = 0.3) -> float:
    """Round trips per second with `inflight` requests outstanding."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    template = b'{"jsonrpc":"2.0","method":"Host.ping","id":%d}'
    n = 0
    try:
        for _ in range(inflight):
            n += 1
            sock.send(template % n)
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + seconds
        counted = 0
        while True:
            if not sock.poll(10_000):
                raise TimeoutError(f"no response from {endpoint} in 10 s")
            body = sock.recv()
            if b'"result":true' not in body:
                raise RuntimeError(f"unexpected response {body[:200]!r}")
            now = time.perf_counter()
            if now >= end:
                break
            if now >= measure_from:
                counted += 1
            n += 1
            sock.send(template % n)
        for _ in range(inflight - 1):  # let the rest arrive, so the next run starts clean
            if sock.poll(10_000):
                sock.recv()
        return counted / seconds
    finally:
        sock.close(0)


def run(opts) -> list[Row]:
    rows = []
    wanted = [k for k in (1, 64) if f"rpc{k}" in opts.only]
    if not wanted:
        return rows
    with Scratch() as s:
        agent = s.agent("rpc").start()
        echo_ep = f"ipc://{s.path}/echo.sock"
        python_module(s, "bench.rpc", "echo", echo_ep)
        load(echo_ep, 1, 0.2, warmup=0.5)  # connected and warm
        for k in wanted:
            a, b = alternate(opts.repeats,
                             lambda: load(agent.rpc_endpoint, k, opts.rpc_seconds),
                             lambda: load(echo_ep, k, opts.rpc_seconds))
            r = ratio(median(a), median(b))
            rows.append(Row(
                key=f"rpc{k}", title=f"RPC round trips/s, {k} in flight", unit="round trips/s",
                project=a, baselines={"bare pyzmq echo": b}, ratio=r,
                ratio_of="Host.ping / echo", goal=f">= {GOALS[k]}x",
                met=r is not None and r >= GOALS[k],
                extra={"seconds_per_sample": opts.rpc_seconds,
                       "paired_ratio": paired_ratio(a, b)}))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        echo_server(sys.argv[2])
