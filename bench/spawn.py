"""Task spawn: Debug.sleep {seconds: 0} from request to response, against a bare fork.

This project: one request at a time (latency: p50, p99 from sending the request to its
response, which comes when the worker has reported its result), and then many at once
(throughput: tasks/s with `INFLIGHT` requests outstanding). Each is a real worker process:
fork server -> intermediate -> worker, adopted by the supervisor, ZeroMQ context, hello,
result, ack.

Baselines, each in a fresh helper process:
  fork:          os.fork() + os._exit(0) + waitpid in a loop, from a bare interpreter;
  fork-preload:  the same from an interpreter that imported what the fork server imports
                 (a bigger parent forks more slowly: this is the floor for our fork server);
  python -c pass: posix_spawn of a fresh interpreter.

    python -m bench.spawn forkloop N [preload]    # prints the latencies as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import Row, Scratch, alternate, median, percentile, ratio

INFLIGHT = 32
GOAL_P50_FACTOR = 3.0
GOAL_TASKS_PER_S = 250.0


def forkloop(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - t)
    return out


def _fork_baseline(n: int, preload: bool) -> list[float]:
    argv = [sys.executable, "-m", "bench.spawn", "forkloop", str(n)] + (["preload"] if preload
                                                                        else [])
    return json.loads(subprocess.run(argv, check=True, capture_output=True).stdout)


def _python_pass(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t)
    return out


def _sleep0(sock, id: str) -> None:
    sock.send(b'{"jsonrpc":"2.0","method":"Debug.sleep","params":{"seconds":0},"id":"%s"}'
              % id.encode())


def _check(body: bytes) -> None:
    if b'"slept":0' not in body:
        raise RuntimeError(f"Debug.sleep failed: {body[:300]!r}")


def latencies(endpoint: str, n: int, tag: str) -> list[float]:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out = []
    try:
        for i in range(n):
            t = time.perf_counter()
            _sleep0(sock, f"{tag}-{i}")
            if not sock.poll(30_000):
                raise TimeoutError("Debug.sleep: no response in 30 s")
            _check(sock.recv())
            out.append(time.perf_counter() - t)
    finally:
        sock.close(0)
    return out


def throughput(endpoint: str, n: int, tag: str, inflight: int = INFLIGHT) -> float:
    """Tasks/s for `n` tasks with up to `inflight` outstanding."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = done = 0
    try:
        t = time.perf_counter()
        while sent < min(inflight, n):
            _sleep0(sock, f"{tag}-{sent}")
            sent += 1
        while done < n:
            if not sock.poll(30_000):
                raise TimeoutError("Debug.sleep: no response in 30 s")
            _check(sock.recv())
            done += 1
            if sent < n:
                _sleep0(sock, f"{tag}-{sent}")
                sent += 1
        return n / (time.perf_counter() - t)
    finally:
        sock.close(0)


def run(opts) -> list[Row]:
    if "spawn" not in opts.only:
        return []
    n = opts.spawn
    with Scratch() as s:
        agent = s.agent("spawn").start()
        latencies(agent.rpc_endpoint, 20, "warm")
        seq = iter(range(1_000_000))
        lat: list[float] = []
        fork: list[float] = []

        def a():
            got = latencies(agent.rpc_endpoint, n, f"l{next(seq)}")
            lat.extend(got)
            return median(got)

        def b():
            got = _fork_baseline(n, preload=False)
            fork.extend(got)
            return median(got)

        p50s, fork_p50s = alternate(opts.repeats, a, b)
        rates = [throughput(agent.rpc_endpoint, max(n, 100), f"t{next(seq)}")
                 for _ in range(opts.repeats)]
        fork_pre = _fork_baseline(n, preload=True)
        py = _python_pass(max(10, n // 10))
    p50, fork_p50 = median(p50s), median(fork_p50s)
    factor = ratio(p50, fork_p50)
    rate = median(rates)
    ms = lambda xs: [round(x * 1000, 3) for x in xs]  # noqa: E731
    return [Row(
        key="spawn", title="task spawn: Debug.sleep {seconds: 0}, p50 request->response",
        unit="ms", project=ms(p50s),
        baselines={"os.fork()+_exit": ms(fork_p50s),
                   "fork, fork-server imports": [round(median(fork_pre) * 1000, 3)],
                   "python -c pass": [round(median(py) * 1000, 3)]},
        ratio=factor, ratio_of="p50 / bare fork p50",
        goal=f"<= {GOAL_P50_FACTOR:g}x bare fork; >= {GOAL_TASKS_PER_S:g} tasks/s",
        met=factor is not None and factor <= GOAL_P50_FACTOR and rate >= GOAL_TASKS_PER_S,
        extra={"p50_ms": round(percentile(lat, 50) * 1000, 3),
               "p99_ms": round(percentile(lat, 99) * 1000, 3),
               "tasks_per_s": round(rate, 1), "tasks_per_s_samples": [round(r, 1) for r in rates],
               "inflight": INFLIGHT,
               "fork_p50_ms": round(percentile(fork, 50) * 1000, 3),
               "fork_p99_ms": round(percentile(fork, 99) * 1000, 3),
               "fork_preload_p50_ms": round(percentile(fork_pre, 50) * 1000, 3),
               "python_pass_p50_ms": round(percentile(py, 50) * 1000, 3),
               "python_pass_p99_ms": round(percentile(py, 99) * 1000, 3),
               "requests_per_sample": n})]


if __name__ == "__main__":
    if sys.argv[1:2] == ["forkloop"]:
        if sys.argv[3:4] == ["preload"]:
            from workers import ops, runtime  # noqa: F401  (what the fork server imports)
        print(json.dumps(forkloop(int(sys.argv[2]))))
