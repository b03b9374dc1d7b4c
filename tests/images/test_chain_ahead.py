"""A chain copy begins each next layer while the one before it copies (workers/ops/copying,
qemu.Ahead): its source's qemu-nbd started and its destination file made on a thread. What
was begun is used in the layer's turn; what could not be done then is done again the usual
way, and nothing begun is left behind.

Copies are rate-limited so the base copies for seconds whatever the machine's speed; the
tests wait on facts (files, processes, events), never on time."""

import os
import subprocess

import psutil

from agent.storage.layout import Layout
from tests.images.chains import (
    announced_wait,
    check,
    compare,
    make_chain,
    needs_qemu,
    qemu_io,
    qemu_nbd_under,
)
from tests.support.harness import events_until, wait_for
from tests.support.storage_flow import MiB, ids, new_id, wait_legal
from workers.ops.copying.chain import layer_ids

pytestmark = needs_qemu

SIZE = 64 * MiB
COPY = {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 16 * MiB}


def started(workdir, make_agent):
    agent = make_agent(copy=COPY)
    agent.domain_id, agent.root = new_id(), str(workdir / "dom")
    agent.call("StorageDomain.create", {"domainID": agent.domain_id, "path": agent.root})
    chain = make_chain(agent, agent.domain_id, size=SIZE, base_format="cow", layers=3)
    qemu_io(chain[0]["path"], "cow", f"write -P 7 0 {SIZE // 2}")  # seconds to copy
    return agent, chain


def destination_paths(agent, chain, dst) -> list[str]:
    """Each layer's destination file, known before the copy: its volume ID is derived
    from the destination's and its source layer's (chain.layer_ids)."""
    layout = Layout(agent.root)
    vids = layer_ids(dst["volumeID"], [{"volume_id": v["volumeID"]} for v in chain])
    return [layout.volume_path(dst["imageID"], vid, "cow") for vid in vids]


def serving(path: str) -> bool:
    """A qemu-nbd whose chain names `path` is running."""
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-nbd" and any(path in a for a in p.info["cmdline"] or ()):
            return True
    return False


def assert_equal_copies(agent, chain, dst):
    image = agent.call("Image.getInfo", {"domainID": agent.domain_id,
                                         "imageID": dst["imageID"]})["chain"]
    assert [v["legality"] for v in image] == ["LEGAL"] * len(chain)
    for copy, source in zip(image, chain):
        assert compare(source["path"], "cow", copy["path"], "cow").returncode == 0
        assert check(copy["path"])["check-errors"] == 0


def test_a_chain_copy_begins_the_next_layer_while_the_one_before_it_copies(make_agent,
                                                                             workdir):
    agent, chain = started(workdir, make_agent)
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    paths = destination_paths(agent, chain, dst)
    answer = agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst,
                                                "mode": "chain"}, id="c1")
    base = {**dst, "volumeID": answer["chain"][0]}
    # The middle layer's destination made, and its source served, while the base copies.
    wait_for(lambda: subprocess.run(["qemu-img", "info", "-U", paths[1]],
                                    capture_output=True).returncode == 0
             and serving(chain[1]["path"]), timeout=60,
             what="the middle layer begun while the base copies")
    assert agent.call("Image.getStatus", base)["legality"] == "ILLEGAL"
    assert not any(serving(p) for p in paths[1:])  # begun, not opened for writing
    wait_legal(agent, dst)
    assert_equal_copies(agent, chain, dst)
    assert qemu_nbd_under(agent.root) == []


def test_a_next_layer_that_could_not_be_begun_is_made_in_its_turn(make_agent, workdir):
    """The middle layer's destination path is held by another writer (a killed life's
    qemu-nbd, as it were) while the base copies: the making begun ahead fails, and the
    layer's turn waits the lock out as any copy does (Image.copy waiting, image-locked),
    makes the file again and copies it whole."""
    agent, chain = started(workdir, make_agent)
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    paths = destination_paths(agent, chain, dst)
    Layout(agent.root).ensure_image_dir(dst["imageID"])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", paths[1], str(SIZE)],
                   check=True)
    events = agent.subscribe("Image.copy")
    vids = layer_ids(dst["volumeID"], [{"volume_id": v["volumeID"]} for v in chain])
    seen = announced_wait(workdir, paths[1], "cow", events, lambda: agent.client().call(
        "Image.copy", {"src": ids(chain[-1]), "dst": dst, "mode": "chain"}, id="c1"))
    assert seen[-1]["params"]["volumeID"] == vids[1]  # in the middle layer's turn
    assert [e["params"]["volumeID"] for e in seen
            if e["params"].get("state") == "done"] == [vids[0]]
    events_until(events, lambda e: e["params"].get("volumeID") == dst["volumeID"]
                 and e["params"].get("state") == "done", timeout=60)
    wait_legal(agent, dst)
    assert_equal_copies(agent, chain, dst)
    assert qemu_nbd_under(agent.root) == []


def test_a_chain_copy_that_fails_in_a_layer_begun_ahead_names_it_and_leaves_nothing(
        make_agent, workdir):
    """The middle layer's source file is gone once its turn has been begun (its qemu-nbd
    started while the base copies): its turn fails with a named error, recorded on its
    marker, and what was begun for it is ended with the copy."""
    agent, chain = started(workdir, make_agent)
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    middle = {**dst, "volumeID": layer_ids(
        dst["volumeID"], [{"volume_id": v["volumeID"]} for v in chain])[1]}
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "mode": "chain"},
                        id="c1")
    wait_for(lambda: serving(chain[1]["path"]), timeout=60, what="the middle layer begun")
    os.unlink(chain[1]["path"])
    status = wait_for(lambda: (s := agent.call("Image.getStatus", middle))["copy"]["errors"]
                      and s, timeout=60, what="the middle layer's error recorded")
    error = status["copy"]["errors"][0]
    assert error["data"]["name"] == "CopyConflict" and error["data"]["reason"] == \
        "source-gone", error
    wait_for(lambda: qemu_nbd_under(agent.root) == [], timeout=30, what="no qemu-nbd left")
