"""agent.supervisor.sdnotify against a real datagram socket, with the test playing systemd."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.supervisor import sdnotify

REPO = Path(__file__).resolve().parents[2]
RECV_TIMEOUT = 5.0


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    # Each test starts without an inherited socket or systemd environment,
    # whatever the process running pytest was started with.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    sdnotify._reset()
    yield
    sdnotify._reset()


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT)
    return sock


@pytest.fixture
def systemd_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = _listener(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_sends_one_exact_datagram(systemd_socket):
    assert sdnotify.notify("READY=1", "STATUS=x") is True
    assert systemd_socket.recv(4096) == b"READY=1\nSTATUS=x"


def test_each_call_is_its_own_datagram(systemd_socket):
    assert sdnotify.notify("WATCHDOG=1")
    assert sdnotify.notify("STATUS=scanning")
    assert systemd_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd_socket.recv(4096) == b"STATUS=scanning"


def test_abstract_namespace_address(monkeypatch):
    name = f"hostagent-test-{uuid.uuid4().hex}"
    sock = _listener(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=x") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=x"
    finally:
        sock.close()


def test_unset_socket_is_a_no_op(monkeypatch):
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False
    assert sdnotify._sock is None


def test_vanished_socket_returns_false(systemd_socket, tmp_path):
    assert sdnotify.notify("READY=1")
    systemd_socket.close()
    (tmp_path / "notify.sock").unlink()
    assert sdnotify.notify("WATCHDOG=1") is False
    assert sdnotify.notify("WATCHDOG=1") is False


def test_recovers_when_socket_comes_back(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert sdnotify.notify("READY=1") is False
    sock = _listener(str(path))
    try:
        assert sdnotify.notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_forked_child_uses_its_own_socket(systemd_socket):
    assert sdnotify.notify("STATUS=parent")
    assert systemd_socket.recv(4096) == b"STATUS=parent"
    parent_sock = sdnotify._sock
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        ok = sdnotify.notify("STATUS=child")
        fresh = sdnotify._sock is not parent_sock and sdnotify._sock_pid == os.getpid()
        os._exit(0 if ok and fresh else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert systemd_socket.recv(4096) == b"STATUS=child"
    assert sdnotify._sock is parent_sock


def test_real_child_process_notifies(tmp_path):
    path = tmp_path / "notify.sock"
    sock = _listener(str(path))
    # Ask for the sender's credentials the way systemd does, to check that
    # the datagram comes from the child itself (what NotifyAccess=main needs).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "from agent.supervisor.sdnotify import notify; notify('READY=1')"],
            cwd=REPO,
            env=env,
        )
        try:
            data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        finally:
            assert proc.wait(timeout=30) == 0
    finally:
        sock.close()
    assert data == b"READY=1"
    creds = [d for level, kind, d in ancdata
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds, "no SCM_CREDENTIALS received"
    sender_pid, _, _ = struct.unpack("3i", creds[0][: struct.calcsize("3i")])
    assert sender_pid == proc.pid


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("10000000", None, 10.0),
        ("5000000", "self", 5.0),
        ("2500", None, 0.0025),
        ("10000000", "other", None),
        ("0", None, None),
        ("-1", None, None),
        ("soon", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() == expected
