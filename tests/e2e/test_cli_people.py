"""The commands for people (and, with --json, scripts), as real subprocesses against real
agents: output, exit codes, readable errors, and where settings come from."""

import json
import signal
import subprocess
import sys

import pytest

from tests.e2e.test_cli import HOSTAGENT, LineReader, clean_env, processes, run  # noqa: F401
from tests.support.harness import wait_for, write_config
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, status

COPY = {"chunk_bytes": 4 * MiB, "checkpoint_bytes": 16 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 64 * MiB}


def ha(agent, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return run("--config", str(agent.config_path), *args, env=env, timeout=timeout)


def ok_json(out: subprocess.CompletedProcess):
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return json.loads(out.stdout)


def loc(d: dict) -> str:
    return f"{d['domainID']}/{d['imageID']}/{d['volumeID']}"


def readable_error(out, code: int, *words):
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.startswith("hostagent: "), out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


def test_domain_and_volume_commands(agent, workdir):
    path = workdir / "dom"
    domain = ok_json(ha(agent, "domain", "create", str(path), "--json"))
    d = domain["domainID"]
    assert domain["path"] == str(path) and domain["volumes"] == 0
    out = ha(agent, "domain", "list")
    assert out.returncode == 0 and d in out.stdout and str(path) in out.stdout
    assert ok_json(ha(agent, "domain", "list", "--json")) == [
        {"domainID": d, "path": str(path), "attached_by": "attach", "lockspace": "joined",
         "error": None}]
    out = ha(agent, "domain", "info", d)
    assert out.returncode == 0 and "capacity" in out.stdout and "GiB" in out.stdout

    vol = ok_json(ha(agent, "volume", "create", d, "64M", "--json"))  # IDs chosen for us
    assert vol["size"] == 64 * MiB and vol["legality"] == "LEGAL"
    out = ha(agent, "volume", "info", loc(vol))
    assert out.returncode == 0 and "LEGAL" in out.stdout and "64.0 MiB" in out.stdout
    image = new_id()
    named = ok_json(ha(agent, "volume", "create", f"{d}/{image}/new", "1G", "--json"))
    assert named["imageID"] == image and named["size"] == 1 << 30
    out = ha(agent, "volume", "delete", loc(vol))
    assert out.returncode == 0 and "deleted" in out.stdout

    readable_error(ha(agent, "volume", "info", loc(vol)), 1, "NoSuchVolume", "201")
    out = ha(agent, "volume", "info", loc(vol), "--json")
    assert out.returncode == 1 and json.loads(out.stderr)["data"]["name"] == "NoSuchVolume"
    readable_error(ha(agent, "domain", "attach", d, str(path)), 1, "DomainExists")
    readable_error(ha(agent, "volume", "info", "not-a-location"), 2, "DOMAIN/IMAGE/VOLUME")
    readable_error(ha(agent, "volume", "create", d, "lots"), 2, "not a size")
    readable_error(ha(agent, "domain", "info", "x"), 2, "not a UUID")


def test_tasks_and_status(agent, workdir):
    agent.call("Debug.sleep", {"seconds": 0}, id="t-1")
    records = ok_json(ha(agent, "tasks", "--json"))
    assert any(r["id"] == "t-1" and r["state"] == "done" for r in records)
    out = ha(agent, "tasks")
    assert out.returncode == 0 and "t-1" in out.stdout and "Debug.sleep" in out.stdout
    assert "TASK" in out.stdout and "STATE" in out.stdout
    out = ha(agent, "tasks", "--state", "failed")
    assert out.returncode == 0 and "no task in state failed" in out.stdout
    ok_json(ha(agent, "domain", "create", str(workdir / "d1"), "--json"))
    st = ok_json(ha(agent, "status", "--json"))
    assert st["host"]["host_id"] == "host-a" and st["stats"]["cpu_count"] >= 1
    assert len(st["domains"]) == 1 and st["domains"][0]["info"]["volumes"] == 0
    out = ha(agent, "status")
    assert out.returncode == 0 and "host-a" in out.stdout and "domains" in out.stdout


# The command run in a Python that says on stderr, last, which heavy modules it loaded.
LOADED = ("import sys; from agent.cli import main; code = main(sys.argv[1:]); "
          "sys.stderr.write('\\nloaded: ' + ' '.join(m for m in ('asyncio', 'rich') "
          "if m in sys.modules) + '\\n'); sys.exit(code)")


def loaded(agent, *args, code: int = 0) -> tuple[str, set[str]]:
    out = subprocess.run([sys.executable, "-c", LOADED, "--config", str(agent.config_path),
                          *args], capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    mods = out.stderr.rstrip("\n").rpartition("loaded: ")[2]
    return out.stdout, set(mods.split())


def test_a_command_loads_only_what_it_uses(agent, workdir):
    """A command that only calls starts without asyncio (the whole client's event loop)
    and, printing JSON, without rich: each is a third of a command's start."""
    d = ok_json(ha(agent, "domain", "create", str(workdir / "d1"), "--json"))["domainID"]
    vol = ok_json(ha(agent, "volume", "create", d, "1M", "--json"))
    for args in (["domain", "list"], ["volume", "info", loc(vol)], ["tasks"], ["status"],
                 ["bitmap", "list", loc(vol)]):
        text, mods = loaded(agent, *args, "--json")
        assert mods == set(), (args, mods)
        json.loads(text)
        text, mods = loaded(agent, *args)
        assert mods == {"rich"}, (args, mods)
        assert "Traceback" not in text
    _, mods = loaded(agent, "wait", "t-none", "--json", code=1)  # NoSuchTask, from a wait:
    assert "asyncio" in mods                                    # the whole client


@pytest.fixture
def copying(make_agent, workdir):
    """An agent with a domain and a 128 MiB source; copies rate-limited to 64 MiB/s."""
    domain_id, path = new_id(), str(workdir / "shared")
    agent = make_agent(copy=COPY, recovery={"backoff_seconds": 0.1, "copy_policy": "manual"})
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
    agent.shared = (domain_id, path)
    agent.src = make_source(agent, domain_id, 128 * MiB)
    return agent


def test_copy_without_and_with_wait(copying):
    agent, d = copying, copying.shared[0]
    first = ok_json(ha(agent, "copy", loc(agent.src), d, "--json", "--id", "cp-1"))
    assert first["taskID"] == "cp-1" and first["state"] == "copying"
    dst = first["dst"]
    assert dst["domainID"] == d and first["volumeID"] == dst["volumeID"]
    done = ok_json(ha(agent, "wait", "cp-1", "--dst", loc(dst), "--json", "--poll", "0.2"))
    assert done["state"] == "done" and done["result"]["generation"] == 1
    out = ha(agent, "continue", loc(dst))
    assert out.returncode == 0 and "nothing to copy" in out.stdout
    dst2 = dst_for(d)
    done = ok_json(ha(agent, "copy", loc(agent.src), loc(dst2), "--wait", "--json"))
    assert done["state"] == "done" and status(agent, dst2)["legality"] == "LEGAL"
    out = ha(agent, "copy", loc(agent.src), loc(dst2), "--wait")  # a LEGAL destination
    readable_error(out, 1, "VolumeExists")
    out = ha(agent, "wait", "no-such-task")
    readable_error(out, 1, "no-such-task")


def test_copy_that_nobody_continues_exits_4_then_continue(copying, processes):
    """Policy manual: the agent dies mid-copy and its restart leaves the copy alone; the
    waiting command says it needs continuing (exit 4); `continue` finishes it."""
    agent, d = copying, copying.shared[0]
    dst = dst_for(d)
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "copy",
                             loc(agent.src), loc(dst), "--wait", "--poll", "0.2", "--settle",
                             "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(), text=True)
    processes.append(proc)

    def checkpointed():
        assert proc.poll() is None, proc.communicate()
        try:
            st = status(agent, dst)
        except Exception:
            return False
        return st["copy"] and st["copy"]["copied"] > 0
    wait_for(checkpointed, 30, what="a first checkpoint")
    agent.kill(signal.SIGKILL)
    agent.cfg["storage"] = {"domains": {d: agent.shared[1]}}
    write_config(agent.config_path, agent.cfg)
    agent.start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, (out, err)
    assert "nobody is copying it" in err and f"hostagent continue {loc(dst)}" in err
    assert "Traceback" not in err
    done = ok_json(ha(agent, "continue", loc(dst), "--wait", "--json", "--poll", "0.2"))
    assert done["state"] == "done" and status(agent, dst)["legality"] == "LEGAL"


def test_no_answer_exits_3(workdir):
    out = run("tasks", "--endpoint", f"ipc://{workdir}/nobody.sock", "--timeout", "0.5")
    readable_error(out, 3, "is the agent running")


def test_settings_from_client_config_and_environment(agent, workdir):
    cfg = workdir / "client.toml"
    cfg.write_text(f'endpoint = "{agent.rpc_endpoint}"\noutput = "json"\ntimeout = 5\n')
    env = clean_env(HOSTAGENT_CLIENT_CONFIG=str(cfg))
    records = ok_json(run("tasks", env=env))  # no --config, no flag: all from the file
    assert isinstance(records, list)
    assert ok_json(run("call", "Host.ping", env=env)) is True
    # The environment wins over the file; the events endpoint is guessed beside it.
    env2 = clean_env(HOSTAGENT_CLIENT_CONFIG=str(cfg),
                     HOSTAGENT_ENDPOINT=f"ipc://{workdir}/nobody.sock")
    readable_error(run("status", "--timeout", "0.5", env=env2), 3)
    env3 = clean_env(HOSTAGENT_ENDPOINT=agent.rpc_endpoint, HOSTAGENT_OUTPUT="json",
                     HOSTAGENT_CLIENT_CONFIG=str(workdir / "absent.toml"))
    readable_error(run("status", env=env3), 2, "no such file")
    env3.pop("HOSTAGENT_CLIENT_CONFIG")
    env3["XDG_CONFIG_HOME"] = str(workdir / "empty-config-home")
    assert ok_json(run("status", env=env3))["host"]["host_id"] == "host-a"
    cfg.write_text('endpoint = "x"\ncolour = "always"\n')
    readable_error(run("tasks", env=env), 2, "unknown key 'colour'")


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_watch_prints_events(agent, processes, as_json):
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "watch",
                             "Task."] + (["--json"] if as_json else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    processes.append(proc)
    lines = LineReader(proc.stdout)
    client = agent.client()
    seen = None
    for n in range(100):  # slow joiner: until a task of ours shows up
        assert proc.poll() is None, proc.stderr.read()
        client.call("Debug.sleep", {"seconds": 0}, id=f"watch-{n}")
        while (line := lines.readline(0.3)) is not None:
            if f"watch-{n}" in line and "done" in line:
                seen = line
                break
        if seen:
            break
    assert seen, "no line for our task from `hostagent watch`"
    if as_json:
        ev = json.loads(seen)
        assert ev["method"] == "Task.state" and ev["params"]["task"]["state"] == "done"
    else:
        assert "Task.state" in seen and "Debug.sleep" in seen and not seen.startswith("{")
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a quiet exit 0
    assert proc.wait(10) == 0
    assert "Traceback" not in proc.stderr.read().decode()


def test_status_shows_readiness_copies_and_domains_in_trouble(make_agent, workdir):
    agent = make_agent(copy={**COPY, "max_bytes_per_second": 8 * MiB})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    lost = new_id()
    agent.call("StorageDomain.create", {"domainID": lost, "path": str(workdir / "lost")})
    src = make_source(agent, domain_id, 128 * MiB)
    dst = dst_for(domain_id)
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="st-copy")
    wait_for(lambda: [c for c in agent.call("Host.getStats")["copies"] if c["rate"]],
             what="the copy's rate known")
    (workdir / "lost").rename(workdir / "elsewhere")  # its storage gone from under the agent

    st = ok_json(ha(agent, "status", "--json"))
    assert st["stats"]["agent"]["ready"] is True and st["stats"]["agent"]["ready_since"]
    [copy] = st["stats"]["copies"]
    assert copy["taskID"] == "st-copy" and copy["volumeID"] == dst["volumeID"]
    assert {d["domainID"]: d["state"] for d in st["domains"]} == {domain_id: "ok",
                                                                   lost: "unreachable"}
    out = ha(agent, "status")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "ready since" in text and "1 running" in text, out.stdout
    assert "1 in progress" in text and "st-copy" in text and dst["volumeID"] in text
    assert "MiB/s" in text and "of 128.0 MiB" in text, out.stdout
    assert "unreachable" in text, out.stdout
    agent.call("Task.abort", {"taskID": "st-copy"})


def test_a_domain_state_is_what_an_operator_looks_at_first():
    from agent.cli.views import domain_state
    info = {"capacity": 100 * MiB, "free": 50 * MiB}
    assert domain_state({"lockspace": "joined", "info": info}) == "ok"
    assert domain_state({"lockspace": "joining", "info": info}) == "joining"
    assert domain_state({"lockspace": "failed", "error": {"code": 214}}) == "failed"
    assert domain_state({"lockspace": "joined", "error": {"code": 105}}) == "unreachable"
    assert domain_state({"lockspace": "joined",
                         "info": {"capacity": 100 * MiB, "free": 4 * MiB}}) == "full"
