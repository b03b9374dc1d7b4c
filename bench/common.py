"""What every benchmark row shares: real agent processes, helper processes, pairs, statistics.

An agent is started the way tests/support/harness.py starts one: `python -m agent serve` with
its own config and run dir, ipc endpoints in a short /tmp dir, debug = true. Everything a row
starts is killed, and every directory it makes removed, by the Scratch that owns it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import zmq

from agent.config import DEFAULTS
from tests.support.harness import AgentProcess

REPO = Path(__file__).resolve().parent.parent
AGENT_REPO = REPO  # where agents are started from (python -m bench --agent-repo)
MiB = 1 << 20
GiB = 1 << 30


# -- statistics -----------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else None


def percentile(xs, p: float):
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def alternate(repeats: int, *fns) -> list[list]:
    """Run each of `fns` `repeats` times, side by side, the order rotating every round
    (A B, B A, ... or A B C, B C A, ...), so a drift of the machine (page cache, the host's
    other tenants) lands on each about equally. Returns one list of samples per function."""
    out: list[list] = [[] for _ in fns]
    for i in range(repeats):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            out[k].append(fns[k]())
    return out


# -- results --------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: this project's figure, its baselines, the ratio and the goal."""

    key: str
    title: str
    unit: str
    project: list  # samples
    baselines: dict = field(default_factory=dict)  # name -> samples
    ratio: float | None = None
    ratio_of: str = ""  # what the ratio compares, in words
    goal: str = ""
    met: bool | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "key": self.key, "title": self.title, "unit": self.unit,
            "project": {"median": median(self.project), "samples": self.project},
            "baselines": {k: {"median": median(v), "samples": v}
                          for k, v in self.baselines.items()},
            "ratio": self.ratio, "ratio_of": self.ratio_of, "goal": self.goal,
            "met": self.met, "extra": self.extra,
        }


def ratio(a, b):
    return None if not a or not b else a / b


def paired_ratio(a: list, b: list):
    """The median of a[i] / b[i]: samples of one round ran back to back, so when the machine
    drifts 2-3x between rounds (this VM's page cache and its host), each pair still shares
    its conditions. Reported next to the ratio of medians, which decides `met`."""
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return median(pairs) if pairs else None


# -- scratch space and processes ------------------------------------------------------------

class Scratch:
    """A short /tmp dir (ipc paths must stay under ~107 bytes) and every process started in
    it; close() kills them all (SIGKILL, the agent's normal way to stop) and removes the dir."""

    def __init__(self, prefix: str = "hab-", dir: str | None = None):
        # $HOSTAGENT_BENCH_TMP: where a run keeps its files (a test gives it a private one).
        base = dir or os.environ.get("HOSTAGENT_BENCH_TMP") or "/tmp"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.procs: list[subprocess.Popen] = []
        self.agents: list[Agent] = []

    def spawn(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def agent(self, name: str, repo: Path | None = None, **overrides) -> "Agent":
        a = Agent(self, name, repo, **overrides)
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            a.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def data_dir(opts, name: str):
    """A directory of its own under --data-dir (disk-backed) for a row's files, removed at
    its end whatever happens."""
    path = tempfile.mkdtemp(prefix=f"hab-{name}-", dir=opts.data_dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def python_module(scratch: Scratch, module: str, *args: str, **kw) -> subprocess.Popen:
    return scratch.spawn([sys.executable, "-m", module, *args], **kw)


class Agent(AgentProcess):
    """One real agent process: the tests' (tests/support/harness.py), with the defaults an
    operator has for its workers, readiness timed to the millisecond, and a stop that is a
    SIGKILL, as for every agent."""

    def __init__(self, scratch: Scratch, name: str, repo: Path | None = None, **overrides):
        repo = Path(repo or AGENT_REPO)  # another checkout, to compare two versions
        if not any((repo / "agent" / p).exists() for p in ("metrics.py",
                                                          "supervisor/metrics.py")):
            overrides.setdefault("metrics", {"endpoint": ""})  # older versions have none
        overrides.setdefault("host_id", f"bench-{name}")
        overrides.setdefault("workers", {k: DEFAULTS["workers"][k]
                                         for k in ("deadline_seconds", "kill_grace_seconds")})
        log_level = os.environ.get("BENCH_AGENT_LOG_LEVEL", "info")  # for experiments
        super().__init__(scratch.path, name, repo=repo, serve_args=("--log-level", log_level),
                         **overrides)
        self.started_at = 0.0

    def start(self, wait: bool = True) -> "Agent":
        self.started_at = time.perf_counter()
        super().start(wait=False)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.002) -> float:
        """Seconds from the process's start to the first Host.ping answered true (polled
        every `interval` on a bare socket: the boot row's resolution)."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 2)  # the ipc file appears when the agent binds
        sock.connect(self.rpc_endpoint)
        deadline = time.perf_counter() + timeout
        n = 0
        try:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent {self.name} exited: {self.log()[-3000:]}")
                n += 1
                sock.send(b'{"jsonrpc":"2.0","method":"Host.ping","id":"ready-%d"}' % n)
                if sock.poll(int(max(interval, 0.05) * 1000)):
                    resp = json.loads(sock.recv())
                    if resp.get("result") is True:
                        return time.perf_counter() - self.started_at
                    time.sleep(interval)
        finally:
            sock.close(0)
        raise RuntimeError(f"agent {self.name} not ready in {timeout} s: {self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL: a stop is a crash for this agent; its workers die with it (any that
        did not is killed). It can be started again."""
        self.kill(signal.SIGKILL)
        self.reap_workers(10.0)


class Rpc:
    """A lean JSON-RPC client on one DEALER socket: requests by bytes, responses parsed."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.n = 0

    def send(self, method: str, params=None, id: str | None = None) -> str:
        self.n += 1
        id = id or f"b{os.getpid()}-{self.n}"
        msg = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            msg["params"] = params
        self.sock.send(json.dumps(msg).encode())
        return id

    def recv(self, timeout: float = 30.0) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no response in {timeout} s")
        return json.loads(self.sock.recv())

    def call(self, method: str, params=None, timeout: float = 60.0):
        id = self.send(method, params)
        while True:
            resp = self.recv(timeout)
            if resp.get("id") == id:
                if "error" in resp:
                    raise RuntimeError(f"{method}: {resp['error']}")
                return resp["result"]

    def close(self) -> None:
        self.sock.close(0)


class Events:
    """A subscriber to an agent's events."""

    def __init__(self, endpoint: str, *topics: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 2)  # the agent may not have bound yet
        for t in topics or ("",):
            self.sock.setsockopt_string(zmq.SUBSCRIBE, t)
        self.sock.connect(endpoint)

    def next(self, timeout: float = 60.0) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no event in {timeout} s")
        return json.loads(self.sock.recv_multipart()[-1])

    def until(self, predicate, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next(max(0.001, deadline - time.monotonic()))
            if predicate(ev):
                return ev

    def close(self) -> None:
        self.sock.close(0)


def task_done(task_id: str):
    """An event predicate: Task.state of `task_id` in an ended state (fails loudly)."""
    def pred(ev):
        if ev.get("method") != "Task.state":
            return False
        t = ev["params"]["task"]
        if t["id"] != task_id or t["state"] not in ("done", "failed", "aborted"):
            return False
        if t["state"] != "done":
            raise RuntimeError(f"task {task_id} {t['state']}: {t['error']}")
        return True
    return pred


def wait_subscribed(events: Events, rpc: Rpc, timeout: float = 10.0) -> None:
    """PUB/SUB joins late: wait until an event caused now reaches us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rpc.call("Host.ping")
        try:
            events.until(lambda ev: ev.get("method") == "Task.state", 0.05)
            while events.sock.poll(0):  # drain the rest
                events.sock.recv_multipart()
            return
        except TimeoutError:
            continue
    raise TimeoutError("the subscription never took")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants: its own, what it reaped of its children
    (an agent's ended workers, and theirs: qemu-nbd), and each live descendant's likewise.
    A difference of two of these around a task is the task's whole cost."""
    def cost(p: psutil.Process) -> float:
        c = p.cpu_times()
        return c.user + c.system + c.children_user + c.children_system
    root = psutil.Process(pid)
    total = cost(root)
    for child in root.children(recursive=True):
        try:
            total += cost(child)
        except psutil.Error:
            continue  # gone meanwhile: reaped, so counted in its parent's by now or soon
    return total


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (and theirs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def evict(path: str | os.PathLike) -> None:
    """Drop a file's pages from the page cache (after fsync, so none are dirty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str | os.PathLike) -> None:
    """Read a file whole, so its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.readinto(_WARM_BUF):
            pass


_WARM_BUF = bytearray(8 * MiB)


def run_timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t
