"""StorageDomain: format, attach and inspect storage domains (directories, maybe shared)."""

from __future__ import annotations

import os

from agent import errors
from agent.api import Param, WorkerJob, verb


def _abs_path(value: str) -> str:
    if not value.startswith("/") or "\x00" in value:
        raise ValueError("must be an absolute path")
    return os.path.normpath(value)


def _not_attached(agent, domain_id: str) -> None:
    if domain_id in agent.domains.paths:
        raise errors.DomainExists(f"domain {domain_id} is already attached",
                                  domainID=domain_id, path=agent.domains.paths[domain_id])


@verb("StorageDomain.create", Param("domainID", "uuid"), Param("path", "str", check=_abs_path),
      worker=True)
def create(agent, params):
    """Format an empty (or absent) directory as a new domain and attach it.

    Result: the domain's info (as StorageDomain.getInfo). Errors: 208 DomainExists (the
    directory already holds a domain, or the ID is attached), -32602 (not empty, bad path).
    """
    _not_attached(agent, params["domainID"])
    return WorkerJob("domain.create", params)


@verb("StorageDomain.attach", Param("domainID", "uuid"), Param("path", "str", check=_abs_path),
      worker=True, events=("Image.recovered",))
def attach(agent, params):
    """Attach an existing domain (for example one that another host formatted).

    Its copy markers are then scanned and the recovery policy applied, as at start-up.
    Result: the domain's info. Errors: 200 NoSuchDomain (no domain with that ID there),
    208 DomainExists (already attached).
    """
    _not_attached(agent, params["domainID"])
    return WorkerJob("domain.attach", params)


@verb("StorageDomain.getInfo", Param("domainID", "uuid"), worker=True)
def get_info(agent, params):
    """Capacity, free space and volume count of an attached domain.

    Result: {domainID, path, capacity, free, volumes, copies}. Errors: 200 NoSuchDomain.
    """
    return WorkerJob("domain.info", {**params, "path": agent.domains.path(params["domainID"])})


@verb("StorageDomain.list")
def listing(agent, params):
    """The domains this agent has attached (no storage is touched).

    Result: [{domainID, path, attached_by: "config" | "attach"}].
    """
    return agent.domains.listing()
