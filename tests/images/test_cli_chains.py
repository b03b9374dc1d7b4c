"""A disk's life from the command line, as real subprocesses against a real agent: a snapshot
taken and removed (`hostagent merge --wait`, followed across a SIGKILL of the agent), the
chain shown as a tree, a leaf grown and measured."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.e2e.test_cli import HOSTAGENT, clean_env, processes  # noqa: F401
from tests.e2e.test_cli_people import ha, loc, ok_json, readable_error
from tests.images.chains import compare, needs_qemu, qemu_io
from tests.support.harness import wait_for
from tests.support.storage_flow import MiB, new_id

pytestmark = [needs_qemu, pytest.mark.timeout(180)]

SLOW = {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.05,
        "max_bytes_per_second": 16 * MiB}


def test_a_snapshot_taken_and_removed_from_the_command_line(make_agent, workdir, processes):
    agent = make_agent(copy=SLOW, recovery={"backoff_seconds": 0.1})
    d = ok_json(ha(agent, "domain", "create", str(workdir / "dom"), "--json"))["domainID"]
    base = ok_json(ha(agent, "volume", "create", d, "128M", "--json"))
    qemu_io(base["path"], "raw", f"write -P 1 0 {64 * MiB}")
    snap = ok_json(ha(agent, "volume", "create", f"{d}/{base['imageID']}/new", "--parent",
                      base["volumeID"], "--json"))
    qemu_io(snap["path"], "cow", f"write -P 2 {32 * MiB} {64 * MiB}",
            f"write -z {8 * MiB} {MiB}")
    view = str(workdir / "view.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", snap["path"], view],
                   check=True, timeout=60)
    out = ha(agent, "volume", "info", loc(snap))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if base["volumeID"] in line and "raw" in line]
    assert at and snap["volumeID"] in lines[at[0] + 1] and "<" in lines[at[0] + 1], out.stdout

    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "merge",
                             loc(snap), "--wait", "--json", "--poll", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                            text=True)
    processes.append(proc)

    def merging():
        assert proc.poll() is None, proc.communicate()
        m = agent.call("Image.getStatus", {k: base[k] for k in ("domainID", "imageID",
                                                                  "volumeID")})["merge"]
        return m and m["copied"] > 0
    wait_for(merging, 30, what="the merge checkpointed")
    agent.kill(signal.SIGKILL)  # the command follows it across the restart, on storage
    agent.start()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    done = json.loads(out)
    assert done["state"] == "done" and done["restarted"] is True, done
    info = ok_json(ha(agent, "volume", "info", loc(base), "--json"))
    assert info["legality"] == "LEGAL" and info["children"] == [] and info["merge"] is None
    assert info["chains"] == [[base["volumeID"]]]
    assert compare(base["path"], "raw", view, "raw").returncode == 0
    readable_error(ha(agent, "volume", "info", loc(snap)), 1, "NoSuchVolume")
    readable_error(ha(agent, "merge", loc(base)), 2, "has no parent")

    grown = ok_json(ha(agent, "volume", "extend", loc(base), "256M", "--json"))
    assert grown["size"] == 256 * MiB and grown["extended"] is True
    out = ha(agent, "volume", "extend", loc(base), "256M")
    assert out.returncode == 0 and "already" in out.stdout
    readable_error(ha(agent, "volume", "extend", loc(base), "1M"), 1, "ShrinkRefused")
    measured = ok_json(ha(agent, "volume", "measure", loc(base), "--format", "cow",
                          "--json"))
    assert measured["format"] == "cow" and 64 * MiB < measured["required"] < 256 * MiB
    out = ha(agent, "volume", "measure", loc(base))
    assert out.returncode == 0 and "a copy needs" in out.stdout


def test_a_merge_that_nobody_continues_says_what_to_type(make_agent, workdir, processes):
    agent = make_agent(copy=SLOW, recovery={"copy_policy": "manual"})
    d = ok_json(ha(agent, "domain", "create", str(workdir / "dom"), "--json"))["domainID"]
    image = new_id()
    base = ok_json(ha(agent, "volume", "create", f"{d}/{image}/new", "64M", "--json"))
    snap = ok_json(ha(agent, "volume", "create", f"{d}/{image}/new", "--parent",
                      base["volumeID"], "--json"))
    qemu_io(snap["path"], "cow", f"write -P 3 0 {48 * MiB}")
    proc = subprocess.Popen([str(HOSTAGENT), "--config", str(agent.config_path), "merge",
                             loc(snap), "--wait", "--poll", "0.2", "--settle", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                            text=True)
    processes.append(proc)
    base_loc = {k: base[k] for k in ("domainID", "imageID", "volumeID")}
    wait_for(lambda: (agent.call("Image.getStatus", base_loc)["merge"] or {}).get("copied"),
             30, what="the merge checkpointed")
    agent.kill(signal.SIGKILL)
    agent.start()  # policy manual: the merge waits for someone
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, (out, err)
    assert f"hostagent merge {loc(snap)} --wait" in err and "Traceback" not in err
    done = ok_json(ha(agent, "merge", loc(snap), "--wait", "--json", "--poll", "0.2"))
    assert done["state"] == "done"
    again = ok_json(ha(agent, "merge", loc(snap), "--into", base["volumeID"], "--json"))
    assert again.get("already") is True or again.get("state") == "done"
