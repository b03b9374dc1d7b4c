"""This host's membership of each attached domain's lockspace (the sanlock lease manager).

With sanlock, a host must join a domain's lockspace (its host ID in the domain's `ids`)
before it can take a lease there. Joining takes seconds (longer after an unclean stop), so it
runs in a worker, never in the loop: the domain reads `joining` until it is joined, and the
work that needs its leases (copies, creates, deletes, start-up recovery's scan of its
markers) waits meanwhile as pending tasks, started in order once it is joined, failed (with
the join's error) if it cannot be. The agent answers throughout. The lockspace belongs to
the sanlock daemon, not to the agent: after an agent crash the restarted agent finds it
joined at once.

With the local lease manager there is nothing to join: every domain is `joined`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import errors, logs
from agent.supervisor import states
from agent.supervisor.jobs import WorkerJob

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

log = logs.get(component="lockspaces")

# The work that takes leases in a domain, and so waits for its lockspace; queries do not.
LEASED_OPS = {"image.copy", "image.abandon", "volume.create", "volume.delete",
              "volume.fence", "domain.scan"}


def _domains_of(job: WorkerJob) -> set[str]:
    args = job.args or {}
    found = {args.get("domainID")}
    for key in ("src", "dst"):
        if isinstance(args.get(key), dict):
            found.add(args[key].get("domainID"))
    return {d for d in found if isinstance(d, str)}


class Lockspaces:
    def __init__(self, config):
        self.manager = config.leases["manager"]
        self.state: dict[str, str] = {}  # domainID -> joining | joined | failed
        self.errors: dict[str, dict] = {}
        self.parked: dict[str, list] = {}  # domainID -> [(task, job)], oldest first

    @property
    def needed(self) -> bool:
        return self.manager == "sanlock"

    def state_of(self, domain_id: str) -> str:
        return self.state.get(domain_id, "joined" if not self.needed else "unjoined")

    def join(self, agent: Supervisor, domain_id: str) -> None:
        """Join `domain_id`'s lockspace in a worker (or find it joined): idempotent."""
        if not self.needed or self.state.get(domain_id) in ("joining", "joined"):
            return
        self.state[domain_id] = "joining"
        job = WorkerJob("domain.join", {"domainID": domain_id,
                                        "path": agent.domains.path(domain_id)},
                        on_end=self._joined, joins=domain_id)
        try:
            agent.submit(f"join:{domain_id}", "StorageDomain.join", job, queued=False)
        except errors.AgentError as exc:  # the ID is in use: a join of ours is running
            log.info("join_not_started", domain_id=domain_id, why=exc.message)

    def _joined(self, agent: Supervisor, task, outcome: str, result, error) -> None:
        domain_id = task.job.args["domainID"]
        ok = outcome == states.DONE
        self.state[domain_id] = "joined" if ok else "failed"
        if ok:
            self.errors.pop(domain_id, None)
            log.info("lockspace_joined", domain_id=domain_id, **(result or {}))
        else:
            self.errors[domain_id] = error.to_json() if error else {}
            log.error("lockspace_join_failed", domain_id=domain_id, error=self.errors[domain_id])
        agent.publish("StorageDomain.state", {"domainID": domain_id,
                                              "state": self.state[domain_id],
                                              "error": self.errors.get(domain_id)})
        for parked_task, job in self.parked.pop(domain_id, []):
            if not parked_task.active:
                continue
            if ok:
                agent.run_task(parked_task, lambda *_, job=job: job, None)
            else:
                agent.end(parked_task, "fail", error=errors.DomainUnusable(
                    "this host could not join the domain's lockspace", domainID=domain_id,
                    reason="lockspace", cause=self.errors[domain_id]))

    def park(self, task, job: WorkerJob) -> bool:
        """Hold `task` as pending while a domain its job needs is still joining."""
        if not self.needed or job.joins or job.op not in LEASED_OPS:
            return False
        for domain_id in sorted(_domains_of(job)):
            if self.state.get(domain_id) == "joining":
                self.parked.setdefault(domain_id, []).append((task, job))
                return True
        return False

    def discard(self, task) -> bool:
        """Take a parked task out (it is being aborted); False if it is not parked."""
        for waiting in self.parked.values():
            for i, (parked_task, _) in enumerate(waiting):
                if parked_task is task:
                    del waiting[i]
                    return True
        return False

    def waiting(self) -> int:
        return sum(len(v) for v in self.parked.values())
