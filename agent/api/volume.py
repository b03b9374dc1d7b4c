"""Volume: raw and qcow2 (cow) volumes in a domain, snapshots layered on an image's leaf,
each volume with its own lease."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent import errors
from agent.supervisor import jobs
from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, one_of, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

SECTOR = 512  # qemu sizes a qcow2 in sectors: any other size would not be the volume's
VOLUME_PARAMS = (Param("domainID", "uuid"), Param("imageID", "uuid"), Param("volumeID", "uuid"))


def _size(value: int) -> int:
    if value < 0 or value > 1 << 50:
        raise ValueError("must be between 0 and 2**50 bytes")
    return value


@verb("Volume.create", *VOLUME_PARAMS,
      Param("size", "int", required=False, check=_size,
            doc="bytes (virtual size); a snapshot's defaults to its parent's"),
      Param("format", "str", required=False, check=one_of("raw", "cow"),
            doc="raw (default) or cow (qcow2, compat 1.1); a snapshot is always cow"),
      Param("preallocation", "str", required=False, default="sparse",
            check=one_of("sparse", "preallocated"),
            doc="sparse (default), or preallocated: fallocate for raw, qcow2 metadata"),
      Param("parentVolumeID", "uuid", required=False,
            doc="make a snapshot: a cow volume layered on this volume, the image's leaf"),
      worker=True)
def create(agent: Supervisor, params):
    """Create a volume, LEGAL, generation 0, under its lease: raw or cow, sparse or
    preallocated, or a snapshot of the image's leaf (parentVolumeID, same image).

    A snapshot is a qcow2 whose backing file is its parent's file, named relative to the
    image directory, with the parent's format recorded; from then on the parent is an
    internal, read-only layer of the chain: it cannot be deleted (215 VolumeHasChildren)
    or snapshotted again. Result: the volume's info (as Volume.getInfo).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume (parent), 202 VolumeExists, 203 LeaseHeld,
    204 NoSpace, 207 VolumeIllegal (parent not LEGAL), 215 VolumeHasChildren (the parent
    is not the leaf), 216 ImageInvalid (the parent's chain refused: see Image.copy),
    -32602 (a raw or preallocated snapshot, a size smaller than the parent's, a cow size
    that is not a multiple of 512 (qemu's sector: one truth for a size), no size for a new
    volume).
    """
    params = dict(params)
    if params["parentVolumeID"] is None:
        params.pop("parentVolumeID")
        if params["size"] is None:
            raise errors.InvalidParams("missing param 'size'", param="size")
        params["format"] = params["format"] or "raw"
    else:
        if params["format"] == "raw":
            raise errors.InvalidParams("a snapshot is a cow volume", param="format")
        if params["preallocation"] == "preallocated":  # qemu: only with extended L2
            raise errors.InvalidParams("a snapshot cannot be preallocated",
                                       param="preallocation")
        params["format"] = "cow"
    if params["format"] == "cow" and params["size"] is not None \
            and params["size"] % SECTOR:
        raise errors.InvalidParams(f"a cow volume's size is a multiple of {SECTOR} bytes",
                                   param="size")
    return WorkerJob("volume.create", jobs.with_path(agent.domains, params))


@verb("Volume.delete", *VOLUME_PARAMS, worker=True)
def delete(agent: Supervisor, params):
    """Delete a volume (metadata first, then its data), under its lease.

    A copy in progress holds the destination's lease, so deleting it answers LeaseHeld;
    abort the copy first. A volume with snapshots layered on it is refused: delete the
    chain from its leaf down. Result: {"volumeID": ..., "deleted": true}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld, 215 VolumeHasChildren.
    """
    return WorkerJob("volume.delete", jobs.with_path(agent.domains, params))


@verb("Volume.getInfo", *VOLUME_PARAMS, worker=True)
def get_info(agent: Supervisor, params):
    """A volume's format, sizes, legality, generation, place in its chain, lease holder and
    data path.

    Result: {domainID, imageID, volumeID, format (raw | cow), size (virtual, bytes),
    allocated (bytes on disk), legality, generation, parent (volumeID | null), children
    ([volumeID]), leaf (no children: the layer a guest writes), path, lease: null |
    {live, host_id, pid, task_id, op, since}, transfer: null | a transfer in progress, as
    Image.getStatus shows it}. Errors: 200 NoSuchDomain, 201 NoSuchVolume.
    """
    return WorkerJob("volume.info", jobs.with_path(agent.domains, params))


@verb("Volume.fence", *VOLUME_PARAMS,
      Param("generation", "int", doc="the generation the caller last saw"),
      Param("timeout", "number", required=False, default=300.0,
            doc="seconds to wait for the volume's lease (default 300)"),
      worker=True)
def fence(agent: Supervisor, params):
    """Fence off every earlier writer of a volume, as an engine does when it lost track of
    a job: take the volume's lease (so it waits out a holder, and a dead host's lease once
    sanlock counts that host dead), raise the generation from `generation`, and answer
    once done. A late writer's next metadata write then fails with 206 GenerationMismatch.
    With the local lease manager it behaves the same on one host.

    Result: {volumeID, generation (the new one), fenced: true, waited (seconds)}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld (still held at the timeout),
    206 GenerationMismatch (the generation is no longer `generation`).
    """
    if not 0 < params["timeout"] <= 3600:
        raise errors.InvalidParams("timeout must be in (0, 3600] seconds", param="timeout")
    args = jobs.with_path(agent.domains, params) | {"began": time.time()}
    return WorkerJob("volume.fence", args)


@verb("Volume.extend", *VOLUME_PARAMS,
      Param("size", "int", check=_size, doc="the new virtual size, in bytes"),
      Param("preallocation", "str", required=False, check=one_of("sparse", "preallocated"),
            doc="of the new range: sparse, or preallocated (default: as the volume is)"),
      Param("generation", "int", required=False,
            doc="refuse (206) unless the volume is still at this generation"),
      worker=True)
def extend(agent: Supervisor, params):
    """Grow a volume's virtual size, under its lease, answered when done: a raw volume's
    file is truncated (or allocated, if preallocated) to the new size, a cow volume grown
    by qemu-img resize; then its row takes the size with generation + 1. The guest sees
    zeros past the old end. Only a volume with no snapshots layered on it grows (a leaf, or
    a lone volume). Asking for the size it has is answered with nothing done (extended:
    false), so a retry is harmless.

    Result: {volumeID, size, generation, extended}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld, 204 NoSpace, 206
    GenerationMismatch, 207 VolumeIllegal, 215 VolumeHasChildren (an inner layer), 216
    ImageInvalid, 218 VolumeInUse (a copy, transfer or merge writes it), 219 ShrinkRefused
    (smaller than it is), -32602 (a cow size that is not a multiple of 512).
    """
    args = {k: v for k, v in params.items() if v is not None}
    return WorkerJob("volume.extend", jobs.with_path(agent.domains, args))


@verb("Volume.measure", *VOLUME_PARAMS,
      Param("format", "str", required=False, check=one_of("raw", "cow"),
            doc="the destination's format (default: the volume's)"),
      worker=True)
def measure(agent: Supervisor, params):
    """What a copy of the volume's guest view (its whole chain, as the agent's metadata
    says it is) needs in a destination format: `qemu-img measure` of the chain, after the
    checks of Image.copy's source. `required` is what a sparse copy needs, `fully_allocated`
    what a preallocated one does.

    Result: {volumeID, format, size, required, fully_allocated} (bytes).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 207 VolumeIllegal (a volume of its chain is
    being written), 216 ImageInvalid.
    """
    args = {k: v for k, v in params.items() if v is not None}
    return WorkerJob("volume.measure", jobs.with_path(agent.domains, args))
