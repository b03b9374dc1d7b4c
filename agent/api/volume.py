"""Volume: raw sparse volumes in a domain, each with its own lease."""

from __future__ import annotations

from agent import jobs
from agent.api import Param, WorkerJob, verb

VOLUME_PARAMS = (Param("domainID", "uuid"), Param("imageID", "uuid"), Param("volumeID", "uuid"))


def _size(value: int) -> int:
    if value < 0 or value > 1 << 50:
        raise ValueError("must be between 0 and 2**50 bytes")
    return value


def located(agent, params: dict) -> dict:
    """The params with the domain's path added: NoSuchDomain if it is not attached."""
    return jobs.located(agent.domains, params)


@verb("Volume.create", *VOLUME_PARAMS, Param("size", "int", check=_size, doc="bytes"),
      worker=True)
def create(agent, params):
    """Create a sparse raw volume, LEGAL, generation 0, under its lease.

    Result: the volume's info. Errors: 200 NoSuchDomain, 202 VolumeExists, 203 LeaseHeld,
    204 NoSpace.
    """
    return WorkerJob("volume.create", located(agent, params))


@verb("Volume.delete", *VOLUME_PARAMS, worker=True)
def delete(agent, params):
    """Delete a volume (metadata first, then its data), under its lease.

    A copy in progress holds the destination's lease, so deleting it answers LeaseHeld;
    abort the copy first. Result: {"volumeID": ..., "deleted": true}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld.
    """
    return WorkerJob("volume.delete", located(agent, params))


@verb("Volume.getInfo", *VOLUME_PARAMS, worker=True)
def get_info(agent, params):
    """A volume's size, legality, generation, lease holder and data path.

    Result: {domainID, imageID, volumeID, size, legality, generation, path, lease: null |
    {live, host_id, pid, task_id, op, since}}. Errors: 200 NoSuchDomain, 201 NoSuchVolume.
    """
    return WorkerJob("volume.info", located(agent, params))
