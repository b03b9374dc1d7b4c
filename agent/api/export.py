"""Export: a volume served over NBD (qemu-nbd on a unix socket) for as long as its task
lives: read-only (the guest view of its chain, or one layer), or writable (a transfer into
the volume, finished by a check). The data path of uploads, downloads and ovirt-imageio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import errors
from agent.api.volume import SECTOR, VOLUME_PARAMS
from agent.ids import checked_bitmap_name as checked_name
from agent.supervisor import jobs, states
from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, one_of, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

START = "export.start"  # the worker op of an export's task
CHECKSUM_KINDS = ("blake3-4m", "blake2b")
TAG_MAX = 512  # characters of a transfer's tag


def _timeout(value):
    if not 0 < value <= 86400:
        raise ValueError("must be in (0, 86400] seconds")
    return value


def _create(value: dict) -> dict:
    if set(value) - {"size", "format"} or "size" not in value:
        raise ValueError("must be {size, format}")
    size, fmt = value["size"], value.get("format", "raw")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1 << 50:
        raise ValueError("size must be between 0 and 2**50 bytes")
    if fmt not in ("raw", "cow"):
        raise ValueError("format must be raw or cow")
    if fmt == "cow" and size % SECTOR:
        raise ValueError(f"a cow volume's size is a multiple of {SECTOR} bytes")
    return {"size": size, "format": fmt}


def _tag(value: str) -> str:
    if not 0 < len(value) <= TAG_MAX or not value.isprintable():
        raise ValueError(f"must be 1..{TAG_MAX} printable characters")
    return value


def checked_checksum(value: str) -> str:
    kind, _, digest = value.partition(":")
    if kind not in CHECKSUM_KINDS or len(digest) != 64 or \
            any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("must be \"blake3-4m:<64 hex>\" or \"blake2b:<64 hex>\"")
    return value


@verb("Export.start", *VOLUME_PARAMS,
      Param("mode", "str", required=False, default="read",
            check=one_of("read", "layer", "write"),
            doc="read (default): the guest view of the volume's chain; layer: what the "
                "volume itself holds; write: a transfer into the volume"),
      Param("timeout", "number", required=False, check=_timeout,
            doc="seconds with no client connected after which the export ends (default "
                "[exports] inactivity_seconds, 300)"),
      Param("create", "object", required=False, check=_create,
            doc="write only: make the volume for the upload, {size, format: raw | cow}"),
      Param("tag", "str", required=False, check=_tag,
            doc="write only: what the client is sending (its file's identity); a transfer "
                "in progress with another tag is refused (217)"),
      Param("bitmap", "str", required=False, check=checked_name,
            doc="read only: also serve this dirty bitmap, the union over the chain's "
                "layers, as the meta context qemu:dirty-bitmap:NAME (an incremental backup)"),
      Param("checkpoint", "str", required=False, check=checked_name,
            doc="read only, of a leaf: first start this new dirty bitmap in the volume, in "
                "the same step (no write falls between this backup and the next)"),
      worker=True, events=("Task.state", "Export.state"))
def start(agent: Supervisor, params):
    """Serve a volume over NBD until stopped (Export.stop, or Task.abort), until no client
    has been connected for `timeout` seconds, or until its worker or the agent dies.

    The answer comes once qemu-nbd listens: {domainID, imageID, volumeID, mode, url
    ("nbd+unix:///?socket=PATH", for libnbd and nbdcopy), imageio_url ("nbd:unix:PATH",
    for an ovirt-imageio ticket), socket, size (the guest view's bytes), format ("raw": the
    guest view is served, whatever the volume's format), volume_format, generation,
    inactivity_timeout, max_connections (clients served at once; one more waits for a
    free slot)}. The socket is in a directory of its own under the agent's run dir,
    open to the agent's user only, or also to [exports] group (an imageio daemon's). The
    export serves several clients at once ([exports] max_connections) and stays up between
    them. The task's result, when it ends: {..., ended: "stop" | "inactive", written (write)}.

    A read or layer export needs a LEGAL volume and holds no lease. A write export holds
    the volume's lease for its life and, before it answers, makes the volume ILLEGAL with a
    transfer (generation + 1) that any host reads (Image.getStatus, Volume.getInfo): `create`
    makes a new volume for it; an existing volume must be a leaf with no copy in progress;
    exporting a volume under transfer again goes on with it (its tag must agree). Nothing
    written becomes LEGAL until Export.finish has checked it. Every mode opens the chain as
    the metadata says it is, after the checks of Image.copy's source (headers read by the
    agent, formats given, limits); a transfer's qcow2 is checked and its leaked clusters
    reclaimed before it is served again (waiting up to 10 s, said as the event Export.state
    {state: "waiting", reason: "image-locked"}, for the image lock a killed writer's qemu-nbd
    can hold while its last thread finishes its I/O; held longer: 218 VolumeInUse, reason
    open).
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 202 VolumeExists (create of a volume that
    exists without a transfer), 203 LeaseHeld (another writer), 204 NoSpace, 205
    CopyConflict (a copy in progress; data.reason), 207 VolumeIllegal (read or layer of an
    ILLEGAL volume), 215 VolumeHasChildren (write of an inner layer), 216 ImageInvalid,
    217 TransferConflict (another client's transfer: data.reason tag, or shape), -32602.

    A backup's export (read, with `bitmap` and/or `checkpoint`): under the volume's lease,
    `bitmap` is checked in every layer it spans (its rows against the images: 220
    NoSuchBitmap, 222 BitmapBroken with data.reason, never served broken), then
    `checkpoint` is added to the volume (as Bitmap.add; one that exists and is ok is kept),
    then the bitmap's union over the chain is made in a private qcow2 overlay on top of
    the chain, which qemu-nbd serves with `-B`; the answer then also says {bitmap,
    checkpoint}. A client reads the dirty extents of the meta context
    qemu:dirty-bitmap:NAME (an imageio ticket with "dirty": true does). Errors also: 218
    VolumeInUse (reason open: a guest has the image open), 221 BitmapExists (a checkpoint
    that exists broken), 223 BitmapsUnsupported.
    """
    if params["mode"] != "write" and (params["create"] or params["tag"]):
        raise errors.InvalidParams("create and tag are for a write export", param="mode")
    if params["mode"] != "read" and (params["bitmap"] or params["checkpoint"]):
        raise errors.InvalidParams("bitmap and checkpoint are for a read export",
                                   param="mode")
    args = {k: v for k, v in params.items() if v is not None}
    return WorkerJob(START, jobs.with_path(agent.domains, args))


def _export_task(agent: Supervisor, task_id: str):
    task = agent.tasks.get(task_id)
    if task is None:
        raise errors.NoSuchTask(f"no task {task_id!r}", taskID=task_id)
    if task.job is None or task.job.op != START:
        raise errors.InvalidParams(f"task {task_id!r} is not an export", param="taskID")
    return task


def _stop(agent: Supervisor, task) -> None:
    if task.worker is not None:
        agent.workers.stop(task.worker)
    else:  # waiting for a slot or a lockspace: it never served
        agent.abort(task)


@verb("Export.stop", Param("taskID", "taskid", doc="the export's task"),
      Param("finish", "bool", required=False, default=False,
            doc="then finish its transfer (Export.finish)"),
      Param("checksum", "str", required=False, check=checked_checksum,
            doc="with finish: what the client sent (\"blake3-4m:HEX\" or \"blake2b:HEX\")"),
      worker=True, events=("Task.state",))
def stop(agent: Supervisor, params):
    """Stop an export: qemu-nbd flushes and exits, a write export's volume stays ILLEGAL
    with its transfer (stopped), and the export's task ends done (result.ended "stop").
    With finish, this task then finishes the transfer as Export.finish does, once the
    export has let the volume go, and answers with its result; else it answers at once
    {taskID, stopping: true}.
    Errors: 101 NoSuchTask, 102 TaskNotActive (without finish), -32602 (not an export's
    task; finish of a read export), and with finish those of Export.finish.
    """
    task = _export_task(agent, params["taskID"])
    args = task.job.args
    if params["finish"] and args.get("mode") != "write":
        raise errors.InvalidParams("only a write export has a transfer to finish",
                                   param="finish")
    if task.active:
        _stop(agent, task)
    elif not params["finish"]:
        raise errors.TaskNotActive(f"task {task.id!r} is {task.state}", taskID=task.id,
                                   state=task.state)
    if not params["finish"]:
        return {"taskID": task.id, "stopping": True}
    ids = {k: args[k] for k in ("domainID", "imageID", "volumeID")}
    return _finish_job(agent, ids, params["checksum"])


def _finish_job(agent: Supervisor, ids: dict, expected: str | None) -> WorkerJob:
    args = jobs.with_path(agent.domains, ids) | {"wait": 30.0}
    if expected:
        args["checksum"] = expected
    return WorkerJob("export.finish", args)


@verb("Export.finish", *VOLUME_PARAMS,
      Param("checksum", "str", required=False, check=checked_checksum,
            doc="what the client sent: \"blake3-4m:HEX\" or \"blake2b:HEX\" (imageio's)"),
      worker=True, events=("Task.state", "Export.state"))
def finish(agent: Supervisor, params):
    """Finish a transfer: check what was written and make the volume LEGAL.

    A live write export of the volume in this agent is stopped first (the finish waits up
    to 30 s for it to let the volume go). Then, under the volume's lease: the data is made
    durable; its chain is checked as an uploaded image must be (the agent reads each
    qcow2's header itself: format, virtual size, backing and data files confined; then
    `qemu-img check`; a raw volume's file holds its size); its guest view is hashed
    through qemu-nbd (blake3-4m, recorded as a copy's is, and the client's `checksum` kind
    if given, which must match); and one transaction makes the volume LEGAL with
    generation + 1 and its checksum. Asked again for a volume already LEGAL (an answer
    lost), it answers the same with already: true. Result: {volumeID, legality, generation,
    checksum, size, format, already}.
    Errors: 200 NoSuchDomain, 201 NoSuchVolume, 203 LeaseHeld (the export did not let go),
    206 GenerationMismatch (fenced meanwhile), 213 VolumeTruncated, 216 ImageInvalid (the
    written image refused, data.reason as Image.copy's), 217 TransferConflict (no transfer
    to finish: data.reason no-transfer; the checksum differs: checksum, data.expected,
    data.found). On any error the volume stays ILLEGAL with its transfer.
    """
    ids = {k: params[k] for k in ("domainID", "imageID", "volumeID")}
    for task in agent.tasks.all(set(states.ACTIVE)):
        if task.job is not None and task.job.op == START and task.job.args.get(
                "mode") == "write" and all(task.job.args.get(k) == v for k, v in ids.items()):
            _stop(agent, task)
    return _finish_job(agent, ids, params["checksum"])
