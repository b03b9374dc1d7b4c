"""Worker jobs: what an operation in a worker needs, built from the agent's attached domains.

Below the RPC layer on purpose: an RPC handler and recovery both build their jobs here, and
a job carries what happens when its task ends (`on_end`), so nothing is looked up by a
method's name and nothing points from recovery up to the RPC layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class WorkerJob:
    """Run `op` in a worker with `args`. `on_end(agent, task, state, result, error)` is what
    happens as its task ends (before the answer; told the state the task is about to take:
    done, failed or aborted); if it raises, the task fails instead."""

    op: str
    args: dict
    deadline: float | None = None
    on_end: Callable | None = None
    joins: str | None = None  # the domain whose lockspace this job joins (never parked)


def with_path(domains, loc: dict) -> dict:
    """`loc` with its domain's path: NoSuchDomain if the domain is not attached."""
    return {**loc, "path": domains.path(loc["domainID"])}


def _ids(loc: dict) -> dict:
    return {k: loc[k] for k in ("domainID", "imageID", "volumeID")}


def copy(domains, src: dict, dst: dict, on_end=None, **extra) -> WorkerJob:
    return WorkerJob("image.copy", {"src": with_path(domains, _ids(src)),
                                    "dst": with_path(domains, _ids(dst)), **extra},
                     on_end=on_end)


def abandon(domains, dst: dict, generation: int, errors: list,
            failed_tasks: list | None = None) -> WorkerJob:
    return WorkerJob("image.abandon", {"dst": with_path(domains, _ids(dst)),
                                       "expect_generation": generation,
                                       "previous_errors": errors, "failed_tasks": failed_tasks})


def merge_location(loc: dict) -> dict:
    return {k: loc[k] for k in ("domainID", "imageID", "baseVolumeID", "topVolumeID")}


def merge(domains, loc: dict, on_end=None, **extra) -> WorkerJob:
    """A merge, told every attached domain (a copy into any of them may read the image)."""
    return WorkerJob("image.merge", {**with_path(domains, merge_location(loc)),
                                     "domains": dict(domains.paths), **extra}, on_end=on_end)


def merge_abandon(domains, loc: dict, generation: int, errors: list,
                  failed_tasks: list | None = None) -> WorkerJob:
    return WorkerJob("image.merge_abandon", {**with_path(domains, merge_location(loc)),
                                             "expect_generation": generation,
                                             "previous_errors": errors,
                                             "failed_tasks": failed_tasks})


def scan(domains, domain_id: str, on_end) -> WorkerJob:
    return WorkerJob("domain.scan", {"domainID": domain_id, "path": domains.path(domain_id)},
                     on_end=on_end)
