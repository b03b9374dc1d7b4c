"""Every chaos invariant, broken on purpose: its checker must catch it.

If one of these passes without raising Breach, the chaos suite could not see that breach.
"""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from agent.storage.metadata import DomainDB
from tests.chaos import invariants as inv
from tests.support.harness import wait_for
from tests.support.storage_flow import new_id


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def test_legal_destination_with_other_data_is_caught(tmp_path):
    write(tmp_path / "src", b"a" * 4096)
    write(tmp_path / "dst", b"b" * 4096)
    legal = {"volumeID": "v", "legality": "LEGAL", "copy": None}
    with pytest.raises(inv.Breach, match="differs"):
        inv.check_destination(legal, str(tmp_path / "src"), str(tmp_path / "dst"))
    write(tmp_path / "dst", b"a" * 4096)
    assert inv.check_destination(legal, str(tmp_path / "src"), str(tmp_path / "dst")) == "legal"
    with pytest.raises(inv.Breach, match="without a copy marker"):
        inv.check_destination({**legal, "legality": "ILLEGAL"}, "", "")
    with pytest.raises(inv.Breach, match="still has a copy marker"):
        inv.check_destination({**legal, "copy": {}}, "", "")


def test_corrupt_metadata_is_caught(tmp_path):
    root = tmp_path / "d"
    DomainDB.format(root, new_id()).close()
    inv.check_integrity(str(root))
    with open(root / "metadata.db", "r+b") as f:  # scribble over the schema page
        f.seek(100)
        f.write(os.urandom(3000))
    with pytest.raises(inv.Breach, match="integrity_check"):
        inv.check_integrity(str(root))


def test_two_writers_of_one_volume_are_caught(tmp_path):
    target = tmp_path / "volume.raw"
    write(target, b"\0" * 4096)
    marker = f"writer-{new_id()}"
    code = ("import sys, time; f = open(sys.argv[1], 'r+b'); print('open', flush=True); "
            "time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), marker],
                              stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline() == b"open\n"
        sampler = inv.WriterSampler(marker=marker)
        sampler.paths.add(str(target))
        sampler.sample()
        with pytest.raises(inv.Breach, match="two processes wrote one volume"):
            sampler.check()
        procs[1].kill()
        procs[1].wait()
        quiet = inv.WriterSampler(marker=marker)
        quiet.paths.add(str(target))
        quiet.sample()
        quiet.check()  # one writer is fine
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_process_outliving_its_supervisor_is_caught():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc = psutil.Process(p.pid)
    try:
        with pytest.raises(inv.Breach, match="outlived"):
            inv.check_no_leftover([proc], timeout=0.2)
    finally:
        p.kill()
        p.wait()
    inv.check_no_leftover([proc], timeout=0.2)  # gone: no breach


def test_an_unreaped_zombie_is_caught():
    # A parent that forks a child which exits, and never reaps it.
    code = ("import os, time\npid = os.fork()\nif pid == 0: os._exit(0)\n"
            "print(pid, flush=True)\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child = int(parent.stdout.readline())
        wait_for(lambda: psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
        with pytest.raises(inv.Breach, match="zombies"):
            inv.check_no_zombies(parent.pid, timeout=0.2)
    finally:
        parent.kill()
        parent.wait()


def test_a_slow_restart_is_caught():
    inv.check_ping_bound(0.5)
    with pytest.raises(inv.Breach, match="to answer Host.ping"):
        inv.check_ping_bound(inv.PING_BOUND_SECONDS + 1)


def test_a_copy_that_never_completes_is_caught(make_agent, workdir):
    """Under `resume` every interrupted copy must complete within its round's settle: a copy
    whose agent never restarts (recovery never runs) is caught by the settle wait."""
    from tests.chaos import runner
    from tests.support.storage_flow import MiB, dst_for, make_source
    agent = make_agent(**runner.CONFIG)
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 16 * MiB)
    dst = dst_for(domain_id)
    agent.call("Image.copy", {"src": src, "dst": dst})
    agent.kill(signal.SIGKILL)  # mid-copy, and never restarted: recovery never runs
    other = make_agent("b", storage={"domains": {domain_id: str(workdir / "d")}},
                       recovery={"copy_policy": "manual"})
    chaos = runner.Chaos.__new__(runner.Chaos)  # just the settle step, on this world
    chaos.agents, chaos.path = [other], str(workdir / "d")
    chaos.sampler = inv.WriterSampler(marker="none")
    old, runner.SETTLE_SECONDS = runner.SETTLE_SECONDS, 1.0
    try:
        with pytest.raises(AssertionError, match="every copy to complete"):
            chaos._settle([(other, src, dst, 16 * MiB)])
    finally:
        runner.SETTLE_SECONDS = old
