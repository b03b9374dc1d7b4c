"""Classes 4, 9 and 10: domains under races, damaged run-dir files and paths the OS refuses
(a domain's, and the run dir's own at start-up).

- Creates and attaches are exclusive per domain UUID and per path (in the agent), and
  formatting is exclusive per directory (on storage, across agents): of racing requests one
  wins, the others get 208 DomainExists, and what is on disk is one whole domain.
- attached.json damaged in any way never stops start-up; good entries are kept.
- A path the OS refuses, or a size the file system cannot hold, is the caller's -32602 with
  data.param, never -32603 (an agent bug, which engines retry)."""

import contextlib
import json
import os

import pytest

from agent.client import CallError
from tests.support.storage_flow import integrity, new_id, tmpfs

pytestmark = pytest.mark.timeout(120)


def answers(agent, requests):
    """Send every request at once (pipelined on one socket); their answers by id."""
    c = agent.client(timeout=60)
    for rid, (method, params) in requests.items():
        c.send(method, params, id=rid)
    got = {}
    while len(got) < len(requests):
        resp = c.recv(60)
        got[resp["id"]] = resp
    return got


def outcome(resp):
    return "ok" if "result" in resp else resp["error"]["data"]["name"]


def test_one_uuid_at_many_paths_and_many_uuids_at_one_path(make_agent, workdir, scale):
    agent = make_agent()
    for r in range(3 * scale):
        uuid_ = new_id()
        got = answers(agent, {f"p{r}-{i}": ("StorageDomain.create",
                                            {"domainID": uuid_, "path": str(workdir / f"p{r}-{i}")})
                              for i in range(6)})
        kinds = sorted(outcome(a) for a in got.values())
        assert kinds == ["DomainExists"] * 5 + ["ok"], got
        formatted = [p for p in workdir.glob(f"p{r}-*") if (p / "metadata.db").exists()]
        assert len(formatted) == 1  # no orphan the client was told exists

        path = workdir / f"shared{r}"
        got = answers(agent, {f"u{r}-{i}": ("StorageDomain.create",
                                            {"domainID": new_id(), "path": str(path)})
                              for i in range(6)})
        kinds = sorted(outcome(a) for a in got.values())
        assert kinds == ["DomainExists"] * 5 + ["ok"], got
        winner = next(a["result"]["domainID"] for a in got.values() if "result" in a)
        assert integrity(path) == "ok"
        assert {d["domainID"] for d in agent.call("StorageDomain.list")} >= {winner}


def test_two_agents_formatting_one_directory_take_turns(make_agent, workdir, scale):
    """Across agents (no shared memory) the format lock on storage decides: one domain,
    whole, and the loser is told DomainExists, never an I/O error or -32603."""
    a, b = make_agent("a"), make_agent("b")
    for r in range(5 * scale):
        path = str(workdir / f"race{r}")
        ca, cb = a.client(timeout=60), b.client(timeout=60)
        ida, idb = new_id(), new_id()
        ca.send("StorageDomain.create", {"domainID": ida, "path": path}, id="x")
        cb.send("StorageDomain.create", {"domainID": idb, "path": path}, id="x")
        ra, rb = ca.recv(60), cb.recv(60)
        assert sorted([outcome(ra), outcome(rb)]) in (["DomainExists", "ok"],
                                                      ["InvalidParams", "ok"]), (ra, rb)
        assert integrity(path) == "ok"
        winner = ida if "result" in ra else idb
        loser = b if winner == ida else a
        # The directory holds the winner's domain, attachable by the other agent.
        assert loser.call("StorageDomain.attach", {"domainID": winner, "path": path})


def test_an_empty_metadata_file_left_by_an_old_race_can_be_formatted(make_agent, workdir):
    agent = make_agent()
    path = workdir / "debris"
    path.mkdir()
    (path / "metadata.db").touch()
    info = agent.call("StorageDomain.create", {"domainID": new_id(), "path": str(path)})
    assert integrity(path) == "ok" and info["volumes"] == 0


DAMAGE = {
    "array": b"[]",
    "string": b'"attached"',
    "number": b"42",
    "truncated": b'{"5d0d0e5e-0000-4000-8000-0000000000',
    "empty": b"",
    "garbage": b"\xff\xfe\x00garbage",
    "deep": b"[" * 100000,
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_attached_file_never_stops_start_up(make_agent, workdir, kind):
    agent = make_agent(start=False)
    agent.run_dir.mkdir(parents=True)
    (agent.run_dir / "attached.json").write_bytes(DAMAGE[kind])
    agent.start()
    assert agent.call("StorageDomain.list") == []
    assert (agent.run_dir / "attached.json.damaged").read_bytes() == DAMAGE[kind]
    assert "attached_file_damaged" in agent.log()


def test_bogus_entries_are_ignored_and_good_ones_kept(make_agent, workdir):
    agent = make_agent()
    good = new_id()
    agent.call("StorageDomain.create", {"domainID": good, "path": str(workdir / "good")})
    agent.kill()
    entries = json.loads((agent.run_dir / "attached.json").read_text())
    entries.update({"not-a-uuid": "/x", new_id(): "relative/path", new_id(): 7,
                    new_id(): None, new_id(): ["/a"], "../../etc": "/etc"})
    (agent.run_dir / "attached.json").write_text(json.dumps(entries))
    agent.start()
    assert [d["domainID"] for d in agent.call("StorageDomain.list")] == [good]
    assert agent.log().count("attached_entry_ignored") >= 6


@pytest.fixture
def read_only_dir(workdir):
    with tmpfs(workdir / "ro", "1m", "ro") as path:
        yield path


def hostile_paths(workdir, read_only_dir):
    a_file = workdir / "a-file"
    a_file.write_text("x")
    return [
        "/proc/hostagent-domain", "/proc/self/hostagent", "/proc/1/root/x",
        "/sys/kernel/hostagent", "/sys/hostagent", "/dev/null/x", "/dev/full/x",
        str(read_only_dir / "d"), str(read_only_dir), str(a_file), str(a_file / "sub"),
        str(workdir / ("x" * 300)), "/" + "/".join(["y" * 200] * 30),
        str(workdir / "nonempty-parent-is-a-file" / "x"),
        str(workdir / "/".join(["a"] * 2500)),  # 5,000 characters: os.makedirs recursed
        str(workdir / "/".join(["c"] * 300)),  # 600 bytes: a file SQLite cannot open
        str(workdir / "nul\0name"),
    ]


def test_paths_the_os_refuses_are_the_callers_error(make_agent, workdir, read_only_dir):
    agent = make_agent()
    (workdir / "nonempty-parent-is-a-file").write_text("")
    for path in hostile_paths(workdir, read_only_dir):
        for method in ("StorageDomain.create", "StorageDomain.attach"):
            with pytest.raises(CallError) as exc:
                agent.call(method, {"domainID": new_id(), "path": path})
                pytest.fail(f"{method} {path} succeeded")
            err = exc.value
            assert err.code != -32603, (method, path, err)
            if err.code == -32602:
                assert err.data.get("param") == "path", (method, path, err)
            else:
                assert err.name in ("NoSuchDomain", "DomainExists", "NoSpace"), (path, err)
    assert agent.call("Host.getStats")["agent"]["callback_errors"] == 0


def test_a_volume_larger_than_the_file_system_allows_names_the_size(make_agent, workdir):
    agent = make_agent()
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    loc = {"domainID": domain, "imageID": new_id(), "volumeID": new_id()}
    with pytest.raises(CallError) as exc:  # ext4 holds files up to 16 TiB
        agent.call("Volume.create", {**loc, "size": 1 << 50})
    if exc.value.name == "NoSpace":
        pytest.fail(f"a size the file system cannot hold is not a full disk: {exc.value}")
    assert exc.value.code == -32602 and exc.value.data["param"] == "size", exc.value
    assert exc.value.data["errno"] == "EFBIG"
    with pytest.raises(CallError) as exc:  # and nothing was recorded
        agent.call("Volume.getInfo", loc)
    assert exc.value.name == "NoSuchVolume"


HOSTILE_SCHEMAS = {
    "no-volumes-table": [],
    "wrong-columns": ["CREATE TABLE volumes (x TEXT)", "CREATE TABLE copy_markers (y TEXT)",
                      "PRAGMA user_version = 2"],
    "a-view-as-volumes": ["CREATE VIEW volumes AS SELECT 1 AS volume_id",
                          "PRAGMA user_version = 2"],
    "newer-version": ["PRAGMA user_version = 99"],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_SCHEMAS))
def test_a_domain_whose_metadata_is_not_ours_is_refused_by_name(agent, workdir, kind):
    """A metadata.db with a domain row but damaged, foreign or newer tables: 214
    DomainUnusable, never -32603, and the agent attaches nothing."""
    import sqlite3
    path, domain = workdir / kind, new_id()
    path.mkdir()
    db = sqlite3.connect(path / "metadata.db")
    db.execute("CREATE TABLE domain (id TEXT PRIMARY KEY, version INTEGER, created REAL)")
    db.execute("INSERT INTO domain VALUES (?, 2, 0)", [domain])
    for sql in HOSTILE_SCHEMAS[kind]:
        db.execute(sql)
    db.commit()
    db.close()
    with pytest.raises(CallError) as exc:
        agent.call("StorageDomain.attach", {"domainID": domain, "path": str(path)})
    assert exc.value.code == 214 and exc.value.name == "DomainUnusable", exc.value
    assert agent.call("StorageDomain.list") == []


def fill(path) -> None:
    """Write `path` until its file system has no block left (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        with pytest.raises(OSError) as exc:
            while True:
                f.write(b"\0" * 4096)
    assert exc.value.errno == 28, exc.value


@pytest.mark.parametrize("kind", ["full", "read-only", "a file", "under a file"])
def test_a_run_dir_the_os_refuses_ends_start_up_with_one_line_naming_it(
        make_agent, workdir, read_only_dir, kind):
    """Start-up that cannot make, lock or write its run dir exits 2 with a line for the
    operator (what, where, the OS's reason), not a traceback; it leaves no half-written
    file behind, and once the disk has room again the same agent starts."""
    (workdir / "a-file").write_text("x")
    with contextlib.ExitStack() as full:  # unmounted however the test ends
        if kind == "full":  # the run dir made before its file system filled, as after a reboot
            small = full.enter_context(tmpfs(workdir / "full", "1m"))
            (small / "run").mkdir()
            fill(small / "filler")
        run_dir = {"read-only": read_only_dir / "run", "a file": workdir / "a-file",
                   "under a file": workdir / "a-file" / "run"}.get(kind) or small / "run"
        agent = make_agent(start=False, run_dir=str(run_dir))
        agent.run_dir = run_dir  # where its clients find its sockets
        agent.start(wait=False)
        assert agent.proc.wait(30) == 2, agent.log()
        out = agent.log()
        assert "Traceback" not in out, out
        lines = [line for line in out.splitlines() if line.startswith("hostagent: ")]
        reason = {"full": "No space left on device", "read-only": "Read-only file system",
                  "a file": "File exists", "under a file": "Not a directory"}[kind]
        assert len(lines) == 1 and str(run_dir) in lines[0] and reason in lines[0], out
        if kind == "full":
            assert sorted(os.listdir(run_dir)) == ["agent.lock", "events.sock", "rpc.sock",
                                                   "workers.sock"], "a half-written file"
            os.remove(small / "filler")
            agent.start()
            assert agent.call("Host.ping") is True
            agent.close()
