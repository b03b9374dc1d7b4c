"""Image: copies that outlive their tasks, tracked on storage by a marker any host can read."""

from __future__ import annotations

from agent import errors, recovery
from agent.api import Param, WorkerJob, verb
from agent.api.volume import VOLUME_PARAMS, located
from agent.storage.ids import check_uuid


def _location(value: dict) -> dict:
    if set(value) != {"domainID", "imageID", "volumeID"}:
        raise ValueError("must be {domainID, imageID, volumeID}")
    return {k: check_uuid(value[k], k) for k in ("domainID", "imageID", "volumeID")}


@verb("Image.copy", Param("src", "object", check=_location), Param("dst", "object",
      check=_location), worker=True, events=("Task.state", "Task.progress", "Image.copy"))
def copy(agent, params):
    """Copy a volume's data to a destination volume that outlives this task.

    In one transaction the destination is created ILLEGAL with a copy marker; then the
    response is sent, {"volumeID", "state": "copying", "generation", "copied", "total",
    "attempts", "failures"}, while the data is still being copied; the task goes on until the
    destination is LEGAL, and its record's result is then {"volumeID", "state": "done",
    "generation", "copied", "total"}.
    Naming a destination that has a marker from the same source continues that copy from
    its checkpoint, as a new task. A copy is bound to the source volume it began from (its
    creation token, generation and size), checked at every continue and before the commit:
    a source deleted and re-created with the same IDs, resized, replaced or deleted is 205
    CopyConflict (data.reason: size, source-replaced, source-gone), and a source whose data
    ends before its size is 213 VolumeTruncated; the destination then stays ILLEGAL.
    attempts counts take-overs; failures counts the copy's own failures, each with its
    reason in the marker's errors ([recovery] max_attempts bounds failures, not restarts).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume (source), 202 VolumeExists (destination
    LEGAL), 203 LeaseHeld (someone is copying it), 204 NoSpace, 205 CopyConflict, 207
    VolumeIllegal (source not LEGAL), 213 VolumeTruncated, -32602 (src and dst the same).
    """
    if params["src"] == params["dst"]:
        raise errors.InvalidParams("src and dst are the same volume")
    return recovery.copy_job(agent, params["src"], params["dst"])  # retried by policy


@verb("Image.getStatus", *VOLUME_PARAMS, worker=True)
def get_status(agent, params):
    """The state of a volume and of any copy into it, read from storage (any host).

    Result: {domainID, imageID, volumeID, legality, generation, size, copy: null | {source,
    copied, total, percent, state, generation, attempts, failures, errors, started, updated,
    host_id,
    task_id, lease: {live, host_id, pid, task_id, op, since} | null}}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume.
    """
    return WorkerJob("image.status", located(agent, params))
