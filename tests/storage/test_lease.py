"""Leases with real processes: OFD locks exclude across processes, die with their holder,
conflict within one process, and can be probed without being disturbed."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from agent.errors import LeaseHeld
from agent.storage.leases import local

# A child that takes commands one line at a time and answers each with one JSON line.
# "spin" makes it probe the lease in a tight loop, still answering commands in between.
CHILD = r"""
import json, select, sys
from agent.errors import LeaseHeld
from agent.storage.leases import local as lease
path, held, probes, spinning = sys.argv[1], None, 0, False
def reply(obj):
    print(json.dumps(obj), flush=True)
while True:
    if spinning:
        lease.probe(path)
        probes += 1
        if not select.select([sys.stdin], [], [], 0)[0]:
            continue
    line = sys.stdin.readline()
    if not line:
        break
    cmd, *arg = line.split()
    if cmd == "acquire":
        try:
            held = lease.acquire(path, {"host_id": "host-b", "task_id": arg[0]})
            reply({"ok": True})
        except LeaseHeld as e:
            reply({"ok": False, "holder": e.data["holder"]})
    elif cmd == "release":
        held.release()
        reply({"ok": True})
    elif cmd == "probe":
        reply(lease.probe(path))
    elif cmd == "spin":
        spinning = True
        reply({"ok": True})
    elif cmd == "count":
        reply({"probes": probes})
"""


def ask(child, line: str):
    child.send(line)
    return json.loads(child.expect())


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vol.lease")


def test_exclusion_across_processes(path, spawn):
    child = spawn(CHILD, path)
    assert ask(child, "acquire t-child") == {"ok": True}

    with pytest.raises(LeaseHeld) as e:
        local.acquire(path, {"host_id": "host-a", "task_id": "t-parent"})
    holder = e.value.data["holder"]
    assert holder["live"] is True
    assert (holder["pid"], holder["host_id"], holder["task_id"]) == (child.pid, "host-b", "t-child")

    assert ask(child, "release") == {"ok": True}
    with local.acquire(path, {"host_id": "host-a", "task_id": "t-parent"}):
        answer = ask(child, "acquire t-child2")
        assert answer["ok"] is False
        assert answer["holder"]["pid"] == os.getpid()
        assert answer["holder"]["task_id"] == "t-parent"
    assert ask(child, "acquire t-child3") == {"ok": True}


def test_holder_killed_with_sigkill_frees_the_lease(path, spawn):
    child = spawn(CHILD, path)
    assert ask(child, "acquire t-doomed") == {"ok": True}
    with pytest.raises(LeaseHeld):
        local.acquire(path, {"host_id": "host-a"})
    assert local.probe(path)["live"] is True

    os.kill(child.pid, signal.SIGKILL)
    child.proc.wait(timeout=30)
    assert child.proc.returncode == -signal.SIGKILL

    # The kernel dropped the lock when the process died; the record of who held it remains.
    after = local.probe(path)
    assert after["live"] is False
    assert (after["pid"], after["task_id"]) == (child.pid, "t-doomed")
    with local.acquire(path, {"host_id": "host-a", "task_id": "t-next"}) as held:
        assert held.held
        assert local.probe(path)["task_id"] == "t-next"


def test_probe_reports_a_holder_in_another_process(path, spawn):
    child = spawn(CHILD, path)
    assert ask(child, "probe") is None  # no lease file yet
    with local.acquire(path, {"host_id": "host-a", "task_id": "t1", "extra": 7}):
        seen = ask(child, "probe")
        assert seen["live"] is True
        assert (seen["pid"], seen["host_id"], seen["task_id"], seen["extra"]) == \
            (os.getpid(), "host-a", "t1", 7)
        assert seen["since"] <= time.time()
    assert ask(child, "probe")["live"] is False


def test_probes_and_other_fds_in_the_holders_process_do_not_drop_the_lease(path, spawn):
    held = local.acquire(path, {"host_id": "host-a"})
    for _ in range(50):
        assert local.probe(path)["live"] is True
    # Opening and closing the file again would silently drop a classic POSIX lock.
    with open(path, "rb") as f:
        f.read()
    os.close(os.open(path, os.O_RDWR))
    child = spawn(CHILD, path)
    assert ask(child, "acquire t-thief")["ok"] is False
    held.release()
    assert ask(child, "acquire t-thief") == {"ok": True}


def test_a_probing_process_never_makes_an_acquirer_fail(path, spawn):
    local.acquire(path, {}).release()  # the file exists, so the child really probes
    child = spawn(CHILD, path)
    assert ask(child, "spin") == {"ok": True}
    before = ask(child, "count")["probes"]
    for i in range(300):
        local.acquire(path, {"task_id": f"t{i}"}).release()
    assert ask(child, "count")["probes"] > before  # the probes really ran meanwhile


def test_second_acquire_in_the_same_process_is_refused(path):
    first = local.acquire(path, {"host_id": "host-a", "task_id": "t1"})
    with pytest.raises(LeaseHeld) as e:
        local.acquire(path, {"host_id": "host-a", "task_id": "t2"})
    assert e.value.data["holder"]["task_id"] == "t1"
    assert first.held  # the refused attempt closed its own fd, not the holder's
    first.release()
    first.release()  # idempotent
    assert not first.held
    local.acquire(path, {"task_id": "t3"}).release()


def test_holder_record_is_written_to_the_file(path):
    with local.acquire(path, {"host_id": "h", "task_id": "t", "live": "spoof", "x": 1}) as held:
        with open(path) as f:
            record = json.load(f)
        assert record == held.holder
        assert record["pid"] == os.getpid() and record["x"] == 1 and "live" not in record
        assert stat_mode(path) == 0o600


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("content", [b"", b"\x00\xffgarbage", b"[1, 2]", b'{"pid": 1'])
def test_probe_tolerates_empty_or_garbage_content(path, content):
    with open(path, "wb") as f:
        f.write(content)
    assert local.probe(path) == {"live": False}


def test_probe_of_missing_file_is_none(path):
    assert local.probe(path) is None


def test_stale_tmp_areas_are_swept_and_nothing_else(tmp_path):
    """sanlock_leases.sweep_stale: the tmp files a killed area-maker left, once old; never a
    fresh one (another host may be writing it), nor anything not of its pattern."""
    import time
    import uuid

    from agent.storage.leases.sanlock import STALE_SECONDS, sweep_stale
    now = time.time()
    token = uuid.uuid4().hex
    names = {"old": f"v1.sanlock.{token}.tmp", "fresh": f"v2.sanlock.{uuid.uuid4().hex}.tmp",
             "area": "v1.sanlock", "other_tmp": "notes.tmp", "short": "v3.sanlock.abc.tmp",
             "upper": f"v4.sanlock.{token.upper()}.tmp"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "fresh":
            os.utime(tmp_path / name, (now - STALE_SECONDS - 1,) * 2)
    assert sweep_stale(str(tmp_path), now) == [names["old"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for k, n in names.items() if k != "old")
    assert sweep_stale(str(tmp_path / "missing"), now) == []
