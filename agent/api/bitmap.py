"""Bitmap: a cow volume's persistent dirty bitmaps (changed-block tracking for incremental
backups), kept in its qcow2 and in the agent's metadata, checked against each other before
one is used (agent/storage/tracking.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.api.volume import VOLUME_PARAMS
from agent.ids import checked_bitmap_name as checked_name
from agent.supervisor import jobs
from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

NAME = Param("name", "str", check=checked_name,
             doc="the bitmap's name: 1..128 of A-Z a-z 0-9 . _ : + - (a checkpoint's UUID)")


def _granularity(value: int) -> int:
    if value < 512 or value > 1 << 26 or value & (value - 1):
        raise ValueError("must be a power of two from 512 to 64 MiB")
    return value


def _job(agent: Supervisor, op: str, params) -> WorkerJob:
    args = {k: v for k, v in params.items() if v is not None}
    return WorkerJob(op, jobs.with_path(agent.domains, args))


@verb("Bitmap.add", *VOLUME_PARAMS, NAME,
      Param("granularity", "int", required=False, check=_granularity,
            doc="bytes one bit stands for (default 64 KiB)"),
      worker=True)
def add(agent: Supervisor, params):
    """Start a persistent dirty bitmap in a cow volume, under its lease: from the answer on,
    every write of the volume (a guest's, an upload's) is recorded in it, and a snapshot of
    the volume continues it in the new leaf. The image first, then the metadata: a bitmap
    an add killed before its row is unknown (never used), and the same add again starts it
    afresh. Asking again for one that is ok is answered with nothing done (already: true).

    Result: {volumeID, name, granularity, added, already}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld, 204 NoSpace, 207
    VolumeIllegal, 216 ImageInvalid, 218 VolumeInUse (a copy, transfer or merge writes it;
    reason open: another process, a guest or an export, has the image open), 221
    BitmapExists (of another granularity, or broken: remove it first), 223
    BitmapsUnsupported (a raw volume).
    """
    return _job(agent, "bitmap.add", params)


@verb("Bitmap.remove", *VOLUME_PARAMS, NAME, worker=True)
def remove(agent: Supervisor, params):
    """Remove a dirty bitmap from a volume, under its lease (the image first, then the
    metadata: a remove killed between leaves a row named broken (missing), and the same
    remove again drops it). Broken and unknown bitmaps are removed the same way.

    Result: {volumeID, name, removed: true}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld, 216 ImageInvalid, 218
    VolumeInUse, 220 NoSuchBitmap, 223 BitmapsUnsupported.
    """
    return _job(agent, "bitmap.remove", params)


@verb("Bitmap.clear", *VOLUME_PARAMS, worker=True)
def clear(agent: Supervisor, params):
    """Remove every dirty bitmap of a volume, recorded or only found in its image (as
    VDSM's clear_bitmaps): the way back from broken bitmaps, before a full backup.

    Result: {volumeID, removed: [name]}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld, 216 ImageInvalid, 218
    VolumeInUse, 223 BitmapsUnsupported.
    """
    return _job(agent, "bitmap.clear", params)


@verb("Bitmap.list", *VOLUME_PARAMS, worker=True)
def list_(agent: Supervisor, params):
    """A volume's dirty bitmaps as its metadata and its image say together.

    Result: {volumeID, bitmaps: [{name, state, reason, granularity, continues, in_image}]}:
    state ok (usable), broken (reason: in-use, missing, recorded reasons such as
    merge-interrupted, granularity, disabled, inconsistent) or unknown (in the image with no
    record: never used; remove it). continues: the bitmap carries on its parent's (a
    snapshot's). A raw volume has none.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 216 ImageInvalid.
    """
    return _job(agent, "bitmap.list", params)
