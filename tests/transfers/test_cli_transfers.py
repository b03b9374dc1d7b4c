"""`hostagent upload` and `download` as a person runs them: equal guest views, thin files,
and transfers cut short by a SIGKILL of the command or of the agent that the same command
resumes, sending less than the whole (counted), never turning a partial upload LEGAL."""

import os

import pytest

from tests.images.chains import compare, needs_qemu, qemu_nbd_under
from tests.support.harness import wait_for
from tests.support.storage_flow import MiB, new_id, recorded_checksum
from tests.transfers.helpers import (
    allocated,
    data_bytes,
    hostagent,
    killed_mid_way,
    local_image,
    run,
)

pytestmark = needs_qemu
SIZE = 256 * MiB
SUFFIX = {"raw": ".raw", "cow": ".qcow2"}


@pytest.fixture
def local(workdir):
    path = workdir / "local"
    path.mkdir()
    return path


def where(agent, loc, fmt) -> str:
    return os.path.join(agent.root, "images", loc["imageID"], loc["volumeID"] + SUFFIX[fmt])


def show(loc) -> str:
    return f"{loc['domainID']}/{loc['imageID']}/{loc['volumeID']}"


@pytest.mark.parametrize("local_fmt,volume_fmt", [("qcow2", "cow"), ("raw", "raw"),
                                                  ("raw", "cow")])
def test_an_upload_and_its_downloads_equal_the_source_and_stay_thin(domain_agent, local,
                                                                    local_fmt, volume_fmt):
    agent = domain_agent
    src = local_image(local / f"src.{local_fmt}", local_fmt, SIZE)
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    code, answer, err = run(agent, "upload", src, show(loc), "--local-format", local_fmt,
                            "--format", volume_fmt)
    assert code == 0, err
    data = data_bytes(src, local_fmt)
    assert answer["bytes"]["sent"] == data and answer["resumed"] is False
    info = agent.call("Volume.getInfo", loc)
    assert info["legality"] == "LEGAL" and info["format"] == volume_fmt
    assert info["allocated"] <= data + 4 * MiB  # zeros and holes were never written
    assert compare(src, "cow" if local_fmt == "qcow2" else "raw", info["path"],
                   volume_fmt).returncode == 0
    assert recorded_checksum(agent.root, loc["volumeID"]) == answer["result"]["checksum"]
    for fmt in ("raw", "qcow2"):
        out = str(local / f"down.{fmt}")
        code, answer, err = run(agent, "download", show(loc), out, "--format", fmt)
        assert code == 0, err
        assert compare(info["path"], volume_fmt, out, "cow" if fmt == "qcow2" else
                       "raw").returncode == 0
        assert allocated(out) <= data + 4 * MiB
        assert not os.path.exists(out + ".hostagent-download")
    assert qemu_nbd_under(str(local)) == []
    assert qemu_nbd_under(str(agent.root)) == []


@pytest.mark.parametrize("who", ["client", "agent"])
@pytest.mark.parametrize("local_fmt", ["raw", "qcow2"])
def test_an_upload_cut_short_resumes_sending_only_what_is_missing(domain_agent, local, who,
                                                                  local_fmt):
    agent = domain_agent
    src = local_image(local / f"src.{local_fmt}", local_fmt, SIZE, seed=3)
    data = data_bytes(src, local_fmt)
    fmt = "cow" if local_fmt == "qcow2" else "raw"
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    proc = hostagent(agent, "upload", src, show(loc), "--local-format", local_fmt,
                     "--rate", "16M")
    killed_mid_way(agent, proc, where(agent, loc, fmt), who)
    if who == "agent":
        agent.start()
    else:
        wait_for(lambda: not qemu_nbd_under(str(local)), what="the client's qemu-nbd gone")
    status = agent.call("Image.getStatus", loc)
    assert status["legality"] == "ILLEGAL" and status["transfer"] is not None
    code, answer, err = run(agent, "upload", src, show(loc), "--local-format", local_fmt)
    assert code == 0, err
    assert answer["resumed"] is True
    assert 0 < answer["bytes"]["sent"] < data, answer["bytes"]
    assert answer["bytes"]["skipped"] > 0
    info = agent.call("Volume.getInfo", loc)
    assert info["legality"] == "LEGAL" and info["transfer"] is None
    assert compare(src, fmt, info["path"], fmt).returncode == 0
    assert qemu_nbd_under(str(local)) == []


def _uploaded(agent, local, seed: int):
    src = local_image(local / "src.raw", "raw", SIZE, seed=seed)
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    code, _, err = run(agent, "upload", src, show(loc))
    assert code == 0, err
    return src, loc


@pytest.mark.parametrize("who", ["client", "agent"])
def test_a_download_cut_short_resumes_fetching_only_what_is_missing(domain_agent, local, who):
    agent = domain_agent
    src, loc = _uploaded(agent, local, 5)
    data = data_bytes(src, "raw")
    out = str(local / "down.raw")
    proc = hostagent(agent, "download", show(loc), out, "--rate", "16M")
    killed_mid_way(agent, proc, out, who)
    if who == "agent":
        agent.start()
    assert os.path.exists(out + ".hostagent-download")
    code, answer, err = run(agent, "download", show(loc), out)
    assert code == 0, err
    assert answer["resumed"] is True and 0 < answer["bytes"]["sent"] < data, answer["bytes"]
    assert compare(src, "raw", out, "raw").returncode == 0
    assert not os.path.exists(out + ".hostagent-download")
    assert qemu_nbd_under(str(agent.root)) == []


def test_a_partial_download_whose_source_changed_is_named_not_patched(domain_agent, local):
    agent = domain_agent
    src, loc = _uploaded(agent, local, 6)
    out = str(local / "down.raw")
    proc = hostagent(agent, "download", show(loc), out, "--rate", "16M")
    killed_mid_way(agent, proc, out, "client")
    generation = agent.call("Volume.getInfo", loc)["generation"]
    agent.call("Volume.fence", {**loc, "generation": generation})
    code, answer, err = run(agent, "download", show(loc), out)
    assert code == 1 and "changed" in answer["error"], (answer, err)
    code, answer, err = run(agent, "download", show(loc), out, "--restart")
    assert code == 0 and answer["resumed"] is False, err
    assert compare(src, "raw", out, "raw").returncode == 0
    code, answer, err = run(agent, "download", show(loc), str(src))  # not a partial one
    assert code == 1 and "not a partial download" in answer["error"]


def test_a_qcow2_file_must_say_its_format_and_another_upload_is_never_resumed(
        domain_agent, local):
    agent = domain_agent
    src = local_image(local / "src.qcow2", "qcow2", 32 * MiB)
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    code, _, err = run(agent, "upload", src, show(loc))
    assert code == 2 and "--local-format qcow2" in err
    other = local_image(local / "other.raw", "raw", 128 * MiB, seed=9)
    proc = hostagent(agent, "upload", other, show(loc), "--rate", "8M")
    killed_mid_way(agent, proc, where(agent, loc, "raw"), "client", at=10 * MiB)
    code, answer, err = run(agent, "upload", src, show(loc), "--local-format", "qcow2")
    assert code == 1 and "another upload" in answer["error"], (answer, err)
    assert agent.call("Image.getStatus", loc)["legality"] == "ILLEGAL"


@pytest.mark.parametrize("op,writes", [("export.start", 1), ("export.start", 2),
                                       ("export.finish", 1)])
def test_an_upload_whose_worker_dies_at_a_metadata_write_is_finished_by_running_it_again(
        make_agent, workdir, local, op, writes):
    """The export's or the finish's worker SIGKILLed right after its N-th metadata commit
    (the crash-point seam, workers/testseams.py): the export once its transfer is recorded,
    before it answers (1), or as it records its stop (2); the finish once the volume is
    LEGAL, before it answers. The same command, run again, ends with the volume LEGAL and
    equal to the file, sending only what was not there."""
    from workers.testseams import ENV
    agent = make_agent()
    agent.domain_id, agent.root = new_id(), workdir / "dom"
    agent.call("StorageDomain.create", {"domainID": agent.domain_id, "path": str(agent.root)})
    agent.kill()
    agent.start(env={ENV: f'{{"crash_after_writes": {writes}, "op": "{op}"}}'})
    src = local_image(local / "src.raw", "raw", 64 * MiB, seed=7)
    data = data_bytes(src, "raw")
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    first = run(agent, "upload", src, show(loc))
    status = agent.call("Image.getStatus", loc)
    if op == "export.finish":
        assert first[0] == 1 and status["legality"] == "LEGAL", first
    elif writes == 1:
        assert first[0] == 1 and status["legality"] == "ILLEGAL", first
        assert status["transfer"]["state"] == "interrupted"
    agent.kill()
    agent.start(env={ENV: ""})
    code, answer, err = run(agent, "upload", src, show(loc))
    assert code == 0, err
    if first[0] == 0:  # the export died as it stopped, after the data: finished anyway
        assert answer["bytes"]["sent"] == 0 and answer["resumed"], answer
    elif op == "export.finish":
        assert answer["bytes"]["sent"] == 0 and answer["result"]["already"], answer
    else:
        assert answer["bytes"]["sent"] <= data
    info = agent.call("Volume.getInfo", loc)
    assert info["legality"] == "LEGAL" and info["transfer"] is None
    assert compare(src, "raw", info["path"], "raw").returncode == 0


def test_a_download_of_one_layer_holds_what_that_layer_holds(domain_agent, local):
    """`--layer`: the snapshot's own data (its unallocated ranges read as zeros, its zeroed
    ranges as zeros), not the chain's guest view; equal to qemu's view of the layer alone."""
    import subprocess

    from tests.images.chains import make_chain
    agent = domain_agent
    chain = make_chain(agent, agent.domain_id, size=64 * MiB, base_format="raw", layers=2)
    top = {k: chain[1][k] for k in ("domainID", "imageID", "volumeID")}
    out = str(local / "layer.raw")
    code, answer, err = run(agent, "download", show(top), out, "--layer")
    assert code == 0, err
    alone = f'json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file",' \
            f'"filename":"{chain[1]["path"]}"}}}}'
    want = str(local / "want.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", alone, want], check=True, timeout=60)
    assert compare(want, "raw", out, "raw").returncode == 0
    assert compare(chain[1]["path"], "cow", out, "raw").returncode != 0  # not the guest view
