"""The agent follows its sanlock daemon, with real daemons and no restart of the agent: a
daemon started after the agent is found and the domain joined; a daemon restarted under a
joined domain is noticed, the truth said meanwhile (214 reason lockspace, never sanlock's
ENOSPC), and the lockspace joined again; a lockspace removed under the agent is found by
the first worker that needs it; a damaged volume lease area is made again when nobody can
hold it."""

from __future__ import annotations

import pytest

from agent.client import CallError
from tests.sanlock.daemons import Daemon, needs_sanlock
from tests.sanlock.test_hosts import first_host, joined, lockspace
from tests.support.harness import wait_for
from tests.support.storage_flow import MiB, new_id

pytestmark = [needs_sanlock, pytest.mark.timeout(180)]


def _volume(agent, domain_id) -> dict:
    return {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}


def _refused_for_its_lockspace(agent, domain_id) -> dict:
    with pytest.raises(CallError) as exc:
        agent.call("Volume.create", {**_volume(agent, domain_id), "size": MiB})
    err = exc.value
    assert err.code == 214 and err.data["reason"] == "lockspace", err
    assert "No space left" not in err.message
    return err.data


def test_a_daemon_started_after_the_agent_is_found_and_joined(make_agent, workdir, shared):
    run_dir = workdir / "late-daemon"
    agent = make_agent("a", storage={"lease_manager": "sanlock", "host_id_number": 1,
                                     "sanlock_io_timeout": 1, "sanlock_run_dir": str(run_dir)})
    agent.call("StorageDomain.create", {"domainID": shared[0], "path": shared[1]})
    wait_for(lambda: lockspace(agent, shared[0]) == "failed", 60, what="the join failed")
    _refused_for_its_lockspace(agent, shared[0])
    daemon = Daemon(run_dir).start()
    try:
        joined(agent, shared[0], timeout=90)  # a retry (backoff) or the daemon seen
        info = agent.call("Volume.create", {**_volume(agent, shared[0]), "size": MiB})
        assert info["legality"] == "LEGAL"
    finally:
        agent.close()
        daemon.stop()


def test_a_restarted_daemon_is_noticed_and_joined_again(make_agent, daemons, shared):
    agent = first_host(make_agent, daemons, shared)
    agent.call("Volume.create", {**_volume(agent, shared[0]), "size": MiB})
    # A clean restart of the daemon (as `systemctl restart sanlock` after `sanlock shutdown
    # -f 1`): the new daemon holds no lockspace of this host.
    agent.daemon.client("shutdown", "-f", "1")
    agent.daemon.proc.wait(30)
    wait_for(lambda: lockspace(agent, shared[0]) in ("lost", "failed"), 30,
             what="the lockspace seen lost")
    data = _refused_for_its_lockspace(agent, shared[0])
    assert data["lockspace"] in ("lost", "failed")
    agent.daemon.start()
    joined(agent, shared[0], timeout=90)
    assert agent.call("Volume.create", {**_volume(agent, shared[0]),
                                        "size": MiB})["legality"] == "LEGAL"
    stats = {d["domainID"]: d for d in agent.call("StorageDomain.list")}
    assert stats[shared[0]]["lockspace"] == "joined" and stats[shared[0]]["error"] is None


def test_a_lockspace_removed_under_the_agent_is_found_by_its_first_worker(make_agent, daemons,
                                                                         shared):
    agent = first_host(make_agent, daemons, shared)
    agent.daemon.client("rem_lockspace", "-s", f"{shared[0]}:1:{shared[1]}/dom_md/ids:0")
    with pytest.raises(CallError) as exc:  # the worker's acquire: no lockspace here
        agent.call("Volume.create", {**_volume(agent, shared[0]), "size": MiB})
    assert exc.value.code == 214 and exc.value.data["reason"] == "lockspace", exc.value
    joined(agent, shared[0], timeout=90)  # and the agent joined it again by itself
    assert agent.call("Volume.create", {**_volume(agent, shared[0]),
                                        "size": MiB})["legality"] == "LEGAL"


def test_a_damaged_lease_area_is_made_again_when_nobody_can_hold_it(make_agent, daemons,
                                                                    shared):
    agent = first_host(make_agent, daemons, shared)
    loc = _volume(agent, shared[0])
    agent.call("Volume.create", {**loc, "size": MiB})  # its lease taken and released
    area = f"{shared[1]}/leases/{loc['volumeID']}.sanlock"
    with open(area, "r+b") as f:
        f.write(b"\xde\xad" * 2048)  # the area's first sectors: garbage
    assert agent.call("Volume.delete", loc)["deleted"] is True
    with pytest.raises(CallError) as exc:
        agent.call("Volume.getInfo", loc)
    assert exc.value.code == 201
    assert "lease_area_rebuilt" in agent.log_path.read_text()
