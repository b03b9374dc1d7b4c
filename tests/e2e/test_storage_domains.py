"""Storage domains and volumes through a running agent."""

import os

import pytest

from agent.client import CallError
from tests.support.storage_flow import MiB, allocated, integrity, new_id


@pytest.fixture
def domain(agent, workdir):
    domain_id, path = new_id(), str(workdir / "dom1")
    info = agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
    assert info["domainID"] == domain_id and info["volumes"] == 0
    return domain_id, path


def err(fn, *args, **kw) -> CallError:
    with pytest.raises(CallError) as exc:
        fn(*args, **kw)
    return exc.value


def test_domain_create_list_info_and_attach_elsewhere(agent, make_agent, domain, workdir):
    domain_id, path = domain
    assert agent.call("StorageDomain.list") == [
        {"domainID": domain_id, "path": path, "attached_by": "attach",
         "lockspace": "joined", "error": None}]
    info = agent.call("StorageDomain.getInfo", {"domainID": domain_id})
    assert info["capacity"] >= info["free"] > 0 and info["volumes"] == 0
    assert err(agent.call, "StorageDomain.create", {"domainID": domain_id, "path": path}
               ).name == "DomainExists"
    other = make_agent("b")
    assert err(other.call, "StorageDomain.attach", {"domainID": new_id(), "path": path}
               ).name == "NoSuchDomain"
    other.call("StorageDomain.attach", {"domainID": domain_id, "path": path})
    assert other.call("StorageDomain.getInfo", {"domainID": domain_id})["domainID"] == domain_id
    # Attachments made by RPC survive a restart of the agent.
    other.kill()
    other.start()
    assert [d["domainID"] for d in other.call("StorageDomain.list")] == [domain_id]
    assert err(agent.call, "StorageDomain.create",
               {"domainID": new_id(), "path": str(workdir / "dom1")}).name == "DomainExists"
    os.makedirs(workdir / "full")
    (workdir / "full" / "x").write_text("not empty")
    assert err(agent.call, "StorageDomain.create",
               {"domainID": new_id(), "path": str(workdir / "full")}).code == -32602
    assert err(agent.call, "StorageDomain.getInfo", {"domainID": new_id()}).name == "NoSuchDomain"


def test_config_domains_attached_at_start(make_agent, workdir):
    first = make_agent("a")
    domain_id, path = new_id(), str(workdir / "d")
    first.call("StorageDomain.create", {"domainID": domain_id, "path": path})
    second = make_agent("b", storage={"domains": {domain_id: path}})
    assert second.call("StorageDomain.list") == [
        {"domainID": domain_id, "path": path, "attached_by": "config",
         "lockspace": "joined", "error": None}]


def test_volume_lifecycle(agent, domain):
    domain_id, path = domain
    loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    info = agent.call("Volume.create", {**loc, "size": 64 * MiB})
    assert (info["size"], info["legality"], info["generation"]) == (64 * MiB, "LEGAL", 0)
    assert info["path"].startswith(path + "/images/")
    assert os.path.getsize(info["path"]) == 64 * MiB and allocated(info["path"]) == 0
    assert info["lease"] is None or info["lease"]["live"] is False
    assert agent.call("Volume.getInfo", loc) == info
    assert err(agent.call, "Volume.create", {**loc, "size": 1}).name == "VolumeExists"
    assert err(agent.call, "Volume.getInfo", {**loc, "imageID": new_id()}).name == "NoSuchVolume"
    assert agent.call("Volume.delete", loc) == {"volumeID": loc["volumeID"], "deleted": True}
    assert not os.path.exists(info["path"])
    assert err(agent.call, "Volume.getInfo", loc).name == "NoSuchVolume"
    assert err(agent.call, "Volume.delete", loc).name == "NoSuchVolume"
    assert err(agent.call, "Volume.create", {**loc, "domainID": new_id(), "size": 1}
               ).name == "NoSuchDomain"
    assert integrity(path) == "ok"


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "a\x00b", "", 7,
                                 "12345678-1234-1234-1234-1234567890a/"])
def test_ids_that_try_to_escape_are_refused(agent, domain, bad, workdir):
    domain_id, path = domain
    before = sorted(os.listdir(workdir))
    for field in ("imageID", "volumeID", "domainID"):
        loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id(), field: bad}
        e = err(agent.call, "Volume.create", {**loc, "size": 1})
        assert e.code == -32602 and e.data.get("param") == field
    assert sorted(os.listdir(workdir)) == before
    assert os.listdir(os.path.join(path, "images")) == []


def test_symlinked_image_dir_is_refused(agent, domain, workdir):
    domain_id, path = domain
    image_id = new_id()
    outside = workdir / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(path, "images", image_id))
    e = err(agent.call, "Volume.create",
            {"domainID": domain_id, "imageID": image_id, "volumeID": new_id(), "size": 1})
    assert e.code == -32602
    assert os.listdir(outside) == []


def test_delete_refused_while_lease_held(agent, domain):
    """A live lease (here: a copy's destination) makes Volume.delete answer LeaseHeld."""
    from agent.storage.layout import Layout
    from agent.storage.leases import local
    domain_id, path = domain
    loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    agent.call("Volume.create", {**loc, "size": MiB})
    held = local.acquire(Layout(path).lease_path(loc["volumeID"]),
                         {"host_id": "elsewhere", "task_id": "t"})
    try:
        e = err(agent.call, "Volume.delete", loc)
        assert e.name == "LeaseHeld" and e.data["holder"]["host_id"] == "elsewhere"
        assert agent.call("Volume.getInfo", loc)["lease"]["live"] is True
    finally:
        held.release()
    assert agent.call("Volume.delete", loc)["deleted"] is True
