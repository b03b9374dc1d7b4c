"""Real agents for tests: processes, sockets and run dirs, and waiting on facts.

Every agent a test starts is a real `python -m agent serve` process with its own config and
run dir; every one is SIGKILLed and its leftovers checked for when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import zmq

from agent.client import CallError, Client
from agent.config import write as write_config  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = ""):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def concurrently(*fns) -> None:
    """Run each of `fns` in a thread of its own and wait for all; the first one's failure is
    raised (with its own traceback) once every one has ended. For scenarios whose fixed
    waits (sanlock's) would otherwise add up."""
    import threading
    failures: list[BaseException] = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:  # handed to the test's thread
            failures.append(exc)
    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def task_state(agent, task_id):
    """The task's state, or None while the agent has not seen the request: a request
    sent on one socket and polled from another may arrive after the first poll."""
    try:
        return agent.call("Task.getStatus", {"taskID": task_id})["state"]
    except CallError as exc:
        assert exc.name == "NoSuchTask", exc
        return None


def worker_of(agent, task_id) -> psutil.Process:
    """The worker process of an agent's task, once the agent names its pid."""
    def find():
        for w in agent.call("Host.getStats")["workers"]:
            if w["taskID"] == task_id and w["pid"]:
                return psutil.Process(w["pid"])
    return wait_for(find, what=f"the worker of {task_id}")


def short_tmpdir(prefix: str = "ha-") -> Path:
    # ipc socket paths must stay under ~107 bytes: pytest's tmp_path is often longer.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class AgentProcess:
    """One agent: its config, its process, clients to it."""

    def __init__(self, base: Path, name: str = "a", repo: Path | None = None,
                 serve_args: tuple[str, ...] = (), **overrides):
        """`repo`: the checkout the agent runs from (bench compares two); `serve_args`: more
        flags for `serve`."""
        self.base = base
        self.name = name
        self.repo = repo or REPO
        self.serve_args = serve_args
        self.run_dir = base / f"run-{name}"
        self.config_path = base / f"{name}.toml"
        self.log_path = base / f"{name}.log"
        cfg = {
            "host_id": f"host-{name}",
            "run_dir": str(self.run_dir),
            "debug": True,
            "rpc": {"endpoints": ["ipc://{run_dir}/rpc.sock"]},
            "events": {"endpoints": ["ipc://{run_dir}/events.sock"]},
            "workers": {"deadline_seconds": 10.0, "kill_grace_seconds": 2.0},
            # On, as by default, on a port of its own: agents of one test run side by side.
            "metrics": {"endpoint": "127.0.0.1:0"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.cfg = cfg
        write_config(self.config_path, cfg)
        self.proc: subprocess.Popen | None = None
        self.ctx = zmq.Context()
        self.clients: list[Client] = []
        self.env = dict(os.environ)

    def reconfigure(self, **overrides) -> None:
        """Change the config the next start() uses (tables are merged key by key)."""
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(self.cfg.get(key), dict):
                self.cfg[key] = {**self.cfg[key], **value}
            else:
                self.cfg[key] = value
        write_config(self.config_path, self.cfg)

    @property
    def rpc_endpoint(self) -> str:
        return f"ipc://{self.run_dir}/rpc.sock"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.run_dir}/events.sock"

    def start(self, wait: bool = True, env: dict | None = None,
              nofile: tuple[int, int] | None = None) -> "AgentProcess":
        """`nofile`: the agent's (soft, hard) RLIMIT_NOFILE, as `ulimit -n` would set it."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")

        def limits():
            if nofile is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(self.config_path), "serve",
             *self.serve_args],
            cwd=self.repo, stdout=log, stderr=log, env={**self.env, **(env or {})},
            preexec_fn=limits if nofile else None)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        client = self.client()

        def ready():
            assert self.proc.poll() is None, f"agent exited: {self.proc.returncode}\n{self.log()}"
            try:
                return client.call("Host.ping", timeout=0.5) is True
            except CallError as exc:
                assert exc.name == "RecoveryInProgress", exc
                return False
            except Exception:
                return False
        wait_for(ready, timeout, what=f"agent {self.name} ready")

    def client(self, timeout: float = 10.0) -> Client:
        c = Client(self.rpc_endpoint, ctx=self.ctx, timeout=timeout)
        self.clients.append(c)
        return c

    def call(self, method, params=None, **kw):
        """One reused client: a long test (chaos) must not open a socket per call. It
        survives restarts (same ipc path); a timed-out call leaves a late answer, which the
        next call skips by id."""
        if getattr(self, "_caller", None) is None:
            self._caller = self.client()
        return self._caller.call(method, params, **kw)

    def subscribe(self, *topics: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        # Made before start() to catch start-up's events (Image.recovered): a PUB drops what
        # it sends before a subscriber has joined, so retry the connect every millisecond
        # (100 ms by default), far less than the fork server takes to start its first worker.
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        for t in topics or ("",):
            sock.setsockopt_string(zmq.SUBSCRIBE, t)
        sock.connect(self.events_endpoint)
        self.clients.append(sock)
        return sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[psutil.Process]:
        """This agent's fork server and workers that are alive, found the way the agent finds
        leftovers. A zombie is dead (its parent died too, and init has yet to reap it)."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = p.info["cmdline"] or []
            if "workers.forkserver" in cmd and str(self.run_dir) in cmd and \
                    p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(60)

    def log(self, leave_out: re.Pattern | None = None, tail: int = 6000) -> str:
        """The end of the agent's log, without the lines `leave_out` matches."""
        try:
            text = self.log_path.read_text()
        except OSError:
            return ""
        if leave_out is not None:
            text = "".join(line for line in text.splitlines(keepends=True)
                           if not leave_out.search(line))
        return text[-tail:]

    def close(self) -> list[int]:
        """Kill the agent; returns the pids of any worker that outlived it (then kills them)."""
        try:
            self.kill(signal.SIGKILL)
        finally:
            for c in self.clients:
                c.close() if isinstance(c, Client) else c.close(0)
            self.clients.clear()
            self._caller = None
            # destroy, not term: a socket someone forgot must never block the test run (a
            # context left to the garbage collector with one open hangs it in zmq_ctx_term).
            self.ctx.destroy(linger=0)
        return self.reap_workers()

    def reap_workers(self, timeout: float = 15.0) -> list[int]:
        """After the agent died: the pids of any worker that outlived it (then killed)."""
        # Workers die with their supervisor (parent-death signal): give the kernel a moment.
        try:  # a loaded machine can take seconds to deliver a parent-death signal
            wait_for(lambda: not self.workers(), timeout, what="workers to die with the agent")
        except AssertionError:
            pass
        left = []
        for p in self.workers():
            try:
                p.kill()
                left.append(p.pid)
            except psutil.NoSuchProcess:
                pass  # it went by itself meanwhile: not a leftover
        return left


def recv_json(sock: zmq.Socket, timeout: float = 5.0):
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"nothing received within {timeout} s")
    frames = sock.recv_multipart()
    return json.loads(frames[-1])


def events_until(sock: zmq.Socket, predicate, timeout: float = 10.0) -> list[dict]:
    """Read events until one satisfies `predicate`; returns all read, that one last."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"event not seen within {timeout} s; saw {got[-5:]}")
        ev = recv_json(sock, left)
        got.append(ev)
        if predicate(ev):
            return got


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Tmux:
    """A tmux server of our own (its own socket), killed at the end."""

    def __init__(self):
        self.socket = f"ha-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args, check=True) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                             capture_output=True, text=True, timeout=30)
        if check:
            assert out.returncode == 0, out.stderr
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t")

    def start(self, command: str, width: int = 160, height: int = 45) -> int:
        """`command` alone in the pane of session "t" (kept once it exits, for its status),
        sized by tmux, not by a COLUMNS inherited from the test run; the pane's pid."""
        self("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
             f"exec env -u COLUMNS -u LINES HOSTAGENT_CLIENT_CONFIG=/dev/null {command}", ";",
             "set-option", "-t", "t", "remain-on-exit", "on")
        return int(self("display-message", "-p", "-t", "t", "#{pane_pid}").strip())

    def kill(self) -> None:
        self("kill-server", check=False)


def kill_all(procs: list) -> None:
    """SIGKILL these psutil.Processes (by pid, gone or not) and reap what is ours."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def pane_exit_code(tmux, pid: int) -> int | None:
    """The exit code of the pane's process once it has exited, else None. From tmux once it
    has reaped it; tmux 3.3a sometimes leaves it a zombie for many seconds (seen here: pane
    dead, no status), and then from the zombie's /proc/PID/stat (exit_code, field 52)."""
    dead, status = tmux("display-message", "-p", "-t", "t",
                        "#{pane_dead} #{pane_dead_status}").split(" ", 1)
    if dead != "1":
        return None
    if status.strip():
        return int(status)
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None  # reaped between the two reads: tmux has the status now
    if fields[0] != "Z":
        return None
    return os.waitstatus_to_exitcode(int(fields[52 - 3]))  # -N: killed by signal N
