"""Leftover work derived from storage, and what the recovery policy does with it.

`decide` and `after_failure` are pure: a copy marker (or a failed copy) in, an action out.
The rest wires them to the supervisor: scans at start-up and at attach, retries with backoff,
abandoning. Task IDs the agent chooses, so an engine can recognise them:

    scan:<domainID>                  a domain's start-up (or attach) scan (Recovery.scan)
    recover:<volumeID>:<generation>  a copy re-issued at start-up from the marker it found
    retry:<volumeID>:<generation>    a failed copy retried (attempt n+1)
    abandon:<volumeID>:<generation>  a copy given up (Recovery.abandon)

A merge (Image.merge) is recovered, retried and abandoned (Recovery.abandonMerge) the same
way, under the same policy, its volumeID being its base's: a base is never a copy's
destination at the same time, so the IDs cannot meet.

The generation is the marker's at the moment the decision was taken; the worker takes over
only if it is still that, so two agents deciding the same thing resume a marker once.

`max_attempts` bounds the copy's own failures (the marker's `failures`, each recorded with
its reason in `errors`), not its take-overs (`attempts`): an agent that restarts, or a host
that dies, is not a failure of the copy, and a copy resumed after any number of restarts
still has all its tries.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from agent import errors, logs
from agent.supervisor import jobs, states

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

log = logs.get(component="recovery")

MAX_BACKOFF = 600.0  # seconds: the longest wait before a retry, however many failures
MAX_FAILED_TASKS = 32  # named in a retry (each is a failure: max_attempts ends it sooner)
MAX_ABANDON_TRIES = 8  # an abandon that keeps failing: then left to the next start-up
RETRYABLE = frozenset({"WorkerDied", "WorkerTimeout", "NoSpace", "OperationFailed",
                       "InternalError"})


def decide(marker: dict, *, policy: str, host_id: str, resume_foreign: bool,
           max_attempts: int, source_attached: bool) -> str:
    """What start-up does with one marker: resume, restart, abandon, leave, or skip:<why>."""
    if marker["lease_live"]:
        return "skip:lease-live"  # its copier is alive (here or on another host)
    if marker["state"] == "abandoned":
        return "skip:abandoned"  # given up earlier; only an Image.copy from a client continues
    if marker["host_id"] != host_id and not resume_foreign:
        return "skip:foreign"
    if policy == "manual":
        return "leave"
    if policy == "abandon" or marker.get("failures", 0) >= max_attempts:
        return "abandon"
    if not source_attached:
        return "skip:source-not-attached"
    return policy  # resume or restart


def after_failure(error_name: str | None, failures: int, *, policy: str,
                  max_attempts: int) -> str:
    """What to do when a copy task failed after it owned its marker (``failures``: the
    copy's failures, this one included): retry, abandon or leave."""
    if error_name not in RETRYABLE or policy == "manual":
        return "leave"
    if policy == "abandon" or failures >= max_attempts:
        return "abandon"
    return "retry"


def copy_under_policy(agent: Supervisor, src: dict, dst: dict, **extra) -> jobs.WorkerJob:
    """A copy (every copy: a client's, a recovered one, a retry) whose failure is retried or
    abandoned by the copy policy (_copy_ended)."""
    return jobs.copy(agent.domains, src, dst, on_end=_copy_ended, **extra)


def scan(agent: Supervisor, domain_id: str, startup: bool) -> None:
    job = jobs.scan(agent.domains, domain_id, on_end=_scan_ended)
    _submit(agent, f"scan:{domain_id}", "Recovery.scan", job, startup=startup, queued=False)


def _submit(agent: Supervisor, task_id: str, method: str, job: jobs.WorkerJob, **how):
    try:
        return agent.submit(task_id, method, job, **how)
    except errors.TaskIdInUse:
        log.info("already_running", task_id=task_id)  # the same decision taken twice
        return None


def domain_created(agent: Supervisor, task, outcome: str, result, error) -> None:
    """A create's end: the domain is remembered as attached (before the client is told)."""
    try:
        if outcome == states.DONE:
            agent.domains.attach(result["domainID"], result["path"])
            agent.lockspaces.join(agent, result["domainID"])
    finally:
        agent.domains.release(task.job.args["domainID"])


def domain_attached(agent: Supervisor, task, outcome: str, result, error) -> None:
    """An attach's end: remembered, then its copy markers scanned as at start-up."""
    domain_created(agent, task, outcome, result, error)
    if outcome == states.DONE:
        scan(agent, result["domainID"], startup=False)


def _marker_location(marker: dict, key: str) -> dict:
    if key == "src":
        return {"domainID": marker["src_domain"], "imageID": marker["src_image"],
                "volumeID": marker["src_volume"]}
    return {"domainID": marker["domain_id"], "imageID": marker["image_id"],
            "volumeID": marker["volume_id"]}


def _scan_ended(agent: Supervisor, task, outcome: str, result, error) -> None:
    if outcome != states.DONE:
        log.error("scan_failed", task_id=task.id, error=error and error.to_json())
        return
    cfg = agent.config["recovery"]
    domain_id = result["domainID"]
    if result.get("leftovers_removed"):
        log.info("leftovers_removed", domain_id=domain_id, files=result["leftovers_removed"])
    for marker in result["markers"]:
        marker["domain_id"] = domain_id
        if marker.get("kind") == "chain" and marker.get("has_children"):
            continue  # a chain's inner layer: the copy recovered from its leaf's marker does it
        action = decide(marker, policy=cfg["copy_policy"], host_id=agent.config.host_id,
                        resume_foreign=cfg["resume_foreign"], max_attempts=cfg["max_attempts"],
                        source_attached=marker["src_domain"] in agent.domains.paths)
        src, dst = _marker_location(marker, "src"), _marker_location(marker, "dst")
        gen = marker["generation"]
        started = None
        if action in ("resume", "restart"):
            started = _submit(agent, f"recover:{dst['volumeID']}:{gen}", "Image.copy",
                              copy_under_policy(agent, src, dst, recover=action,
                                                expect_generation=gen,
                                                attempt=marker["attempts"] + 1,
                                                failures=marker.get("failures", 0)))
        elif action == "abandon":
            started = _abandon(agent, dst, gen, None)
        agent.publish("Image.recovered", {
            **dst, "generation": gen, "copied": marker["copied"], "total": marker["size"],
            "marker_host_id": marker["host_id"], "policy": cfg["copy_policy"],
            "action": action, "taskID": started.id if started else None})
        log.info("recovered", volume_id=dst["volumeID"], action=action,
                 task_id=started.id if started else None)
    _recover_merges(agent, domain_id, result.get("merges", []))


def _abandon(agent: Supervisor, dst: dict, gen: int, error: dict | None):
    return _submit(agent, f"abandon:{dst['volumeID']}:{gen}", "Recovery.abandon",
                   abandon_under_policy(jobs.abandon(agent.domains, dst, gen, error)))


def abandon_under_policy(job: jobs.WorkerJob, tries: int = 1) -> jobs.WorkerJob:
    """An abandon (of a copy or a merge) tried again, with backoff, when its worker fails
    for a reason that passes (it died, timed out, met a storage error): else the copy would
    stay `copying` with nobody at it until the next start-up. Abandoning again is harmless:
    it keeps the generation, and the errors it carries are counted once (markers.unrecorded)."""
    return dataclasses.replace(job, args={**job.args, "abandon_try": tries},
                               on_end=_abandon_ended)


def _abandon_ended(agent: Supervisor, task, outcome: str, result, error) -> None:
    if outcome != states.FAILED:
        return
    name = (error.to_json() if error else {}).get("data", {}).get("name")
    tries = task.job.args.get("abandon_try", 1)
    if name not in RETRYABLE:  # the copy changed hands, or someone is at it: nothing wrong
        log.info("abandon_left", **task.about(), error=name, tries=tries)
        return
    if tries >= MAX_ABANDON_TRIES:
        log.error("abandon_failed", **task.about(), error=name, tries=tries, action="leave")
        return
    delay = min(agent.config["recovery"]["backoff_seconds"] * 2 ** (tries - 1), MAX_BACKOFF)
    log.warning("abandon_failed", **task.about(), error=name, tries=tries, action="retry",
                retry_in=delay)
    job = abandon_under_policy(task.job, tries + 1)
    agent.call_later(delay, lambda: _abandon_again(agent, task.id, task.method, job))


def _abandon_again(agent: Supervisor, task_id: str, method: str, job: jobs.WorkerJob):
    """The abandon tried again, unless its domain was detached meanwhile (the agent no
    longer writes there; an attach scans it again)."""
    args = job.args.get("dst", job.args)
    if args["domainID"] not in agent.domains.paths:
        log.info("abandon_dropped", task_id=task_id, domain_id=args["domainID"],
                 reason="domain-detached")
        return None
    return _submit(agent, task_id, method, job)


def _recover_merges(agent: Supervisor, domain_id: str, merges: list[dict]) -> None:
    """What start-up does with each merge found on storage: as with a copy's marker (its
    lease is base's; it reads and writes one domain, always attached here)."""
    cfg = agent.config["recovery"]
    for m in merges:
        action = decide(m, policy=cfg["copy_policy"], host_id=agent.config.host_id,
                        resume_foreign=cfg["resume_foreign"], max_attempts=cfg["max_attempts"],
                        source_attached=True)
        loc = {"domainID": domain_id, "imageID": m["image_id"],
               "baseVolumeID": m["volume_id"], "topVolumeID": m["top_id"]}
        gen, started = m["generation"], None
        if action in ("resume", "restart"):
            started = _submit(agent, f"recover:{m['volume_id']}:{gen}", "Image.merge",
                              merge_under_policy(agent, loc, recover=action,
                                                 expect_generation=gen,
                                                 attempt=m["attempts"] + 1,
                                                 failures=m.get("failures", 0)))
        elif action == "abandon":
            started = _submit(agent, f"abandon:{m['volume_id']}:{gen}", "Recovery.abandonMerge",
                              abandon_under_policy(jobs.merge_abandon(agent.domains, loc, gen,
                                                                      None)))
        agent.publish("Image.recovered", {
            "domainID": domain_id, "imageID": m["image_id"], "volumeID": m["volume_id"],
            "topVolumeID": m["top_id"], "kind": "merge", "step": m["step"],
            "generation": gen, "copied": m["copied"], "total": m["size"],
            "marker_host_id": m["host_id"], "policy": cfg["copy_policy"], "action": action,
            "taskID": started.id if started else None})
        log.info("recovered", volume_id=m["volume_id"], kind="merge", action=action,
                 task_id=started.id if started else None)


def _copy_ended(agent: Supervisor, task, outcome: str, result, error) -> None:
    """A copy that failed is retried, or abandoned, by policy: if it owned its marker, or if
    it was one the agent issued itself (a retry or recovery that died before taking over
    counts as an attempt too, so a copy never stalls and never loops without end)."""
    args = task.job.args
    src = {k: args["src"][k] for k in ("domainID", "imageID", "volumeID")}
    dst = {k: args["dst"][k] for k in ("domainID", "imageID", "volumeID")}
    _after_failure(agent, task, outcome, error, dst, "Image.copy",
                   lambda **kw: copy_under_policy(agent, src, dst, **kw),
                   lambda gen, err, **kw: ("Recovery.abandon",
                                           jobs.abandon(agent.domains, dst, gen, err, **kw)))


def merge_under_policy(agent: Supervisor, loc: dict, **extra) -> jobs.WorkerJob:
    """A merge (a client's, a recovered one, a retry), retried or abandoned as copies are."""
    return jobs.merge(agent.domains, loc, on_end=_merge_ended, **extra)


def _merge_ended(agent: Supervisor, task, outcome: str, result, error) -> None:
    loc = jobs.merge_location(task.job.args)
    key = {"domainID": loc["domainID"], "imageID": loc["imageID"],
           "volumeID": loc["baseVolumeID"], "topVolumeID": loc["topVolumeID"]}
    _after_failure(agent, task, outcome, error, key, "Image.merge",
                   lambda **kw: merge_under_policy(agent, loc, **kw),
                   lambda gen, err, **kw: ("Recovery.abandonMerge",
                                           jobs.merge_abandon(agent.domains, loc, gen, err,
                                                              **kw)))


def _what_failed(task, error: dict) -> tuple | None:
    """(attempts, generation, failures, carried) of a copy or merge whose task failed after
    it owned the copy (None: it never did). `carried` is what the next worker needs to
    take it over at the right generation and leave no failure uncounted: a worker commits
    its take-over before it can say so, and may die in between. Until one says what it
    took, each that died is named (markers.expected_generation), and so is each error no
    worker recorded (a dead one records nothing; the next does, in its take-over)."""
    args = task.job.args
    # The failed task's own error, unless its worker recorded it on storage.
    own = [] if not error or error.get("data", {}).get("recorded") else \
        [{**error, "task_id": task.id, "time": time.time()}]
    if isinstance(task.result, dict) and "generation" in task.result:
        return (task.result["attempts"], task.result["generation"],
                task.result.get("failures", 0) + 1, {"failed_tasks": [], "previous_errors": own})
    if args.get("expect_generation") is None:
        return None
    carried = {"failed_tasks": (args.get("failed_tasks") or []) + [task.id],
               "previous_errors": (args.get("previous_errors") or []) + own}
    return (args["attempt"], args["expect_generation"], args.get("failures", 0) + 1,
            {k: v[-MAX_FAILED_TASKS:] for k, v in carried.items()})


def _after_failure(agent: Supervisor, task, outcome: str, error, key: dict, method: str,
                   again, give_up) -> None:
    """Retry (`again(**args)`: the job) or abandon (`give_up(generation, errors, **args)`:
    (method, job)) a failed copy or merge, by the copy policy; `key` names it in events and
    logs."""
    if outcome != states.FAILED:
        return  # done, or aborted
    error = error.to_json() if error else {}
    failed = _what_failed(task, error)
    if failed is None:
        return  # a client's request that never got going (LeaseHeld, CopyConflict, ...)
    attempts, gen, failures, carried = failed
    cfg = agent.config["recovery"]
    name = error.get("data", {}).get("name")
    action = after_failure(name, failures, policy=cfg["copy_policy"],
                           max_attempts=cfg["max_attempts"])
    vid = key["volumeID"]
    # Backoff follows failures, never take-overs: a restart or an abort and continue costs
    # an attempt but is no failure, so twenty restarts never make one death wait for days.
    delay = min(cfg["backoff_seconds"] * 2 ** (failures - 1), MAX_BACKOFF)
    log.info(f"{method.split('.')[1]}_failed", **task.about(), error=name, attempts=attempts,
             failures=failures, action=action, **({"retry_in": delay} if action == "retry"
                                                   else {}))
    if action == "retry":
        agent.call_later(delay, lambda: _submit(
            agent, f"retry:{vid}:{gen}", method,
            again(recover="resume", expect_generation=gen, attempt=attempts + 1,
                  failures=failures, **carried)))
    elif action == "abandon":
        abandon_method, job = give_up(gen, carried["previous_errors"],
                                      failed_tasks=carried["failed_tasks"])
        started = _submit(agent, f"abandon:{vid}:{gen}", abandon_method,
                          abandon_under_policy(job))
        agent.publish(method, {**key, "state": "abandoned", "generation": gen,
                               "attempts": attempts, "failures": failures,
                               "error": error or None,
                               "taskID": started.id if started else None})
