"""Scrubs: operations that outlive their task and their agent, tracked on storage.

The scrub process is no worker of the agent: these tests kill agents under it, kill it under
agents, and read its status from a second agent attached to the same domain. Slow scrubs are
slow by their real throttle ([scrub] max_bytes_per_second), so kills land mid-scrub whatever
the machine; nothing waits on time, only on facts. Every scrub process a test leaves behind is
killed by the no_stray_scrubs fixture. Only the plain-child launcher runs here (launcher =
"spawn"); the systemd-run branch is checked for its command line, not run.
"""

import os
import signal
import sqlite3

import psutil
import pytest

from agent import config as configmod
from agent.client import CallError
from agent.errors import OperationFailed
from agent.storage import checksum
from agent.storage.copy import readback
from tests.support.harness import events_until, kill_all, wait_for
from tests.support.storage_flow import (
    MiB,
    block_checksum,
    cached_bytes,
    dst_for,
    make_source,
    new_id,
    recorded_checksum,
    sha256,
    sparse_extents,
    volume_path,
    wait_legal,
)
from workers.ops import operation as scrubops

SLOW = 6 * MiB  # bytes a second: the scrub below takes about 9 s
CRAWL = 1 * MiB  # a scrub that runs until it is stopped or killed


@pytest.fixture
def shared(workdir):
    return new_id(), str(workdir / "domain")


def scrub_processes(workdir) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "workers.scrubber" in cmd and any(str(workdir) in arg for arg in cmd):
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def no_stray_scrubs(workdir):
    """Scrub processes outlive agents by design: kill whatever a test left running."""
    yield
    kill_all(scrub_processes(workdir))


def scrub_agent(make_agent, shared, name="a", create=False, rate=0, start=True, **over):
    domain_id, path = shared
    over.setdefault("scrub", {"max_bytes_per_second": rate, "launcher": "spawn"})
    if create:
        agent = make_agent(name, **over)
        agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
        return agent
    return make_agent(name, start=start, storage={"domains": {domain_id: path}}, **over)


def start_scrub(agent, domain_id, operation_id=None, task_id=None):
    params = {"domainID": domain_id}
    if operation_id:
        params["operationID"] = operation_id
    return agent.client().call("StorageDomain.startScrub", params, id=task_id or new_id())


def operation(agent, domain_id, operation_id) -> dict | None:
    ops = agent.call("StorageDomain.getOperationStatuses", {"domainID": domain_id})
    assert ops["domainID"] == domain_id
    return next((o for o in ops["operations"] if o["operationID"] == operation_id), None)


def wait_state(agent, domain_id, operation_id, *states, timeout=60.0) -> dict:
    """The operation once it is in one of `states`; in an ended one, once its process is
    gone too (it holds the domain's scrub lease until it exits, after writing its end)."""
    def reached():
        o = operation(agent, domain_id, operation_id)
        if not o or o["state"] not in states:
            return None
        ended = o["state"] in ("COMPLETED", "FAILED")
        return o if not (ended and o.get("pid") and alive(o["pid"])) else None
    return wait_for(reached, timeout, interval=0.1,
                    what=f"operation {operation_id} {'/'.join(states)}")




def alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def error_of(call):
    with pytest.raises(CallError) as info:
        call()
    return info.value


SPARSE = [(0, MiB), (100 * MiB, 2 * MiB), (255 * MiB, MiB)]


def test_scrub_outlives_its_agent_and_is_read_from_another_host(make_agent, shared):
    a = scrub_agent(make_agent, shared, create=True, rate=SLOW)
    b = scrub_agent(make_agent, shared, "b")  # another host: own run dir and host_id
    vols = [make_source(a, shared[0], 48 * MiB),
            make_source(a, shared[0], 256 * MiB, SPARSE, seed=2)]
    op_id = new_id()
    started = start_scrub(a, shared[0], op_id, task_id="scrub1")
    assert started["operationID"] == op_id and started["state"] == "STARTED"
    assert started["host_id"] == "host-a" and started["task_id"] == "scrub1"
    assert started["launcher"] == "spawn" and alive(started["pid"])
    pid = started["pid"]
    assert "workers.forkserver" not in psutil.Process(pid).cmdline()
    wait_for(lambda: operation(a, shared[0], op_id)["progress"] > 0, 30, interval=0.1,
             what="the scrub's first progress write")

    a.kill(signal.SIGKILL)
    assert alive(pid), "the scrub died with the agent"
    seen = operation(b, shared[0], op_id)
    assert seen["state"] == "STARTED" and seen["host_id"] == "host-a" and seen["pid"] == pid
    a.start()  # the restarted agent kills leftover workers, never the scrub
    assert alive(pid) and operation(a, shared[0], op_id)["state"] == "STARTED"

    done = wait_state(b, shared[0], op_id, "COMPLETED", "FAILED", "UNKNOWN", "STOPPED")
    assert done["state"] == "COMPLETED", done
    assert done["progress"] == 100 and done["ended"] >= done["started"]
    result = done["result"]
    assert result["volumes_checked"] == 2 and result["recorded"] == 2
    assert result["mismatches"] == [] and result["skipped"] == 0
    assert result["bytes_read"] < 60 * MiB  # the sparse volume's holes were not read
    for vol in vols:
        assert recorded_checksum(shared[1], vol["volumeID"]) == \
            block_checksum(volume_path(b, vol))
    assert operation(a, shared[0], op_id) == done  # the same answer from either host


def test_a_flipped_byte_is_reported_and_the_record_kept(make_agent, shared):
    agent = scrub_agent(make_agent, shared, create=True)
    domain_id = shared[0]
    assert agent.call("StorageDomain.getOperationStatuses",
                      {"domainID": domain_id}) == {"domainID": domain_id, "operations": []}
    # A domain formatted before operations existed gets the table on its first scrub.
    conn = sqlite3.connect(f"{shared[1]}/metadata.db", isolation_level=None)
    conn.execute("DROP TABLE operations")
    conn.close()
    assert agent.call("StorageDomain.getOperationStatuses",
                      {"domainID": domain_id})["operations"] == []
    dense = make_source(agent, domain_id, 8 * MiB)
    sparse = make_source(agent, domain_id, 256 * MiB, SPARSE, seed=3)
    events = agent.subscribe("Operation.state", "Task.state")
    wait_for(lambda: agent.call("Host.ping") and events.poll(50), what="subscription live")

    first = start_scrub(agent, domain_id, task_id="first")
    done = wait_state(agent, domain_id, first["operationID"], "COMPLETED", "FAILED")
    assert done["result"]["recorded"] == 2 and done["result"]["mismatches"] == []
    got = [e for e in events_until(events, lambda e: e["method"] == "Operation.state"
                                   and e["params"]["state"] == "COMPLETED")
           if e["method"] == "Operation.state"]
    # STARTED is announced by the task only if the scrub had not ended when it answered (a
    # domain this small can be read before that: the answer then says COMPLETED).
    started = ["STARTED"] if first["state"] == "STARTED" else []
    assert [e["params"]["state"] for e in got] == started + ["COMPLETED"]
    assert got[-1]["params"]["operationID"] == first["operationID"]
    assert got[-1]["params"]["taskID"] == "first"  # published by the agent, for the task
    assert got[-1]["params"]["result"] == done["result"]

    expected = recorded_checksum(shared[1], sparse["volumeID"])
    assert expected == block_checksum(volume_path(agent, sparse))
    path = volume_path(agent, sparse)
    with open(path, "r+b") as f:
        f.seek(100 * MiB + 12345)
        byte = f.read(1)
        f.seek(100 * MiB + 12345)
        f.write(bytes([byte[0] ^ 0x01]))
    later = make_source(agent, domain_id, MiB, seed=4)  # seen for the first time next scrub
    older = make_source(agent, domain_id, 9 * MiB, seed=5)
    # Records of the kinds earlier versions wrote (whole-file SHA-256, block-structured
    # SHA-256) are still verified, each with its kind.
    legacy = "sha256:" + sha256(volume_path(agent, dense))
    legacy_blocks = block_checksum(volume_path(agent, older), "sha256-4m")
    conn = sqlite3.connect(f"{shared[1]}/metadata.db", isolation_level=None)
    for value, vol in ((legacy, dense), (legacy_blocks, older)):
        conn.execute("UPDATE volumes SET checksum = ? WHERE volume_id = ?",
                     [value, vol["volumeID"]])
    conn.close()

    for _ in range(2):  # reported every time, never silently accepted
        op = start_scrub(agent, domain_id)
        result = wait_state(agent, domain_id, op["operationID"], "COMPLETED", "FAILED")["result"]
        assert result["volumes_checked"] == 4
        assert result["mismatches"] == [{**sparse, "expected": expected,
                                         "found": block_checksum(path)}]
        assert recorded_checksum(shared[1], sparse["volumeID"]) == expected
    assert result["recorded"] == 0
    assert recorded_checksum(shared[1], dense["volumeID"]) == legacy
    assert recorded_checksum(shared[1], older["volumeID"]) == legacy_blocks
    assert recorded_checksum(shared[1], later["volumeID"]) == \
        block_checksum(volume_path(agent, later))


def test_a_killed_scrub_reads_unknown_and_a_new_one_can_start(make_agent, shared):
    agent = scrub_agent(make_agent, shared, create=True, rate=CRAWL)
    make_source(agent, shared[0], 64 * MiB)
    first = start_scrub(agent, shared[0])
    psutil.Process(first["pid"]).kill()
    lost = wait_state(agent, shared[0], first["operationID"], "UNKNOWN", timeout=20)
    assert lost["pid"] == first["pid"] and lost["ended"] is None
    err = error_of(lambda: agent.call("StorageDomain.stopOperation", {
        "domainID": shared[0], "operationID": first["operationID"]}))
    assert err.name == "OperationNotRunning" and err.code == 211
    assert err.data["state"] == "UNKNOWN"

    second = start_scrub(agent, shared[0])
    assert second["state"] == "STARTED"
    old = operation(agent, shared[0], first["operationID"])
    assert old["state"] == "FAILED" and old["error"]["data"]["name"] == "OperationLost"
    assert old["error"]["data"]["found_by"] == second["operationID"]
    stopping = agent.call("StorageDomain.stopOperation", {
        "domainID": shared[0], "operationID": second["operationID"]})
    assert stopping["stop_requested"] is not None
    stopped = wait_state(agent, shared[0], second["operationID"], "STOPPED", timeout=20)
    assert stopped["result"]["mismatches"] == [] and stopped["ended"] is not None
    assert stopped["progress"] < 100
    wait_for(lambda: not alive(second["pid"]), what="the stopped scrub to exit")


def test_one_scrub_per_domain_stopped_from_another_host(make_agent, shared):
    a = scrub_agent(make_agent, shared, create=True, rate=CRAWL)
    b = scrub_agent(make_agent, shared, "b", rate=CRAWL)
    make_source(a, shared[0], 64 * MiB)
    op_id = new_id()
    running = start_scrub(a, shared[0], op_id)
    for agent in (a, b):
        err = error_of(lambda: start_scrub(agent, shared[0]))
        assert err.name == "LeaseHeld" and err.code == 203
        holder = err.data["holder"]
        assert holder["operation_id"] == op_id and holder["pid"] == running["pid"]
        assert holder["host_id"] == "host-a" and holder["live"] is True
    assert [o["state"] for o in b.call("StorageDomain.getOperationStatuses",
                                       {"domainID": shared[0]})["operations"]] == ["STARTED"]

    b.call("StorageDomain.stopOperation", {"domainID": shared[0], "operationID": op_id})
    stopped = wait_state(a, shared[0], op_id, "STOPPED", timeout=20)
    assert stopped["host_id"] == "host-a" and stopped["stop_requested"] is not None
    err = error_of(lambda: b.call("StorageDomain.stopOperation",
                                  {"domainID": shared[0], "operationID": op_id}))
    assert err.name == "OperationNotRunning" and err.data["state"] == "STOPPED"
    err = error_of(lambda: b.call("StorageDomain.stopOperation",
                                  {"domainID": shared[0], "operationID": new_id()}))
    assert err.name == "NoSuchOperation" and err.code == 209
    wait_for(lambda: not alive(running["pid"]), what="the stopped scrub to exit")
    err = error_of(lambda: start_scrub(b, shared[0], op_id))
    assert err.name == "OperationExists" and err.code == 210
    again = start_scrub(b, shared[0])  # the lease is free again: any host may start one
    assert again["host_id"] == "host-b" and again["state"] == "STARTED"
    b.call("StorageDomain.stopOperation", {"domainID": shared[0],
                                           "operationID": again["operationID"]})
    wait_state(a, shared[0], again["operationID"], "STOPPED", timeout=20)


@pytest.mark.parametrize("record", [True, False])
def test_copy_completion_records_the_checksum_a_scrub_agrees_with(make_agent, shared, record):
    agent = scrub_agent(make_agent, shared, create=True, copy={"record_checksum": record})
    src = make_source(agent, shared[0], 64 * MiB, [(0, 3 * MiB), (40 * MiB, MiB)])
    dst = dst_for(shared[0])
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="copy1")
    wait_legal(agent, dst)
    want = block_checksum(volume_path(agent, dst))
    assert recorded_checksum(shared[1], dst["volumeID"]) == (want if record else None)
    assert recorded_checksum(shared[1], src["volumeID"]) is None  # never scrubbed yet
    op = start_scrub(agent, shared[0])
    result = wait_state(agent, shared[0], op["operationID"], "COMPLETED", "FAILED")["result"]
    assert result["volumes_checked"] == 2 and result["mismatches"] == []
    assert result["recorded"] == (1 if record else 2)
    assert recorded_checksum(shared[1], dst["volumeID"]) == want
    assert recorded_checksum(shared[1], src["volumeID"]) == want  # same data, same sum


# -- the pieces, without agents ---------------------------------------------------------

def sparse_file(path, size=64 * MiB + 123, pieces=((10 * MiB + 7, os.urandom(MiB)),
                                                       (64 * MiB, b"tail"))):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def test_a_whole_file_checksum_leaves_none_of_its_pages_cached(tmp_path):
    """A scrub reads each volume once: file_checksum drops each piece's pages once hashed,
    so that a scrub neither pushes the host's cache out nor grows it by the domain's size."""
    path = tmp_path / "vol.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(32 * MiB))
        os.fsync(f.fileno())  # clean pages: a dirty one is written back, not dropped
    expected = block_checksum(path)  # read through the page cache: all of it cached now
    assert cached_bytes(path) == 32 * MiB
    assert checksum.file_checksum(str(path)) == expected
    assert cached_bytes(path) < 4 * MiB


def test_sparse_checksum_reads_only_data_and_follows_its_definition(tmp_path):
    path = sparse_file(tmp_path / "vol.raw")
    reads = []
    got = checksum.file_checksum(str(path), lambda offset, n: reads.append(n))
    assert got == block_checksum(path)
    assert sum(reads) < 4 * MiB  # holes were hashed as zeros, not read
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert checksum.file_checksum(str(empty)) == block_checksum(empty)
    # The kinds earlier versions recorded: block-structured SHA-256, and the SHA-256 of the
    # whole file.
    assert checksum.file_checksum(str(path), kind=checksum.kind_of("sha256-4m:00")) == \
        block_checksum(path, "sha256-4m")
    assert checksum.file_checksum(str(path), kind=checksum.kind_of("sha256:00")) == \
        "sha256:" + sha256(path)
    assert checksum.kind_of(None) == checksum.kind_of("md5:x") == "blake3-4m"


def extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return sparse_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_written_zeros_and_holes_have_one_checksum(tmp_path):
    """A checksum of the bytes, not of the layout: a copy or a file system may turn zeros
    into holes or back."""
    holes = sparse_file(tmp_path / "holes.raw")
    dense = tmp_path / "dense.raw"
    dense.write_bytes(holes.read_bytes())  # every zero written out
    assert extents(dense) != extents(holes)
    assert checksum.file_checksum(str(dense)) == checksum.file_checksum(str(holes))


@pytest.mark.parametrize("written", [0, 5 * MiB, 64 * MiB + 123])
def test_the_follower_hashes_behind_a_writer(tmp_path, written):
    """Bytes appear in steps (a copy's progress); the follower ends with the same checksum
    as a read of the finished file, also when it starts with a prefix already written."""
    src = sparse_file(tmp_path / "src.raw")
    data, size = src.read_bytes(), src.stat().st_size
    fd = os.open(tmp_path / "dst.raw", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, data[:written], 0)
        follower = readback.Follower(fd, size, written=written)
        offset = written
        while offset < size:
            n = min(3 * MiB + 1, size - offset)
            os.pwrite(fd, data[offset:offset + n], offset)
            offset += n
            follower.advance(offset)
        assert follower.result() == block_checksum(src)
        follower.cancel()  # harmless once finished
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_a_paced_follower_stops_between_blocks_when_cancelled(tmp_path):
    """A resumed copy's follower reads the prefix back no faster than the copy's rate; an
    abort must not wait for it: at 1 MiB/s the 64 MiB prefix would take a minute."""
    fd = os.open(sparse_file(tmp_path / "a.raw", size=64 * MiB,
                             pieces=[(0, os.urandom(64 * MiB))]), os.O_RDONLY)
    try:
        follower = readback.Follower(fd, 64 * MiB, written=64 * MiB, rate=MiB)
        wait_for(lambda: follower.hasher.pos > 0, what="the first block hashed")
        follower.cancel()
        assert not follower._thread.is_alive() and follower.hasher.pos < 64 * MiB
    finally:
        os.close(fd)


def test_a_cancelled_follower_stops_and_a_read_error_is_an_agent_error(tmp_path):
    fd = os.open(sparse_file(tmp_path / "a.raw"), os.O_RDONLY)
    try:
        follower = readback.Follower(fd, 64 * MiB, written=MiB)  # waits for a whole block
        follower.cancel()
        assert not follower._thread.is_alive()
    finally:
        os.close(fd)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # pread: EISDIR, for real
    try:
        follower = readback.Follower(dir_fd, 4096)
        follower.advance(4096)
        with pytest.raises(OperationFailed, match="reading the destination back failed"):
            follower.result()
    finally:
        os.close(dir_fd)


def test_the_systemd_branch_runs_the_scrub_in_a_scope_of_its_own():
    # Not run here (it needs a system manager); its choice and command line are checked.
    assert scrubops.launchers("auto", env={}) == ["spawn"]
    assert scrubops.launchers("spawn", env={"INVOCATION_ID": "x"}) == ["spawn"]
    assert scrubops.launchers("systemd-run", env={}) == ["systemd-run"]
    argv = ["python", "-m", "workers.scrubber", "--lease-fd", "5"]
    cmd = scrubops.command("systemd-run", argv, "OP")
    assert cmd[:2] == ["systemd-run", "--scope"] and "--unit=hostagent-scrub-OP" in cmd
    assert cmd[cmd.index("--") + 1:] == argv  # the command execs in place: fds inherited
    assert scrubops.command("spawn", argv, "OP") == argv


def test_scrub_config_keys_are_checked():
    assert configmod.load().data["scrub"]["max_bytes_per_second"] > 0
    assert configmod.load().data["copy"]["record_checksum"] is True
    for bad in ({"scrub": {"max_bytes_per_second": -1}}, {"scrub": {"launcher": "cron"}},
                {"copy": {"record_checksum": "yes"}}):
        with pytest.raises(configmod.ConfigError):
            configmod.load(overrides=bad)


class _System:
    def __init__(self):
        self.now, self.exits = 100.0, []

    def monotonic(self):
        return self.now

    def reap(self):
        exits, self.exits = self.exits, []
        return exits


class _Listener:
    def __init__(self):
        self.events, self.gone = [], []

    def worker_event(self, w, topic, params):
        self.events.append((w.task.id, topic, params))

    def worker_gone(self, w, err):
        self.gone.append(w)


def _pool():
    from agent.config import load
    from agent.supervisor.workertable import WorkerTable

    system, listener = _System(), _Listener()
    config = load(overrides={"run_dir": "/nonexistent", "host_id": "h", "workers": {
        "deadline_seconds": 10.0, "kill_grace_seconds": 2.0, "heartbeat_seconds": 1.0}})
    return WorkerTable(config, system, listener), system, listener


def test_the_pool_takes_only_events_from_an_operation_process():
    import json as _json
    pool, _, listener = _pool()
    event = {"t": "event", "topic": "Operation.state", "task_id": "t1", "params": {"a": 1}}
    signed = pool.operation_identity(new_id()).encode()
    for msg in (event, {**event, "t": "result"}, {**event, "params": "x"}, "not json",
                {**event, "topic": "Image.copy"}, {**event, "topic": ["a", "list"]}):
        body = msg.encode() if isinstance(msg, str) else _json.dumps(msg).encode()
        pool.on_message([signed, body])
    # Unsigned, or signed for another operation, or by another life's key: dropped.
    from agent.supervisor.workertable import WorkerTable
    other = WorkerTable.__new__(WorkerTable)
    other.key = b"k" * 32
    for identity in (b"op:" + new_id().encode(), signed[:-1] + b"x",
                     other.operation_identity(new_id()).encode()):
        pool.on_message([identity, _json.dumps(event).encode()])
    assert listener.events == [("t1", "Operation.state", {"a": 1})]
    assert pool.strangers == 3


def test_an_adopted_scrub_reaped_earlier_never_ends_a_worker_that_reuses_its_pid():
    from agent.supervisor.tasks import Task
    from agent.supervisor.workertable import Worker
    pool, system, listener = _pool()
    system.exits = [(4242, 0)]  # a scrub the supervisor adopted, and reaped
    pool.reap()
    system.now += 3600  # pids wrap around; a new worker gets the same one
    w = Worker(token="w1", task=Task(id="t", method="Debug.sleep"), op="x", spawned=system.now,
               last_seen=system.now, deadline=10.0)
    pool.by_token[w.token] = w
    pool._claim(w, 4242)
    assert listener.gone == [] and pool.by_pid[4242] is w
    system.exits = [(4242, 9)]  # its own exit, reaped before its pid was known: still seen
    w2 = Worker(token="w2", task=Task(id="t2", method="Debug.sleep"), op="x", spawned=system.now,
                last_seen=system.now, deadline=10.0)
    pool.by_pid.clear()
    pool.reap()
    pool._claim(w2, 4242)
    assert listener.gone == [w2]
