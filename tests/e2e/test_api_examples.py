"""The examples in docs/api.md (agent/api/examples.py): one per verb, valid, and true."""

import pytest

from agent import api, errors
from agent.api.examples import EXAMPLES
from agent.wire import verbs
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, wait_legal

VERBS = api.load_all()


def test_every_served_verb_has_an_example():
    missing = sorted(set(VERBS) - set(EXAMPLES))
    assert not missing, f"add an example to agent/api/examples.py for {missing}"
    unknown = sorted(set(EXAMPLES) - set(VERBS))
    assert not unknown, f"examples of verbs that do not exist: {unknown}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_params_pass_the_verbs_own_validator(name):
    ex = EXAMPLES[name]
    assert set(ex) <= {"id", "params", "result", "error"}
    assert ("result" in ex) != ("error" in ex), "a result or an error, not both"
    verbs.bind(VERBS[name], ex["params"])  # raises InvalidParams if the example lies
    if "error" in ex:
        cls = errors.BY_NAME[ex["error"]["data"]["name"]]
        assert ex["error"]["code"] == cls.code


def same_shape(example, real, where="result"):
    """Objects have the same keys, recursively (null stands for any value; lists are
    compared by their first elements; a record's own result and error, whose shape is
    another verb's, are not looked into)."""
    if example is None or real is None:
        return
    if isinstance(example, dict):
        assert isinstance(real, dict), f"{where}: {real!r} is not an object"
        assert set(example) == set(real), \
            f"{where}: example keys {sorted(example)} != real {sorted(real)}"
        for k in example:
            if k not in ("result", "error"):
                same_shape(example[k], real[k], f"{where}.{k}")
    elif isinstance(example, list) and example and real:
        same_shape(example[0], real[0], f"{where}[0]")


def test_example_results_have_the_shape_of_real_answers(agent, workdir):
    """Run (nearly) every verb on a real agent; each answer has its example's shape."""
    domain_id = new_id()
    real = {}
    c = agent.client(timeout=30)

    def call(name, params, **kw):
        real[name] = c.call(name, params, **kw)
        return real[name]
    call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    src = make_source(agent, domain_id, 4 * MiB)
    call("Volume.create", {**dst_for(domain_id), "size": MiB, "format": "cow"})
    call("Volume.getInfo", src)
    call("Image.getInfo", {"domainID": domain_id, "imageID": src["imageID"]})
    call("StorageDomain.getInfo", {"domainID": domain_id})
    call("StorageDomain.list", None)
    dst = dst_for(domain_id)
    call("Image.copy", {"src": src, "dst": dst})
    wait_legal(agent, dst)
    call("Image.getStatus", dst)
    call("Volume.delete", dst)
    call("Host.ping", None)
    call("Host.getStats", None)
    call("Host.getCapabilities", None)
    call("Debug.sleep", {"seconds": 0}, id="ex-sleep")
    call("Task.getStatus", {"taskID": "ex-sleep"})
    call("Task.getAll", {"states": ["done"]})
    c.send("Debug.sleep", {"seconds": 30}, id="ex-abort")
    call("Task.abort", {"taskID": "ex-abort"})
    call("Image.checksum", {**src, "algorithm": "blake2b"})
    up = dst_for(domain_id)
    call("Export.start", {**up, "mode": "write", "tag": "t", "create": {"size": MiB,
                                                                       "format": "cow"}},
         id="ex-up")
    call("Export.stop", {"taskID": "ex-up", "finish": True}, id="ex-fin")
    call("Export.finish", up)
    call("StorageDomain.startScrub", {"domainID": domain_id})
    call("StorageDomain.getOperationStatuses", {"domainID": domain_id})
    for name, value in real.items():
        if "result" in EXAMPLES[name]:
            same_shape(EXAMPLES[name]["result"], value, name)
    # Image.getStatus while a copy runs carries the marker: its shape too.
    example_copy = EXAMPLES["Image.getStatus"]["result"]["copy"]
    marker_keys = {"source", "copied", "total", "percent", "state", "generation", "attempts",
                   "failures", "errors", "started", "updated", "host_id", "task_id", "lease"}
    assert set(example_copy) == marker_keys
