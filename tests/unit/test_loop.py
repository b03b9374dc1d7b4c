"""The loop's end of a task, with no sockets (agent/supervisor/loop.py)."""

import json

from agent import config as configmod
from agent.supervisor import states


class Recorder:
    def __init__(self):
        self.published = []

    def publish(self, topic, params):
        self.published.append((topic, params))


def test_an_attachment_is_on_disk_before_the_client_is_told(tmp_path):
    """Supervisor.end runs a task's end hook before it answers: what the hook makes durable
    (RUN_DIR/attached.json) must already be there when the client hears "attached"."""
    from agent.supervisor import recovery
    from agent.supervisor.loop import Supervisor

    agent = Supervisor(configmod.load(overrides={"run_dir": str(tmp_path), "host_id": "h"}))
    agent.events = Recorder()
    on_disk_when_told = []
    task = agent.tasks.admit("d1", "StorageDomain.create", limited=True)
    task.request_id = "d1"
    task.reply = lambda msg: on_disk_when_told.append(
        (msg, json.loads((tmp_path / "attached.json").read_text())))
    agent.tasks.transition(task, "start")
    result = {"domainID": "5d0d0e5e-0000-4000-8000-000000000001", "path": str(tmp_path / "s")}
    from agent.supervisor.jobs import WorkerJob
    agent.domains.reserve(result["domainID"], result["path"])  # as the handler does
    task.job = WorkerJob("domain.create", dict(result), on_end=recovery.domain_created)
    agent.end(task, "succeed", result)
    agent.flush()
    assert on_disk_when_told == [({"jsonrpc": "2.0", "id": "d1", "result": result},
                                  {result["domainID"]: result["path"]})]
    assert task.state == states.DONE and task.reply is None
    assert agent.events.published[-1][0] == "Task.state"
    assert agent.domains.pending == {}  # the reservation ends with the task
