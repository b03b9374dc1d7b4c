"""Every error the agent can answer with: code, name and a message.

Stdlib only: workers import this too. An error crosses the wire as a JSON-RPC error object
whose ``data.name`` is the class's ``name``, so a client can switch on a stable word rather
than on a number or on prose.
"""

from __future__ import annotations


class AgentError(Exception):
    code = -32603
    name = "InternalError"

    def __init__(self, message: str | None = None, **data):
        super().__init__(message or self.name)
        self.message = message or self.name
        self.data = data

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message, "data": {**self.data, "name": self.name}}


# The five of the JSON-RPC 2.0 specification.
class ParseError(AgentError):
    """The message is not valid JSON (or not UTF-8; NaN and Infinity are not JSON)."""

    code, name = -32700, "ParseError"


class InvalidRequest(AgentError):
    """The JSON is not a valid request object (or batch)."""

    code, name = -32600, "InvalidRequest"


class MethodNotFound(AgentError):
    """No such method (or a debug method while debug is off)."""

    code, name = -32601, "MethodNotFound"


class InvalidParams(AgentError):
    """A param is missing, unknown, of the wrong type or out of range; data.param names it."""

    code, name = -32602, "InvalidParams"


class InternalError(AgentError):
    """A bug in the agent; the details are in its log, never in the answer."""

    code, name = -32603, "InternalError"


# The agent's own.
class RecoveryInProgress(AgentError):
    """Start-up (which is recovery) has not finished; try again shortly."""

    code, name = 99, "RecoveryInProgress"


class TaskIdInUse(AgentError):
    """A task with this ID is active; the active task is untouched."""

    code, name = 100, "TaskIdInUse"


class NoSuchTask(AgentError):
    """No task with this ID in this life of the agent (or no longer retained)."""

    code, name = 101, "NoSuchTask"


class TaskNotActive(AgentError):
    """The task has already ended."""

    code, name = 102, "TaskNotActive"


class WorkerDied(AgentError):
    """The worker process ended without reporting a result (signal or exit code)."""

    code, name = 103, "WorkerDied"


class WorkerTimeout(AgentError):
    """The worker stopped reporting for longer than its deadline and was killed."""

    code, name = 104, "WorkerTimeout"


class OperationFailed(AgentError):
    """An operation raised something that is not an agent error (for example EIO)."""

    code, name = 105, "OperationFailed"


class TaskAborted(AgentError):
    """The task was aborted (Task.abort) before it finished; nothing was reverted."""

    code, name = 106, "TaskAborted"


class NoSuchDomain(AgentError):
    """The domain is not attached here, or there is no domain with that ID at that path."""

    code, name = 200, "NoSuchDomain"


class NoSuchVolume(AgentError):
    """No such volume in that domain and image."""

    code, name = 201, "NoSuchVolume"


class VolumeExists(AgentError):
    """The volume exists (a LEGAL copy destination included)."""

    code, name = 202, "VolumeExists"


class LeaseHeld(AgentError):
    """Another process (on this host or another) holds the volume's lease; data.holder says who."""

    code, name = 203, "LeaseHeld"


class NoSpace(AgentError):
    """The storage is full (ENOSPC or EDQUOT)."""

    code, name = 204, "NoSpace"


class CopyConflict(AgentError):
    """The destination has a copy marker from another source."""

    code, name = 205, "CopyConflict"


class GenerationMismatch(AgentError):
    """The copy changed hands or ended since the caller looked (fencing)."""

    code, name = 206, "GenerationMismatch"


class VolumeIllegal(AgentError):
    """The volume is ILLEGAL (a copy into it has not completed) and cannot be a source."""

    code, name = 207, "VolumeIllegal"


class DomainExists(AgentError):
    """A domain exists at that path, or one with that ID is attached already."""

    code, name = 208, "DomainExists"


class NoSuchOperation(AgentError):
    """No operation with that ID in that domain (or it was pruned as too old)."""

    code, name = 209, "NoSuchOperation"


class OperationExists(AgentError):
    """An operation with that ID was started in that domain already; pick a new ID."""

    code, name = 210, "OperationExists"


class OperationNotRunning(AgentError):
    """The operation has ended, or its process died (it reads UNKNOWN); data.state says which."""

    code, name = 211, "OperationNotRunning"


class OperationLost(AgentError):
    """The operation's process died without finishing; recorded when the next one started."""

    code, name = 212, "OperationLost"


class VolumeTruncated(AgentError):
    """A volume's data file ends before its recorded size (cut behind the agent's back): read
    as a hole it would pass for zeros, so a copy from it stops instead."""

    code, name = 213, "VolumeTruncated"


class DomainUnusable(AgentError):
    """The directory holds a domain this agent cannot use: its metadata is damaged, not a
    hostagent schema, or of a newer version (data.reason says which); nothing was written."""

    code, name = 214, "DomainUnusable"


class VolumeHasChildren(AgentError):
    """The volume is a parent in its image's chain (snapshots are layered on it): it cannot be
    deleted, and a snapshot is taken of the chain's leaf only (data.children names them)."""

    code, name = 215, "VolumeHasChildren"


class ImageInvalid(AgentError):
    """qemu's tools refused a volume's image, or the agent refused to open it: corrupt, an
    unsupported feature, a backing chain that is not whole or names a file outside its image
    (data.reason; data.tool and data.detail carry the tool's own message)."""

    code, name = 216, "ImageInvalid"


class TransferConflict(AgentError):
    """A transfer (a volume written through an export) cannot go on as asked: another
    client's is in progress (data.reason "tag"), the shape differs ("shape"), there is none
    to finish ("no-transfer"), or what was written is not what the client sent ("checksum":
    data.expected, data.found). The volume stays ILLEGAL; nothing was lost."""

    code, name = 217, "TransferConflict"


class VolumeInUse(AgentError):
    """Another operation is working on the volume: a copy reads it ("copy-source") or
    writes it ("copy-destination"), a transfer writes it ("transfer"), or it is in a merge
    ("merge"), as data.reason says. Nothing was changed; try again when that one ends."""

    code, name = 218, "VolumeInUse"


class ShrinkRefused(AgentError):
    """A volume never shrinks: what its guest wrote past the new end would be lost
    (data.size, data.requested)."""

    code, name = 219, "ShrinkRefused"


class NoSuchBitmap(AgentError):
    """The volume has no dirty bitmap of that name in the agent's metadata (data.bitmap)."""

    code, name = 220, "NoSuchBitmap"


class BitmapExists(AgentError):
    """The volume already has a dirty bitmap of that name (data.bitmap; data.state says
    whether it is usable)."""

    code, name = 221, "BitmapExists"


class BitmapBroken(AgentError):
    """A dirty bitmap cannot be trusted, so it is not used: data.reason says why (in-use: a
    writer of the image died with it open; missing: the image lacks it; recorded: an
    operation of the agent was cut short while it changed; chain: a layer of the chain does
    not carry it; granularity, disabled, inconsistent). Remove it (or clear the volume's
    bitmaps) and take a full backup."""

    code, name = 222, "BitmapBroken"


class BitmapsUnsupported(AgentError):
    """Dirty bitmaps live in qcow2 images only: a raw volume has none (data.format)."""

    code, name = 223, "BitmapsUnsupported"


class ResourceExhausted(AgentError):
    """max_active_tasks operations are active; queries are still served."""

    code, name = 1100, "ResourceExhausted"


# errno values that mean "the path you gave is not usable here": the caller's input, not us.
_PATH_ERRNOS = frozenset({"ENOENT", "ENOTDIR", "EACCES", "EPERM", "EROFS", "ENAMETOOLONG",
                          "ELOOP", "EISDIR", "EEXIST", "EXDEV", "ENXIO", "ENODEV", "EINVAL"})


def from_os_error(exc: OSError, what: str, param: str | None = None) -> AgentError:
    """What an OSError of the world means to a client. Never InternalError (-32603 says the
    agent has a bug, and engines retry it): a full disk is NoSpace; a file too large for the
    file system, or a path the OS refuses, is InvalidParams naming `param` when the caller's
    input chose it; anything else OperationFailed, with the errno."""
    import errno as _errno
    name = _errno.errorcode.get(exc.errno, str(exc.errno))
    reason = exc.strerror or str(exc)
    if name in ("ENOSPC", "EDQUOT"):
        return NoSpace(f"{what}: {reason}", errno=name)
    if param is not None and (name in _PATH_ERRNOS or name == "EFBIG"):
        return InvalidParams(f"{param}: {what}: {reason}", param=param, errno=name)
    return OperationFailed(f"{what}: {reason}", errno=name)


BY_NAME: dict[str, type[AgentError]] = {
    cls.name: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, AgentError)
}


def from_json(obj: dict) -> AgentError:
    """Rebuild an error sent by a worker (or a server) from its JSON form."""
    data = dict(obj.get("data") or {})
    cls = BY_NAME.get(data.pop("name", ""), AgentError)
    err = cls(obj.get("message"), **data)
    if cls is AgentError:
        err.code = obj.get("code", AgentError.code)
    return err
