"""This host's membership of each attached domain's lockspace (the sanlock lease manager).

With sanlock, a host must join a domain's lockspace (its host ID in the domain's `ids`)
before it can take a lease there. Joining takes seconds (longer after an unclean stop), so it
runs in a worker, never in the loop: the domain reads `joining` until it is joined, and the
work that needs its leases (copies, creates, deletes, start-up recovery's scan of its
markers) waits meanwhile as pending tasks, started in order once it is joined, failed (with
the join's error) if it cannot be. The agent answers throughout. The lockspace belongs to
the sanlock daemon, not to the agent: after an agent crash the restarted agent finds it
joined at once.

The agent follows the daemon, with no restart of its own. A join that fails (the daemon
not running yet, the storage not answering) is tried again with backoff (JOIN_BACKOFF,
doubling up to JOIN_BACKOFF_MAX), the domain reading `failed` meanwhile. The daemon is
looked at every DAEMON_CHECK seconds (its pid file, and that process's start time: local,
no storage I/O): a daemon that went or was started anew holds none of this host's
lockspaces, so every joined one is `lost` and is joined again at once; a worker whose lease
request finds no lockspace says so too (DomainUnusable, data.lockspace "lost") and the same
follows. Work that needs a lockspace that is `failed` or `lost` is refused with the truth
(214 DomainUnusable, reason lockspace), never sent to a worker to fail with sanlock's
ENOSPC; work that arrives while it is `joining` waits and runs once it is joined.

With the local lease manager there is nothing to join: every domain is `joined`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import psutil

from agent import errors, logs
from agent.supervisor import states
from agent.supervisor.jobs import WorkerJob

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

log = logs.get(component="lockspaces")

JOIN_BACKOFF = 1.0  # seconds before the first retry of a failed join; doubled each time
JOIN_BACKOFF_MAX = 60.0
DAEMON_CHECK = 2.0  # seconds between looks at the sanlock daemon
DEFAULT_SANLOCK_RUN_DIR = "/run/sanlock"  # sanlock's own default

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
        leases = config.leases
        self.manager = leases["manager"]
        self.state: dict[str, str] = {}  # domainID -> joining | joined | failed | lost
        self.errors: dict[str, dict] = {}
        self.parked: dict[str, list] = {}  # domainID -> [(task, job)], oldest first
        self.failures: dict[str, int] = {}  # domainID -> joins failed in a row
        self.pid_file = os.path.join(leases.get("run_dir") or DEFAULT_SANLOCK_RUN_DIR,
                                     "sanlock.pid")
        self._daemon: tuple | None = None  # (pid, start time) of the daemon last seen
        self._next_check = 0.0

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
        self._set(agent, domain_id, "joined" if ok else "failed",
                  None if ok else (error.to_json() if error else {}))
        if ok:
            self.failures.pop(domain_id, None)
            log.info("lockspace_joined", domain_id=domain_id, **(result or {}))
        else:
            n = self.failures[domain_id] = self.failures.get(domain_id, 0) + 1
            delay = min(JOIN_BACKOFF * 2 ** (n - 1), JOIN_BACKOFF_MAX)
            log.error("lockspace_join_failed", domain_id=domain_id, failures=n,
                      retry_in=delay, error=self.errors[domain_id])
            agent.call_later(delay, lambda: self._retry(agent, domain_id))
        for parked_task, job in self.parked.pop(domain_id, []):
            if not parked_task.active:
                continue
            if ok:
                agent.run_task(parked_task, lambda *_, job=job: job, None)
            else:
                agent.end(parked_task, "fail", error=errors.DomainUnusable(
                    "this host could not join the domain's lockspace", domainID=domain_id,
                    reason="lockspace", lockspace="failed", cause=self.errors[domain_id]))

    def _set(self, agent: Supervisor, domain_id: str, state: str, error: dict | None) -> None:
        self.state[domain_id] = state
        if error is None:
            self.errors.pop(domain_id, None)
        else:
            self.errors[domain_id] = error
        agent.publish("StorageDomain.state", {"domainID": domain_id, "state": state,
                                              "error": error})

    def _retry(self, agent: Supervisor, domain_id: str) -> None:
        if self.state.get(domain_id) == "failed" and domain_id in agent.domains.paths:
            self.join(agent, domain_id)

    def lost(self, agent: Supervisor, domain_id: str, why: str) -> None:
        """This host no longer holds the domain's lockspace (the daemon restarted, or a
        worker found none): say so, and join again."""
        if not self.needed or self.state.get(domain_id) != "joined":
            return
        log.warning("lockspace_lost", domain_id=domain_id, why=why)
        self._set(agent, domain_id, "lost", {"message": why})
        self.join(agent, domain_id)

    def tick(self, agent: Supervisor) -> None:
        """Each turn of the loop: every DAEMON_CHECK seconds, whether the sanlock daemon
        this host talks to is the one its lockspaces were joined with."""
        if not self.needed:
            return
        now = agent.system.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + DAEMON_CHECK
        daemon = _daemon_identity(self.pid_file)
        before, self._daemon = self._daemon, daemon
        if daemon == before:
            return
        for domain_id, state in list(self.state.items()):
            if state == "joined" and (daemon is None or before is not None):
                self.lost(agent, domain_id, "the sanlock daemon went away" if daemon is None
                          else "the sanlock daemon was started anew")
            elif state == "failed" and daemon is not None:  # a daemon at last: try now
                self.join(agent, domain_id)

    def park(self, task, job: WorkerJob) -> bool:
        """Hold `task` as pending while a domain its job needs is still joining; refuse it
        (214, reason lockspace) while this host holds no lockspace there."""
        if not self.needed or job.joins or job.op not in LEASED_OPS:
            return False
        for domain_id in sorted(_domains_of(job)):
            state = self.state.get(domain_id)
            if state == "joining":
                self.parked.setdefault(domain_id, []).append((task, job))
                return True
            if state in ("failed", "lost"):
                raise errors.DomainUnusable(
                    "this host holds no lockspace in the domain (it is joining again)",
                    domainID=domain_id, reason="lockspace", lockspace=state,
                    cause=self.errors.get(domain_id))
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


def _daemon_identity(pid_file: str) -> tuple | None:
    """(pid, start time) of the sanlock daemon named by its pid file, or None if none runs
    (the start time tells a restarted daemon from one whose pid was reused)."""
    try:
        with open(pid_file) as f:
            pid = int(f.read(32).strip())
        return pid, psutil.Process(pid).create_time()
    except (OSError, ValueError, psutil.Error):
        return None
