"""Volume leases behind one seam: who may write a volume, whichever manager keeps them.

A lease manager answers two questions for a domain's volumes: take the lease (held until the
returned object is released, or its process dies) and who holds it (a probe that takes
nothing). `local` is the embedded default: an OFD lock per volume on the domain's own file
system (agent/storage/lease.py), right for one host, tests and development. A manager for
hosts that share storage (sanlock) is one more class with these two methods.
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


def for_domain(ddb) -> LocalLeases:
    """The lease manager of a domain (today always the local one)."""
    return LocalLeases(ddb.layout)
