"""The `hostagent` console script, run as a real subprocess against real agents."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent import config as configmod
from agent.client import CallError, Client
from tests.support.harness import cleanup_dir, short_tmpdir, wait_for

HOSTAGENT = Path(sys.executable).parent / "hostagent"
if not HOSTAGENT.exists():
    HOSTAGENT = Path(shutil.which("hostagent") or HOSTAGENT)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOSTAGENT_ENDPOINT", "HOSTAGENT_EVENTS", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
    return {**env, **extra}


def run(*args, env=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([str(HOSTAGENT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


def call(agent, *args, **kw) -> subprocess.CompletedProcess:
    return run("--config", str(agent.config_path), "call", *args, **kw)


class LineReader:
    """Lines from a pipe with a timeout (select, no blocking read past what is there)."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


@pytest.fixture
def processes():
    """Popen objects a test starts: SIGKILLed and reaped when it ends."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdout, p.stderr):
            if f:
                f.close()


def test_call_prints_the_result(agent):
    out = call(agent, "Host.ping")
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "true", "")
    out = call(agent, "Debug.sleep", '{"seconds": 0}')
    assert out.returncode == 0 and json.loads(out.stdout) == {"slept": 0}


def test_call_error_is_json_on_stderr_exit_1(agent):
    out = call(agent, "Task.getStatus", '{"taskID": "nope"}')
    assert out.returncode == 1 and out.stdout == ""
    assert "Traceback" not in out.stderr
    err = json.loads(out.stderr)
    assert err["code"] == 101 and err["data"]["name"] == "NoSuchTask"
    assert err["data"]["taskID"] == "nope" and err["message"]


def test_bad_params_json_exit_2(agent):
    out = call(agent, "Task.getStatus", '{"taskID": nope')
    assert out.returncode == 2 and "PARAMS is not JSON" in out.stderr
    assert "Traceback" not in out.stderr


def test_id_names_the_task(agent):
    out = call(agent, "Debug.sleep", '{"seconds": 0}', "--id", "7")
    assert out.returncode == 0, out.stderr
    rec = agent.call("Task.getStatus", {"taskID": "7"})
    assert rec["id"] == "7" and rec["method"] == "Debug.sleep" and rec["state"] == "done"
    out = call(agent, "Task.getStatus", '{"taskID": "7"}', "--id", "status-of-7")
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == "7"
    assert agent.call("Task.getStatus", {"taskID": "status-of-7"})["method"] == "Task.getStatus"


@pytest.mark.parametrize("given", ["007", "-0", "\u00b2", "1" * 5000])
def test_id_is_the_task_id_as_typed(agent, given):
    """Only a canonical decimal goes out as a JSON integer; anything else names itself."""
    out = call(agent, "Debug.sleep", '{"seconds": 0}', "--id", given, "--timeout", "5")
    if len(given) > 128:  # too long to name a task: the agent's refusal, not a crash
        assert out.returncode == 1 and json.loads(out.stderr)["code"] == -32600, out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert agent.call("Task.getStatus", {"taskID": given})["id"] == given
    with pytest.raises(CallError):
        agent.call("Task.getStatus", {"taskID": str(int(given))} if given.isascii() else
                   {"taskID": "2"})


@pytest.mark.parametrize("where", ["no socket file", "a stale socket file", "a closed port"])
@pytest.mark.parametrize("command", [("call", "Host.ping"), ("tasks",)])
def test_nothing_listening_is_said_at_once_not_after_the_timeout(workdir, where, command):
    """When the OS says at once that nothing listens (no socket file, a socket file nobody
    listens on, a refused port), a command says so at once: exit 3 and one line naming the
    endpoint, though its timeout is ten minutes (a wait for it would outlast run's 60 s)."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "stale.sock"))  # bound, never listening: what a crash leaves
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # held, never listening: nobody else takes the port
    endpoint = {"no socket file": f"ipc://{workdir}/none.sock",
                "a stale socket file": f"ipc://{workdir}/stale.sock",
                "a closed port": f"tcp://127.0.0.1:{closed.getsockname()[1]}"}[where]
    try:
        out = run(*command, "--endpoint", endpoint, "--timeout", "600", timeout=60)
    finally:
        stale.close()
        closed.close()
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert out.stderr.strip().endswith("is the agent running?") and endpoint in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the command as another user")
def test_a_socket_this_user_may_not_use_is_said_at_once(agent):
    """The agent's ipc socket is its own user's (0600): another user's command says so at
    once, exit 3, instead of ZeroMQ retrying in silence for its whole timeout."""
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          str(HOSTAGENT), "call", "Host.ping", "--endpoint",
                          agent.rpc_endpoint, "--timeout", "600"],
                         capture_output=True, text=True, timeout=60,
                         env=clean_env(HOME="/nonexistent"))
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "Permission denied" in out.stderr and agent.rpc_endpoint in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_no_answer_exit_3_within_the_timeout(make_agent):
    """Something listens where the agent's config says, but never answers (a socket that
    accepts and stays mute): the command waits its --timeout, then exits 3."""
    never = make_agent("never", start=False)
    never.run_dir.mkdir(parents=True)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(never.run_dir / "rpc.sock"))
    mute.listen()
    started = time.monotonic()
    try:
        out = call(never, "Host.ping", "--timeout", "0.5", timeout=20)
    finally:
        mute.close()
    elapsed = time.monotonic() - started
    assert out.returncode == 3 and "is the agent running" in out.stderr, out.stderr
    assert "no response within 0.5 s" in out.stderr and "Traceback" not in out.stderr
    assert elapsed < 10, elapsed  # far below the 30 s default: --timeout was obeyed


def test_events_prints_json_lines(agent, processes):
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    processes.append(proc)
    lines = LineReader(proc.stdout)
    client = agent.client()
    seen = None
    for n in range(100):  # slow joiner: until a task of ours shows up on its stdout
        assert proc.poll() is None, proc.stderr.read()
        client.call("Debug.sleep", {"seconds": 0}, id=f"cli{n}")
        deadline = time.monotonic() + 0.3
        while (line := lines.readline(max(0.0, deadline - time.monotonic()))) is not None:
            ev = json.loads(line)
            assert ev["jsonrpc"] == "2.0" and "id" not in ev
            if ev["method"] == "Task.state" and ev["params"]["task"]["id"].startswith("cli"):
                seen = ev
                break
        if seen:
            break
    assert seen, "no Task.state line from `hostagent events`"
    assert seen["params"]["boot_id"] == agent.call("Host.getCapabilities")["boot_id"]
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a quiet exit 0
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read().decode()


def test_events_reader_gone_is_a_quiet_exit(agent, processes):
    """`hostagent events | head -1`: once the reader leaves it exits 0, no traceback."""
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    processes.append(proc)
    lines = LineReader(proc.stdout)
    client = agent.client()
    for n in range(100):
        client.call("Host.ping")
        if lines.readline(0.3) is not None:
            break
    else:
        raise AssertionError("no line from `hostagent events`")
    proc.stdout.close()
    # Each ping is one more event for it to write: the next write meets the closed pipe.
    wait_for(lambda: client.call("Host.ping") and proc.poll() is not None, 10,
             what="hostagent events to exit once its reader left")
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read().decode()


def test_events_topic_filter(agent, processes):
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "events",
                             "Task.progress"], stdout=subprocess.PIPE, env=clean_env())
    processes.append(proc)
    lines = LineReader(proc.stdout)
    client = agent.client()
    for n in range(100):
        client.call("Debug.sleep", {"seconds": 0}, id=f"f{n}")
        line = lines.readline(0.3)
        if line is not None:
            break
    assert line is not None, "no line from `hostagent events Task.progress`"
    client.call("Host.ping")
    client.call("Debug.sleep", {"seconds": 0}, id="final")
    methods = set()
    while True:
        ev = json.loads(lines.readline(10) or "null")
        assert ev is not None, "the last task's progress never arrived"
        methods.add(ev["method"])
        if ev["params"]["taskID"] == "final":
            break
    assert methods == {"Task.progress"}


@pytest.mark.parametrize("toml, word", [("bogus = 1\n", "'bogus'"),
                                        ("[rpc]\nendpoint = []\n", "'rpc.endpoint'")])
def test_serve_refuses_an_unknown_key(workdir, toml, word):
    cfg = workdir / "bad.toml"
    cfg.write_text(f'run_dir = "{workdir}/run"\n' + toml)
    out = run("--config", str(cfg), "serve", timeout=30)
    assert out.returncode == 2
    assert f"unknown key {word}" in out.stderr and "Traceback" not in out.stderr
    assert not (workdir / "run").exists()  # refused before doing anything


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_and_call_on_the_embedded_default(processes):
    ports = (configmod.DEFAULT_RPC_PORT, configmod.DEFAULT_EVENTS_PORT)
    busy = [p for p in ports if not port_free(p)]
    if busy:
        pytest.skip(f"the embedded default's port(s) {busy} are in use on 127.0.0.1")
    runtime = short_tmpdir("xdg-")
    env = clean_env(XDG_RUNTIME_DIR=str(runtime))
    run_dir = runtime / "hostagent"
    log_path = runtime / "serve.log"  # a file, not a pipe nobody drains while it serves
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(HOSTAGENT), "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    processes.append(proc)
    client = Client(f"ipc://{run_dir}/rpc.sock", timeout=0.5)
    try:
        def ready():
            if proc.poll() is not None:
                err = log_path.read_text()
                if "Address already in use" in err:
                    pytest.skip(f"a default port was taken as the agent started: {err[-300:]}")
                raise AssertionError(f"hostagent serve exited {proc.returncode}: {err[-2000:]}")
            try:
                return client.call("Host.ping") is True
            except CallError as exc:
                assert exc.name == "RecoveryInProgress", exc
            except Exception:
                return False
        wait_for(ready, 30, what="the default agent to serve")
        endpoints = json.loads((run_dir / "endpoints.json").read_text())
        assert endpoints["pid"] == proc.pid
        assert endpoints["rpc"][0] == f"tcp://127.0.0.1:{configmod.DEFAULT_RPC_PORT}"

        out = run("call", "Host.ping", env=env)
        assert (out.returncode, out.stdout.strip()) == (0, "true"), out.stderr
        caps = json.loads(run("call", "Host.getCapabilities", env=env).stdout)
        assert caps["host_id"] == socket.gethostname()
        assert not [m for m in caps["methods"] if m["name"].startswith("Debug.")]
    finally:
        client.close()
        proc.kill()
        proc.wait(10)
        marker = str(run_dir)
        wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                              if "workers.forkserver" in (p.info["cmdline"] or [])
                              and marker in (p.info["cmdline"] or [])],
                 10, what="the default agent's fork server to die with it")
        cleanup_dir(runtime)


BAD_INPUTS = {  # what a person mistypes: each a line and exit 2, never a traceback or a hang
    "endpoint-garbage": (["status", "--endpoint", "garbage"], {}, None),
    "endpoint-port": (["call", "Host.ping", "--endpoint", "tcp://127.0.0.1:notaport"], {}, None),
    "endpoint-empty-ipc": (["tasks", "--endpoint", "ipc://"], {}, None),
    "events-endpoint": (["watch", "--events-endpoint", "garbage"], {}, None),
    "events-tool-endpoint": (["events", "--endpoint", "tcp://:5671"], {}, None),
    "env-endpoint": (["call", "Host.ping"], {"HOSTAGENT_ENDPOINT": "garbage"}, None),
    "timeout-huge": (["status", "--timeout", "1e400"], {}, None),
    "timeout-negative": (["status", "--timeout", "-1"], {}, None),
    "timeout-nan": (["call", "Host.ping", "--timeout", "nan"], {}, None),
    "timeout-zero": (["wait", "t1", "--timeout", "0"], {}, None),
    "client-config-endpoint": (["status"], {}, b'endpoint = "garbage"\n'),
    "client-config-timeout": (["status"], {}, b"timeout = -1\n"),
    "client-config-not-utf8": (["status"], {}, b'endpoint = "\xff\xfe"\n'),
    "client-config-not-toml": (["call", "Host.ping"], {}, b"\x00\x01 = = =\n"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(tmp_path, name):
    args, env, client_config = BAD_INPUTS[name]
    extra = dict(env)
    if client_config is not None:
        path = tmp_path / "client.toml"
        path.write_bytes(client_config)
        extra["HOSTAGENT_CLIENT_CONFIG"] = str(path)
    out = run(*args, env=clean_env(**extra), timeout=20)  # a hang fails here
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    assert out.stderr.strip() and len(out.stderr.strip().splitlines()[-1]) < 400


@pytest.mark.parametrize("config", [b'host_id = "\xff"\n', b'[storage]\nsanlock_io_timeout = '
                                    b'1000000000\n', b'[rpc]\nendpoints = ["garbage"]\n',
                                    b"[tasks]\nretain_seconds = nan\n"],
                         ids=["not-utf8", "io-timeout", "rpc-endpoint", "nan"])
def test_a_bad_agent_config_is_one_line_and_exit_2(tmp_path, config):
    path = tmp_path / "agent.toml"
    path.write_bytes(config)
    for args in (["serve", "--config", str(path)], ["--config", str(path), "status"]):
        out = run(*args, timeout=20)
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.strip(), out.stderr
