"""Authenticated transport: CURVE on the RPC and events sockets with a ZAP handler.

The stranger test is the one that catches a CURVE server without a working ZAP handler:
libzmq then admits any client key that knows the server's public key.
"""

import json
import socket
import subprocess
import sys

import pytest
import zmq

from agent.client import Client, Timeout, endpoints_of
from agent.client.curve import make_client
from agent.wire.security import keygen
from tests.support.harness import REPO, recv_json, wait_for


@pytest.fixture
def keys(workdir):
    k = workdir / "keys"
    server = keygen(str(k / "server"), "server")
    client = keygen(str(k / "authorized"), "client")  # its .key is authorized
    stranger = keygen(str(k / "strangers"), "stranger")
    return {"server": server, "client": client, "stranger": stranger,
            "authorized": str(k / "authorized")}


@pytest.fixture
def secure(make_agent, keys):
    agent = make_agent(
        rpc={"endpoints": ["tcp://127.0.0.1:*"]}, events={"endpoints": ["tcp://127.0.0.1:*"]},
        security={"server_secret_key": keys["server"][1],
                  "authorized_keys_dir": keys["authorized"]}, start=False)
    agent.start(wait=False)
    eps = wait_for(lambda: (agent.run_dir / "endpoints.json").exists() and
                   endpoints_of(agent.run_dir))
    agent.rpc_ep, agent.events_ep = eps["rpc"][0], eps["events"][0]
    return agent


def client(agent, keys, who, timeout=1.0):
    kw = {} if who is None else {"client_key": keys[who][1], "server_key": keys["server"][0]}
    c = Client(agent.rpc_ep, ctx=agent.ctx, timeout=timeout, **kw)
    agent.clients.append(c)
    return c


def test_authorized_client_is_served(secure, keys):
    c = client(secure, keys, "client", timeout=10)
    wait_for(lambda: _ping(c), 30, what="the agent ready")


def _ping(c):
    try:
        return c.call("Host.ping", timeout=0.5) is True
    except Exception:
        return False


@pytest.mark.parametrize("who", ["stranger", None])
def test_unknown_key_and_null_client_fail_the_handshake(secure, keys, who):
    ok = client(secure, keys, "client", timeout=10)
    wait_for(lambda: _ping(ok), 30, what="the agent ready")
    bad = client(secure, keys, who)
    with pytest.raises(Timeout):
        bad.call("Host.ping", timeout=1.0)
    assert ok.call("Host.ping") is True


def test_raw_tcp_gets_nothing_and_harms_nothing(secure, keys):
    ok = client(secure, keys, "client", timeout=10)
    wait_for(lambda: _ping(ok), 30, what="the agent ready")
    host, port = secure.rpc_ep[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b'{"jsonrpc": "2.0", "method": "Host.ping", "id": 1}\n' * 10)
        got = b""
        try:
            while chunk := raw.recv(4096):  # the server's greeting, then it hangs up
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert b"result" not in got
    assert ok.call("Host.ping") is True


def test_events_only_to_authorized_subscribers(secure, keys):
    ok = client(secure, keys, "client", timeout=10)
    wait_for(lambda: _ping(ok), 30, what="the agent ready")
    subs = {}
    for who in ("client", "stranger"):
        s = secure.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        make_client(s, keys[who][1], keys["server"][0])
        s.setsockopt(zmq.SUBSCRIBE, b"Task.state")
        s.connect(secure.events_ep)
        secure.clients.append(s)
        subs[who] = s
    wait_for(lambda: ok.call("Host.ping") and subs["client"].poll(50), 20,
             what="an event at the authorized subscriber")
    assert recv_json(subs["client"])["method"] == "Task.state"
    ok.call("Host.ping")
    recv_json(subs["client"])
    assert not subs["stranger"].poll(500)


def test_cli_with_keys(secure, keys):
    ok = client(secure, keys, "client", timeout=10)
    wait_for(lambda: _ping(ok), 30, what="the agent ready")
    base = [sys.executable, "-m", "agent", "call", "Host.ping", "--endpoint", secure.rpc_ep,
            "--timeout", "5"]
    out = subprocess.run(base + ["--client-key", keys["client"][1],
                                 "--server-key", keys["server"][0]],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 0 and json.loads(out.stdout) is True, out.stderr
    out = subprocess.run(base[:-1] + ["1", "--client-key", keys["stranger"][1],
                                      "--server-key", keys["server"][0]],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 3
    out = subprocess.run(base + ["--client-key", keys["client"][1]],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2 and "both" in out.stderr


def test_half_a_security_config_is_refused(make_agent, keys):
    agent = make_agent(security={"server_secret_key": keys["server"][1]}, start=False)
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(agent.config_path),
                          "serve"], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2 and "authorized_keys_dir" in out.stderr
