"""Classes 8, 12 and 13: who may speak to the agent, what it starts with, and how.

- Only the agent's own workers may speak on workers.sock: a forged peer (any process of the
  agent's user can connect to it) is ignored and counted, whatever it sends, and a malformed
  message from a real worker costs that worker, never the agent.
- CURVE secrets readable, or authorized keys writable, by others: refused at start, naming
  the file, as ssh does.
- The shipped unit's own ExecStart line starts an agent."""

import json
import os
import re
import subprocess
import sys
import uuid

import pytest
import zmq

from agent.wire.security import keygen
from tests.support.harness import REPO, events_until, task_state, wait_for

pytestmark = pytest.mark.timeout(90)


def forged(agent, identity: bytes, frames):
    sock = agent.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(f"ipc://{agent.run_dir}/workers.sock")
    agent.clients.append(sock)
    for msg in frames:
        sock.send_multipart(msg if isinstance(msg, list) else [msg])
    return sock


LIES = [
    json.dumps({"t": "event", "topic": "Image.copy", "params": {"state": "done",
                                                                 "volumeID": "forged"}}).encode(),
    json.dumps({"t": "event", "topic": ["a", "list"], "params": {}}).encode(),
    json.dumps({"t": "event", "topic": "Operation.state", "params": "x"}).encode(),
    json.dumps({"t": "result", "result": {"forged": True}}).encode(),
    json.dumps({"t": "hello", "pid": 1}).encode(),
    json.dumps({"t": "error", "error": ["x"]}).encode(),
    json.dumps({"t": ["hello"]}).encode(),
    json.dumps([1, 2]).encode(), b"\xff\xfe", b"[" * 100000, b"",
    [b"a", b"b", b"c"],
]


def test_forged_workers_and_operations_are_not_heard(agent, scale):
    events = agent.subscribe("Image.copy", "Operation.state", "Task.state")
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 2}, id="real")
    wait_for(lambda: task_state(agent, "real") == "running", 10)
    identities = [b"w1", b"w2", b"w1-" + b"0" * 32, b"op:" + str(uuid.uuid4()).encode(),
                  b"op:" + str(uuid.uuid4()).encode() + b":" + b"0" * 32, b"op:", b"\xff"]
    for identity in identities:
        forged(agent, identity, LIES * scale)
    # The real task ends as it would have: its worker's messages were never mixed up.
    got = events_until(events, lambda e: e["method"] == "Task.state"
                       and e["params"]["task"]["id"] == "real"
                       and e["params"]["task"]["state"] == "done", 20)
    assert not [e for e in got if e["method"] != "Task.state"], got  # no forged event
    limits = agent.call("Host.getStats")["limits"]["workers"]
    assert limits["strangers"] >= len(identities) and limits["misbehaved"] == 0
    assert agent.call("Host.ping") is True


def test_a_real_worker_that_breaks_the_protocol_costs_only_itself(agent):
    """The seam: a listener bug is how a real worker's bad report looks from inside."""
    assert agent.call("Debug.fault", {"where": "listener"})
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 1}, id="victim")
    c.send("Debug.sleep", {"seconds": 1}, id="bystander")
    wait_for(lambda: task_state(agent, "victim") == "failed"
             or task_state(agent, "bystander") == "failed", 20)
    wait_for(lambda: {task_state(agent, "victim"), task_state(agent, "bystander")}
             == {"failed", "done"}, 20)
    assert agent.call("Host.getStats")["limits"]["workers"]["misbehaved"] == 1


@pytest.fixture
def keys(workdir):
    server = keygen(str(workdir / "server"), "server")
    keygen(str(workdir / "authorized"), "client")
    return {"secret": server[1], "dir": str(workdir / "authorized"),
            "client_pub": str(workdir / "authorized" / "client.key")}


@pytest.mark.parametrize("loose", ["secret-0644", "secret-0640", "dir-0777", "dir-0775",
                                   "key-0666"])
def test_loose_key_modes_are_refused_naming_the_file(make_agent, keys, loose):
    what, mode = loose.split("-")
    path = {"secret": keys["secret"], "dir": keys["dir"], "key": keys["client_pub"]}[what]
    os.chmod(path, int(mode, 8))
    agent = make_agent(rpc={"endpoints": ["tcp://127.0.0.1:*"]},
                       events={"endpoints": ["tcp://127.0.0.1:*"]},
                       security={"server_secret_key": keys["secret"],
                                 "authorized_keys_dir": keys["dir"]}, start=False)
    agent.start(wait=False)
    assert agent.proc.wait(20) == 2
    assert path in agent.log() and "security:" in agent.log()


def test_tight_key_modes_start(make_agent, keys):
    agent = make_agent(rpc={"endpoints": ["tcp://127.0.0.1:*"]},
                       events={"endpoints": ["tcp://127.0.0.1:*"]},
                       security={"server_secret_key": keys["secret"],
                                 "authorized_keys_dir": keys["dir"]}, start=False)
    agent.start(wait=False)
    wait_for(lambda: (agent.run_dir / "endpoints.json").exists(), 20)
    assert agent.proc.poll() is None


def test_the_units_own_execstart_line_starts_the_agent(make_agent, workdir):
    """Run systemd/hostagent.service's ExecStart as written, with only the binary's and the
    config's paths changed to this checkout's: argument order and all."""
    unit = (REPO / "systemd" / "hostagent.service").read_text()
    (line,) = re.findall(r"(?m)^ExecStart=(.*)$", unit)
    argv = line.split()
    assert argv[0] == "/usr/local/bin/hostagent"
    agent = make_agent(start=False)
    argv = [sys.executable, "-m", "agent", *[str(agent.config_path)
                                             if a == "/etc/hostagent/hostagent.toml" else a
                                             for a in argv[1:]]]
    log = open(agent.log_path, "ab")
    agent.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log)
    log.close()
    agent.wait_ready()
    assert agent.call("Host.ping") is True
