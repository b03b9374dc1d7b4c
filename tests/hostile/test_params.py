"""Hostile values inside well-formed requests. Every verb's documented params
(agent/api/examples.py, on a real domain and a real chain), with each param, nested ones
too, in turn replaced by a hostile value or left out: every answer is a result or a named
agent error, never an internal error, and every task it started ends the same way. The
agent's own bugs counter stays at zero and no traceback reaches its log.

The wire-level fuzz (tests/e2e/test_fuzz.py) sends broken JSON-RPC to the verbs the
supervisor answers; this one reaches every verb's handler and worker with values of the
right JSON shape and the wrong meaning. --hostile-scale 3 or more tries every value on
every param (docs/reliability.md); CI tries a rotating share of them."""

from __future__ import annotations

import copy
import itertools

import pytest

from agent import api, errors
from agent.api.examples import DOMAIN, DST_IMAGE, DST_VOLUME, EXAMPLES, IMAGE, VOLUME
from agent.client import CallError
from tests.support.harness import wait_for
from agent.wire import verbs
from tests.support.storage_flow import MiB, new_id

pytestmark = pytest.mark.timeout(600)
SNAPSHOT = EXAMPLES["Image.merge"]["params"]["topVolumeID"]
LEFT_OUT = object()
# Values of every JSON type, the edges of integers, paths and names a handler might trust.
HOSTILE = [None, True, False, -1, 0, 1, 511, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
           -2**63, 1.5, -0.0, 1e308, "", " ", "x" * 5000, "../../../etc/passwd",
           "/etc/passwd", "/proc/self/mem", "a\x00b", "é" * 100, "nbd://127.0.0.1:1/x",
           "-o", "checkpoint-7", [], [1], {}, {"a": 1}, "VOLUME", "SNAPSHOT", "FRESH"]
SHARE = 5  # values the validator refuses a param is given at scale 1 (all, across params)
NOT_SENT = {"Debug.crash", "Debug.fault", "Debug.sleep"}  # debug seams: their job is to fail
GONE_WRONG = ("InternalError", "WorkerDied")
VERBS = api.load_all()


def leaves(obj, at=()):
    """The path of every param, nested ones included."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield at + (key,)
            yield from leaves(value, at + (key,))


def replaced(params: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(params)
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    if value is LEFT_OUT:
        del inner[path[-1]]
    else:
        inner[path[-1]] = value
    return out


class Scene:
    """A domain, and for each verb a fresh image: a raw volume and a cow snapshot of it,
    so that a verb that deletes or merges leaves the next one a whole chain."""

    def __init__(self, agent, workdir):
        self.agent, self.workdir = agent, workdir
        self.client = agent.client(timeout=60)
        self.domain = new_id()
        self.path = str(workdir / "dom")
        self.client.call("StorageDomain.create", {"domainID": self.domain, "path": self.path})
        self.ids = itertools.count()
        self.started: list[str] = []  # task IDs of requests that were taken

    def fresh_image(self) -> dict:
        names = {DOMAIN: self.domain, IMAGE: new_id(), VOLUME: new_id(), SNAPSHOT: new_id(),
                 DST_IMAGE: new_id(), DST_VOLUME: new_id(),
                 EXAMPLES["StorageDomain.create"]["params"]["path"]: self.path}
        loc = {"domainID": self.domain, "imageID": names[IMAGE]}
        self.client.call("Volume.create", {**loc, "volumeID": names[VOLUME], "size": 4 * MiB,
                                           "format": "raw"})
        self.client.call("Volume.create", {**loc, "volumeID": names[SNAPSHOT],
                                           "parentVolumeID": names[VOLUME], "format": "cow"})
        return names

    def call(self, method: str, params: dict) -> None:
        """Send one request: a result, or a named error that is not a bug's."""
        tid = f"p{next(self.ids)}"
        try:
            self.client.call(method, params, id=tid)
        except CallError as exc:
            assert exc.name in errors.BY_NAME and exc.name not in GONE_WRONG, \
                (method, params, exc.error)
            assert exc.code == errors.BY_NAME[exc.name].code, exc.error
            return
        self.started.append(tid)
        if method == "Export.start":  # held open by its task until stopped
            self.client.call("Export.stop", {"taskID": tid})


def values_for(method: str, params: dict, path: tuple, real, k: int, scale: int) -> list:
    """Every hostile value the verb's validator lets through to its handler (those are
    the ones a handler or a worker must stand), and a rotating share of the rest."""
    def passes(value) -> bool:
        try:
            verbs.bind(VERBS[method], replaced(params, path, real(value)))
            return True
        except errors.InvalidParams:
            return False
    through = [v for v in HOSTILE if passes(v)]
    refused = [v for v in HOSTILE if not passes(v)]
    if scale < 3 and refused:
        refused = [refused[(k * SHARE + i) % len(refused)] for i in range(SHARE)]
    return through + refused


def test_hostile_values_in_every_verbs_params_get_named_errors(make_agent, workdir, scale):
    agent = make_agent(workers={"deadline_seconds": 30.0, "kill_grace_seconds": 2.0})
    scene = Scene(agent, workdir)
    pid, counter = agent.pid, itertools.count()
    for method in sorted(set(EXAMPLES) - NOT_SENT):
        if not isinstance(EXAMPLES[method]["params"], dict):
            continue  # a verb of no params: the wire fuzz's
        names = scene.fresh_image()
        names.update({"VOLUME": names[VOLUME], "SNAPSHOT": names[SNAPSHOT],
                      "FRESH": new_id()})

        def real(obj):
            if isinstance(obj, dict):
                return {k: real(v) for k, v in obj.items()}
            return names.get(obj, obj) if isinstance(obj, str) else obj
        params = real(EXAMPLES[method]["params"])
        for path in list(leaves(params)):
            k = next(counter)
            for value in [*values_for(method, params, path, real, k, scale), LEFT_OUT]:
                scene.call(method, replaced(params, path, real(value)))
    assert agent.proc.poll() is None and agent.pid == pid, agent.log()

    def ended():
        records = [agent.call("Task.getStatus", {"taskID": t}) for t in scene.started]
        return all(r["state"] in ("done", "failed", "aborted") for r in records) and records
    records = wait_for(ended, 120, what="every task the requests started to end")
    wrong = [r for r in records if r["error"] and r["error"]["data"]["name"] in GONE_WRONG]
    assert not wrong, wrong
    assert agent.call("Host.getStats")["agent"]["callback_errors"] == 0
    assert "Traceback" not in agent.log(tail=10**8)
