"""An abandon's end (agent/supervisor/recovery.py `abandon_under_policy`): tried again with
backoff for a failure that passes, left for one that does not, and bounded."""

import pytest

from agent import errors
from agent.supervisor import jobs, recovery, states


class Agent:
    """What `_abandon_ended` uses of the supervisor: its config, its timers and the domains
    attached."""

    def __init__(self):
        self.config = {"recovery": {"backoff_seconds": 2.0}}
        self.later = []
        self.domains = type("Domains", (), {"paths": {"d1": "/somewhere"}})()

    def call_later(self, delay, fn):
        self.later.append((delay, fn))


class Task:
    def __init__(self, job):
        self.id, self.method, self.job = "abandon:v:3", "Recovery.abandon", job

    def about(self):
        return {"task_id": self.id, "method": self.method}


def ended(agent, job, outcome, error):
    task = Task(job)
    job.on_end(agent, task, outcome, None, error)
    return task


def test_a_dead_abandon_is_tried_again_with_doubling_backoff_then_left():
    agent = Agent()
    job = recovery.abandon_under_policy(jobs.WorkerJob("image.abandon", {"dst": {}}))
    delays = []
    for _ in range(recovery.MAX_ABANDON_TRIES):
        agent.later.clear()
        ended(agent, job, states.FAILED, errors.WorkerDied("killed"))
        if not agent.later:
            break
        delay, _ = agent.later[0]
        delays.append(delay)
        job = recovery.abandon_under_policy(job, job.args["abandon_try"] + 1)
    assert delays == [2.0 * 2 ** k for k in range(recovery.MAX_ABANDON_TRIES - 1)]
    assert job.args["abandon_try"] == recovery.MAX_ABANDON_TRIES and not agent.later


def test_the_retry_is_the_same_abandon_one_try_later():
    agent = Agent()
    submitted = []
    agent.submit = lambda *a, **kw: submitted.append(a)
    dst = {"domainID": "d1"}
    job = recovery.abandon_under_policy(jobs.WorkerJob("image.abandon", {"dst": dst}))
    ended(agent, job, states.FAILED, errors.OperationFailed("I/O"))
    agent.later[0][1]()
    (task_id, method, again), = submitted
    assert (task_id, method) == ("abandon:v:3", "Recovery.abandon")
    assert again.op == "image.abandon" and again.args == {"dst": dst, "abandon_try": 2}


def test_no_abandon_is_tried_again_in_a_domain_detached_meanwhile():
    agent = Agent()
    submitted = []
    agent.submit = lambda *a, **kw: submitted.append(a)
    for op, args in (("image.abandon", {"dst": {"domainID": "d1"}}),
                     ("image.merge_abandon", {"domainID": "d1", "baseVolumeID": "b"})):
        job = recovery.abandon_under_policy(jobs.WorkerJob(op, args))
        ended(agent, job, states.FAILED, errors.WorkerDied("killed"))
    agent.domains.paths.clear()  # detached before the backoff ran out
    for _, retry in agent.later:
        retry()
    assert submitted == []


@pytest.mark.parametrize("outcome,error", [
    (states.DONE, None),
    (states.ABORTED, None),
    (states.FAILED, errors.GenerationMismatch("the copy changed hands")),
    (states.FAILED, errors.LeaseHeld("someone is at it")),
])
def test_an_abandon_that_ended_or_lost_the_copy_is_not_tried_again(outcome, error):
    agent = Agent()
    job = recovery.abandon_under_policy(jobs.WorkerJob("image.abandon", {"dst": {}}))
    ended(agent, job, outcome, error)
    assert agent.later == []
