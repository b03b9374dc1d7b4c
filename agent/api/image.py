"""Image: copies and merges that outlive their tasks, tracked on storage (a copy's marker, a
merge's row) where any host reads them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import errors
from agent.api.volume import VOLUME_PARAMS
from agent.ids import check_uuid
from agent.supervisor import jobs, recovery
from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, one_of, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


def _checked_location(value: dict) -> dict:
    if set(value) != {"domainID", "imageID", "volumeID"}:
        raise ValueError("must be {domainID, imageID, volumeID}")
    return {k: check_uuid(value[k], k) for k in ("domainID", "imageID", "volumeID")}




@verb("Image.copy", Param("src", "object", check=_checked_location), Param("dst", "object",
      check=_checked_location),
      Param("mode", "str", required=False, check=one_of("collapse", "chain"),
            doc="collapse (default): the source's guest view into one volume; chain: every "
                "volume of its chain, same structure"),
      Param("format", "str", required=False, check=one_of("raw", "cow"),
            doc="collapse only: the destination's format (default: the source's)"),
      Param("bitmaps", "bool", required=False, default=False,
            doc="collapse into cow only: carry every usable dirty bitmap of the source, "
                "its union over the chain (a chain copy always carries each layer's)"),
      worker=True, events=("Task.state", "Task.progress", "Image.copy"))
def copy(agent: Supervisor, params):
    """Copy a volume's data to a destination volume that outlives this task.

    Two modes. collapse (the default): the guest-visible content of the source and its
    whole backing chain into one destination volume of the format asked for (raw or cow;
    default: the source's). chain: every volume of the source's chain, up to and including
    the source, into the destination image with the same structure, each copy's backing
    file its parent's copy; each destination layer has its own marker and resumes on its
    own; the layers keep the source's volume IDs when dst.volumeID is the source's (a move
    to another domain), else they are derived from dst.volumeID (result "chain", base
    first), with each layer's dirty bitmaps; a collapse into cow carries the source's
    usable bitmaps (the union of each over the chain) when `bitmaps` is asked, once its
    data is copied (recorded in its marker: whoever continues it carries them; a broken one
    is left behind). Raw to raw of a lone volume is a kernel copy; every other copy goes
    through qemu-nbd and libnbd, holes and zeros kept, checkpointed after a flush. A
    continued copy keeps the mode and format it began with (205 CopyConflict, data.reason
    "kind" or "format", if another is asked).

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
    LEGAL), 203 LeaseHeld (someone is copying it), 204 NoSpace (checked before anything is
    made: the destination domain has less room than the source's data, what a copy's sparse
    destination holds, data.needed and data.free), 205 CopyConflict, 207
    VolumeIllegal (source not LEGAL), 213 VolumeTruncated (also a raw base shorter than its
    size), 216 ImageInvalid (the source's chain refused before qemu opened it, data.reason
    the check that failed: not-qcow2, corrupt (also what `qemu-img check` finds damaged),
    unsupported, encrypted, data-file, limits (of the image, or of a qemu tool: data.limit),
    size, chain, backing-outside; docs/crash-model.md, "What a volume's bytes can make the
    agent do"), -32602 (src and dst the same; a format with mode chain; a cow copy of a size
    that is not a multiple of 512).
    """
    if params["src"] == params["dst"]:
        raise errors.InvalidParams("src and dst are the same volume")
    if params["mode"] == "chain" and params["format"] is not None:
        raise errors.InvalidParams("a chain copy keeps each layer's format", param="format")
    if params["bitmaps"] and (params["mode"] == "chain" or params["format"] == "raw"):
        raise errors.InvalidParams("bitmaps are carried by a collapse into cow (a chain copy "
                                   "carries them always)", param="bitmaps")
    extra = {k: v for k, v in (("kind", params["mode"]), ("format", params["format"]),
                               ("bitmaps", params["bitmaps"] or None)) if v is not None}
    return recovery.copy_under_policy(agent, params["src"], params["dst"], **extra)  # retried


@verb("Image.merge", Param("domainID", "uuid"), Param("imageID", "uuid"),
      Param("baseVolumeID", "uuid", doc="the volume that stays: top's parent"),
      Param("topVolumeID", "uuid", doc="the snapshot folded into base, then removed"),
      worker=True, events=("Task.state", "Task.progress", "Image.merge"))
def merge(agent: Supervisor, params):
    """Remove a snapshot: fold `top` into its parent `base`, so that one volume stands where
    both stood, with base's ID, holding the guest view top had; top's child (if any) then
    backs onto base, and top is gone. Every other volume's guest view is unchanged.

    In one transaction base and top turn ILLEGAL (each generation + 1) with the merge
    recorded on storage; then the response is sent, {volumeID (base's), baseVolumeID,
    topVolumeID, state: "merging", step, generation, copied, total, attempts, failures},
    and the task goes on: base grown to top's size if smaller; what top holds itself (its
    data and its zeros, nothing else) written into base, checkpointed after a flush, at no
    more than [copy] max_bytes_per_second; the child's backing re-pointed; then, in one
    transaction, top's row removed and base LEGAL with generation + 1 and the checksum of
    its new guest view. The task's result: {..., state: "done", generation}. Image.merge
    events say where it is (started, merging with copied/total, committed, done).

    A merge is resumable from any crash: asking again for the same pair (from any host)
    continues it from its last checkpoint or step; start-up recovers it by the copy policy
    ([recovery]); failures are retried and abandoned as a copy's are. A merge asked again
    once done answers done ("already": true). Task.abort stops it without revert (base and
    top stay ILLEGAL until it is continued). Image.getStatus (of base, top or top's child)
    and Image.getInfo show a merge in progress.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld (base, top or top's child is
    busy), 204 NoSpace (base's domain cannot take what top holds), 206 GenerationMismatch,
    207 VolumeIllegal, 215 VolumeHasChildren, 216 ImageInvalid (the chain refused: see
    Image.copy), 218 VolumeInUse (data.reason: copy-source (a copy in progress reads the
    chain), copy-destination, transfer, export (an export served here), merge (another
    merge holds one of them)), -32602 (top is not base's child; base and top the same).
    """
    if params["baseVolumeID"] == params["topVolumeID"]:
        raise errors.InvalidParams("base and top are the same volume", param="topVolumeID")
    _not_served_here(agent, params)
    return recovery.merge_under_policy(agent, params)


def _not_served_here(agent: Supervisor, params) -> None:
    """VolumeInUse if this agent runs an export or a copy that reads the image: its data is
    about to move under them (copies from any host are found on storage, by the worker)."""
    for task in list(agent.tasks.active.values()):
        job = task.job
        if job is None or job.op not in ("export.start", "image.copy", "image.checksum"):
            continue
        loc = job.args["src"] if job.op == "image.copy" else job.args
        if (loc.get("domainID"), loc.get("imageID")) == (params["domainID"],
                                                         params["imageID"]):
            raise errors.VolumeInUse("a task of this agent reads the image",
                                     volumeID=loc.get("volumeID"), taskID=task.id,
                                     reason="export" if job.op == "export.start"
                                     else "copy-source")


@verb("Image.getStatus", *VOLUME_PARAMS, worker=True)
def get_status(agent: Supervisor, params):
    """The state of a volume and of any copy into it, read from storage (any host).

    Result: {domainID, imageID, volumeID, legality, generation, size, copy: null | {source,
    copied, total, percent, state, generation, attempts, failures, errors, started, updated,
    host_id,
    task_id, lease: {live, host_id, pid, task_id, op, since} | null}, transfer: null |
    {state (serving | stopped | interrupted), generation, host_id, task_id, tag, written
    (bytes its data file holds, looked at every 2 s while served), size, attempts,
    created_volume, started, updated, lease}, merge: null | {baseVolumeID, topVolumeID,
    childVolumeID, step (commit | committed | repointed), state (merging | abandoned),
    copied, total, percent, generation, attempts, failures, errors, started, updated,
    host_id, task_id, lease, running}} (a transfer: Export.start with mode write; a merge:
    Image.merge, shown for its base, its top and top's child).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume.
    """
    return WorkerJob("image.status", jobs.with_path(agent.domains, params))


def _blocks(value: dict) -> dict:
    if set(value) != {"offset", "length"} or not all(
            isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] >= 0
            for k in value):
        raise ValueError("must be {offset, length}, non-negative integers")
    return value


@verb("Image.checksum", *VOLUME_PARAMS,
      Param("algorithm", "str", required=False, default="blake3-4m",
            check=one_of("blake3-4m", "blake2b"),
            doc="blake3-4m (what copies record) or blake2b (ovirt-imageio's block hash)"),
      Param("blocks", "object", required=False, check=_blocks,
            doc="{offset, length}: each 4 MiB block's digest in this range instead (offset "
                "a multiple of 4 MiB; at most 4096 blocks an answer)"),
      Param("layer", "bool", required=False, default=False,
            doc="what the volume itself holds (its backing not read), as a layer export "
                "serves it"),
      worker=True)
def checksum(agent: Supervisor, params):
    """The checksum of a volume's guest view, computed on the agent's side without shipping
    its data: blake3-4m (BLAKE3 of the BLAKE3 digests of 4 MiB blocks: the value a copy or a
    finished transfer records) or blake2b (ovirt-imageio's: BLAKE2b-256 of the BLAKE2b-256
    digests of 4 MiB blocks, so `ovirt_imageio.client.checksum(FILE)` of the original equals
    it). With `blocks`, each block's digest in a range instead, for a client that resumes a
    transfer by sending only the blocks that differ. Zero and unallocated ranges are never
    read (their digest is a constant). The chain is read by a private read-only qemu-nbd
    after the checks of Image.copy's source; a volume under transfer is read under its lease.

    Result: {algorithm, block_size, size, checksum (hex)} or, with blocks, {algorithm,
    block_size, size, offset, length, blocks: [hex, ...]}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld (a transfer's export is live),
    207 VolumeIllegal (a copy in progress), 216 ImageInvalid, -32602.
    """
    args = {k: v for k, v in params.items() if v is not None}
    return WorkerJob("image.checksum", jobs.with_path(agent.domains, args))


@verb("Image.getInfo", Param("domainID", "uuid"), Param("imageID", "uuid"), worker=True)
def get_info(agent: Supervisor, params):
    """An image's volumes in chain order, base first, each as Volume.getInfo shows it
    (without its lease).

    Result: {domainID, imageID, chain: [volume, ...] | null, chains: [[volume, ...]],
    merges: [merge, ...]} (chain is the one chain of a linear image; chains lists every
    leaf's chain; merges: those in progress, as Image.getStatus shows them).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume (no volume in the image).
    """
    return WorkerJob("image.info", jobs.with_path(agent.domains, params))
