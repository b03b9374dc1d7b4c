"""Volume leases behind one seam: who may write a volume, whichever manager keeps them.

A lease manager answers two questions for a domain's volumes: take the lease (held until the
returned object is released, or its process dies) and who holds it (a probe that takes
nothing). `local` is the embedded default: an OFD lock per volume on the domain's own file
system (agent/storage/lease.py), right for one host, tests and development. `sanlock`
(agent/storage/sanlock_leases.py) is for hosts that share storage: the same two methods,
plus a lockspace each host joins before it takes a lease in the domain.
"""

from __future__ import annotations

from agent.storage import lease


class LocalLeases:
    """Leases as OFD locks on `leases/<volumeID>.lease` in the domain."""

    name = "local"

    def __init__(self, layout):
        self.layout = layout

    def acquire(self, volume_id: str, holder: dict) -> lease.Lease:
        """Held until released; LeaseHeld (data.holder) if anyone holds it."""
        return lease.acquire(self.layout.lease_path(volume_id), holder)

    def probe(self, volume_id: str) -> dict | None:
        """{holder fields..., live} or None if the volume never had a lease."""
        return lease.probe(self.layout.lease_path(volume_id))


# Which manager this process uses, set once by the worker runtime from the agent's
# [storage] settings (configure); local until then (tests, tools).
_settings: dict = {"manager": "local"}
# Called while a lease manager waits on its daemon (the worker's heartbeat), so a wait of
# sanlock's (an acquire that watches a silent owner for seconds) is not taken for a hang.
beat = lambda: None  # noqa: E731


def configure(settings: dict | None, heartbeat=None) -> None:
    global _settings, beat
    _settings = dict(settings or {"manager": "local"})
    if heartbeat is not None:
        beat = heartbeat


def for_root(layout, domain_id: str):
    """The lease manager for a domain at `layout`, as this host is configured."""
    if _settings.get("manager") == "sanlock":
        from agent.storage.sanlock_leases import SanlockLeases
        return SanlockLeases(layout, domain_id, _settings["host_id_number"],
                             _settings.get("io_timeout", 10))
    return LocalLeases(layout)


def for_domain(ddb):
    """The lease manager of an open domain."""
    return for_root(ddb.layout, ddb.domain_id)
