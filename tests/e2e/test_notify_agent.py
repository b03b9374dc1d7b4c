"""The agent's side of sd_notify, with the test playing systemd on a datagram socket."""

import socket

import pytest

from tests.support.harness import cleanup_dir, short_tmpdir

RECV_TIMEOUT = 10.0


@pytest.fixture
def notify_socket():
    path = short_tmpdir("ntf-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path / "notify.sock"))
    sock.settimeout(RECV_TIMEOUT)
    yield sock
    sock.close()
    cleanup_dir(path)


def fields(datagram: bytes) -> dict:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def start(make_agent, notify_socket, **env):
    agent = make_agent(start=False)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        agent.env.pop(var, None)  # whatever the shell running pytest was started with
    return agent.start(env={"NOTIFY_SOCKET": notify_socket.getsockname(), **env})


def test_ready_once_serving(make_agent, notify_socket):
    agent = start(make_agent, notify_socket)
    first = fields(notify_socket.recv(4096))
    assert first["READY"] == "1"
    boot_id = agent.call("Host.getCapabilities")["boot_id"]
    assert first["STATUS"] == f"serving, boot {boot_id}"
    # No watchdog asked for: nothing else is sent however often the loop turns.
    for _ in range(20):
        assert agent.call("Host.ping") is True
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


def test_watchdog_pings_after_ready(make_agent, notify_socket):
    agent = start(make_agent, notify_socket, WATCHDOG_USEC="200000")
    got = [fields(notify_socket.recv(4096))]
    assert got[0]["READY"] == "1"  # nothing before READY=1
    while len(got) < 3:
        got.append(fields(notify_socket.recv(4096)))  # idle agent: the loop still ticks
    assert got[1:] == [{"WATCHDOG": "1"}, {"WATCHDOG": "1"}]
    assert agent.call("Host.ping") is True


def test_watchdog_for_another_pid_is_ignored(make_agent, notify_socket):
    """WATCHDOG_PID names the watched process; a stranger's watchdog is not ours to kick."""
    agent = start(make_agent, notify_socket, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    assert fields(notify_socket.recv(4096))["READY"] == "1"
    for _ in range(20):
        assert agent.call("Host.ping") is True
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)
