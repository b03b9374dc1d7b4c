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
    code, name = -32700, "ParseError"


class InvalidRequest(AgentError):
    code, name = -32600, "InvalidRequest"


class MethodNotFound(AgentError):
    code, name = -32601, "MethodNotFound"


class InvalidParams(AgentError):
    code, name = -32602, "InvalidParams"


class InternalError(AgentError):
    code, name = -32603, "InternalError"


# The agent's own.
class RecoveryInProgress(AgentError):
    code, name = 99, "RecoveryInProgress"


class TaskIdInUse(AgentError):
    code, name = 100, "TaskIdInUse"


class NoSuchTask(AgentError):
    code, name = 101, "NoSuchTask"


class TaskNotActive(AgentError):
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
    code, name = 200, "NoSuchDomain"


class NoSuchVolume(AgentError):
    code, name = 201, "NoSuchVolume"


class VolumeExists(AgentError):
    code, name = 202, "VolumeExists"


class LeaseHeld(AgentError):
    code, name = 203, "LeaseHeld"


class NoSpace(AgentError):
    code, name = 204, "NoSpace"


class CopyConflict(AgentError):
    code, name = 205, "CopyConflict"


class GenerationMismatch(AgentError):
    code, name = 206, "GenerationMismatch"


class VolumeIllegal(AgentError):
    code, name = 207, "VolumeIllegal"


class DomainExists(AgentError):
    code, name = 208, "DomainExists"


class ResourceExhausted(AgentError):
    code, name = 1100, "ResourceExhausted"


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
