"""JSON-RPC 2.0 to the letter, against a running agent over real ZeroMQ sockets."""

import json
import os
import stat

import pytest
import zmq

from tests.support.harness import recv_json, wait_for


@pytest.fixture
def raw(agent):
    """A DEALER socket: send bytes, read one response."""
    sock = agent.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(agent.rpc_endpoint)
    agent.clients.append(sock)

    def roundtrip(body: bytes, timeout=5.0):
        sock.send(body)
        return recv_json(sock, timeout)
    roundtrip.sock = sock
    return roundtrip


def assert_error(resp, code, id_=None):
    assert resp["jsonrpc"] == "2.0"
    assert resp["id"] == id_
    assert resp["error"]["code"] == code, resp
    assert isinstance(resp["error"]["message"], str)
    assert resp["error"]["data"]["name"]
    assert "result" not in resp


@pytest.mark.parametrize("body", [
    b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
    b"\xff\xfe not utf-8",
    b'{"jsonrpc": "2.0", "method": "Host.ping", "id": NaN}',
    b'{"jsonrpc": "2.0", "method": "Host.ping", "id": 1, "params": [Infinity]}',
    b"[" * 100000 + b"]" * 100000,
    b"",
])
def test_parse_error_has_id_null(raw, body):
    assert_error(raw(body), -32700)


@pytest.mark.parametrize("obj,code,id_", [
    (1, -32600, None),
    ("x", -32600, None),
    ({"jsonrpc": "1.0", "method": "Host.ping", "id": 1}, -32600, 1),
    ({"method": "Host.ping", "id": 1}, -32600, 1),
    ({"jsonrpc": "2.0", "method": 1, "params": "bar"}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": "bar", "id": 2}, -32600, 2),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": 1.5}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": True}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": None}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": {"a": 1}}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": "x" * 129}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": ""}, -32600, None),
    ({"jsonrpc": "2.0", "method": "Host.ping", "id": int("9" * 2000)}, -32600, None),
    ({"jsonrpc": "2.0", "method": "No.such", "id": 3}, -32601, 3),
    ({"jsonrpc": "2.0", "method": "rpc.discover", "id": 3}, -32601, 3),
    ({"jsonrpc": "2.0", "method": "Debug.sleep", "id": 4}, -32602, 4),
    ({"jsonrpc": "2.0", "method": "Debug.sleep", "params": {"seconds": "1"}, "id": 4}, -32602, 4),
    ({"jsonrpc": "2.0", "method": "Debug.sleep", "params": {"seconds": -1}, "id": 4}, -32602, 4),
    ({"jsonrpc": "2.0", "method": "Debug.sleep", "params": {"seconds": 0, "x": 1}, "id": 4},
     -32602, 4),
    ({"jsonrpc": "2.0", "method": "Debug.sleep", "params": [0, False, None, 9], "id": 4},
     -32602, 4),
    ({"jsonrpc": "2.0", "method": "Task.getStatus", "params": {"taskID": []}, "id": 5},
     -32602, 5),
])
def test_invalid_requests(raw, obj, code, id_):
    assert_error(raw(json.dumps(obj).encode()), code, id_)


def test_max_length_id_accepted(raw):
    resp = raw(json.dumps({"jsonrpc": "2.0", "method": "Host.ping", "id": "x" * 128}).encode())
    assert resp == {"jsonrpc": "2.0", "id": "x" * 128, "result": True}


def test_positional_params(raw):
    resp = raw(b'{"jsonrpc": "2.0", "method": "Debug.sleep", "params": [0], "id": "p"}')
    assert resp["result"] == {"slept": 0}


def test_internal_error_leaks_no_traceback(raw, agent):
    resp = raw(b'{"jsonrpc": "2.0", "method": "Debug.crash", "id": 9}')
    assert_error(resp, -32603, 9)
    text = json.dumps(resp)
    assert "Traceback" not in text and "hunter2" not in text and "RuntimeError" not in text
    assert "hunter2" in agent.log()  # the operator still gets the whole story


def test_batches(raw):
    assert_error(raw(b"[]"), -32600)
    resp = raw(b"[1]")
    assert isinstance(resp, list) and len(resp) == 1
    assert_error(resp[0], -32600)
    resp = raw(b"[1, 2, 3]")
    assert len(resp) == 3 and all(r["error"]["code"] == -32600 for r in resp)
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping", "id": "1"},
        {"jsonrpc": "2.0", "method": "Host.ping"},  # a notification: no answer for it
        {"jsonrpc": "2.0", "method": "Debug.sleep", "params": {"seconds": 0.2}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
    ]
    resp = raw(json.dumps(batch).encode())
    by_id = {r["id"]: r for r in resp}
    assert len(resp) == 4
    assert by_id["1"]["result"] is True
    assert by_id["2"]["result"] == {"slept": 0.2}
    assert by_id[None]["error"]["code"] == -32600
    assert by_id["5"]["error"]["code"] == -32601


def test_batch_of_notifications_is_not_answered(raw):
    raw.sock.send(b'[{"jsonrpc": "2.0", "method": "Host.ping"}, '
                  b'{"jsonrpc": "2.0", "method": "Host.ping", "params": [7]}]')
    raw.sock.send(b'{"jsonrpc": "2.0", "method": "Host.ping"}')
    # The next thing on the socket is the answer to this request, nothing before it.
    assert raw(b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "after"}')["id"] == "after"


def test_batch_too_long(make_agent):
    agent = make_agent(rpc={"max_batch_length": 3})
    c = agent.client()
    c.send_raw(json.dumps([{"jsonrpc": "2.0", "method": "Host.ping", "id": i}
                           for i in range(4)]).encode())
    assert_error(c.recv(), -32600)


def test_notification_runs_as_a_task_of_the_agents_naming(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 0}, notification=True)

    def done_sleeps():
        sent = c.send("Task.getAll", {"states": ["done"]})
        resp = c.recv()
        assert resp["id"] == sent  # never an answer to the notification
        return [t for t in resp["result"] if t["method"] == "Debug.sleep"]
    done = wait_for(done_sleeps)
    assert done[0]["id"].startswith("notification:")
    assert done[0]["result"] == {"slept": 0}


def test_req_client(agent):
    sock = agent.ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(agent.rpc_endpoint)
    agent.clients.append(sock)
    sock.send(b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "req"}')
    assert recv_json(sock) == {"jsonrpc": "2.0", "id": "req", "result": True}


def test_oversized_message_never_reaches_parser(make_agent):
    agent = make_agent(rpc={"max_message_bytes": 1024})
    big = agent.client(timeout=1.0)
    big.send_raw(b'{"jsonrpc": "2.0", "method": "Host.ping", "id": "big", "params": ["'
                 + b"x" * 4096 + b'"]}')
    other = agent.client()
    assert other.call("Host.ping") is True
    from agent.client import Timeout
    with pytest.raises(Timeout):
        big.recv(timeout=0.5)
    assert '"big"' not in agent.log()


def test_tcp_endpoint_and_ipc_mode(make_agent):
    agent = make_agent(rpc={"endpoints": ["ipc://{run_dir}/rpc.sock", "tcp://127.0.0.1:*"]})
    from agent.client import Client, endpoints_of
    eps = endpoints_of(agent.run_dir)
    tcp = [e for e in eps["rpc"] if e.startswith("tcp://")][0]
    with Client(tcp) as c:
        assert c.call("Host.ping") is True
    mode = stat.S_IMODE(os.stat(agent.run_dir / "rpc.sock").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(agent.run_dir / "workers.sock").st_mode) == 0o600


def test_stale_ipc_socket_does_not_stop_start(make_agent):
    agent = make_agent()
    agent.kill()  # SIGKILL: the socket files stay behind
    assert (agent.run_dir / "rpc.sock").exists()
    agent.start()
    assert agent.call("Host.ping") is True


def test_second_agent_on_same_run_dir_refuses(make_agent, workdir):
    agent = make_agent()
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "agent", "--config", str(agent.config_path),
                          "serve"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "another agent is running" in out.stderr
    assert agent.call("Host.ping") is True
