"""Volume leases behind one seam: who may write a volume, whichever manager keeps them.

A lease manager answers two questions for a domain's volumes: take the lease (held until the
returned object is released, or its process dies) and who holds it (a probe that takes
nothing). `local` is the embedded default: an OFD lock per volume on the domain's own file
system (agent/storage/leases/local.py), right for one host, tests and development. `sanlock`
(agent/storage/leases/sanlock.py) is for hosts that share storage: the same two methods,
plus a lockspace each host joins before it takes a lease in the domain.
"""

from __future__ import annotations

import os

from agent.storage.leases.local import LocalLeases

# Which manager this process uses, set once by the worker runtime from the agent's
# [storage] settings (configure); local until then (tests, tools).
_settings: dict = {"manager": "local"}
# Called while a lease manager waits on its daemon (the worker's heartbeat), so a wait of
# sanlock's (an acquire that watches a silent owner for seconds) is not taken for a hang.
beat = lambda: None  # noqa: E731


def configure(settings: dict | None, heartbeat=None) -> None:
    """This process's lease manager, from the settings the agent's config made
    (agent.config.Config.leases), handed to each worker with its spawn request."""
    global _settings, beat
    _settings = dict(settings or {"manager": "local"})
    if heartbeat is not None:
        beat = heartbeat
    if _settings.get("manager") == "sanlock" and _settings.get("run_dir"):
        # Which daemon this process talks to: libsanlock reads it from the environment.
        os.environ["SANLOCK_RUN_DIR"] = _settings["run_dir"]


def for_root(layout, domain_id: str):
    """The lease manager for a domain at `layout`, as this host is configured."""
    if _settings.get("manager") == "sanlock":
        from agent.storage.leases.sanlock import SanlockLeases
        return SanlockLeases(layout, domain_id, _settings["host_id_number"],
                             _settings.get("io_timeout", 10), beat=lambda: beat())
    return LocalLeases(layout)


def for_domain(ddb):
    """The lease manager of an open domain."""
    return for_root(ddb.layout, ddb.domain_id)
