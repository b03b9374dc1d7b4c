"""The protocol between the supervisor and its workers: one module both sides import.

Transport: a ROUTER in the supervisor bound on ipc in the run dir (`endpoint`), one DEALER per
worker. Every message is ONE frame of JSON with a type "t":

  worker -> supervisor
    hello    {pid}            the worker runs (its pid, as the kernel knows it)
    beat     {}               still alive (at least every heartbeat_seconds)
    progress {progress}       0-100
    return   {result}         answer the request now; the task goes on
    event    {topic, params}  publish an event (the supervisor adds taskID)
    result   {result}         final: the operation returned
    error    {error}          final: a JSON-RPC error object
    stopped  {}               final: it stopped when asked
  supervisor -> worker
    abort                     stop at the next check (SIGTERM means the same)
    ack                       the final message arrived; the worker may exit

Who may speak. A worker's identity is its spawn token, which holds 128 random bits and reaches
the worker only through the fork server's private socketpair: a process that merely can
connect to the socket (any process of the agent's user) cannot guess one, and a message
from an identity the supervisor did not hand out is dropped and counted. An operation's
process (a scrub, which outlives workers and agents) speaks as `op:<operationID>:<mac>`,
the mac an HMAC of the operation ID under a key of this life of the agent; such a process
may only publish Operation.state events. Every message is validated here; a malformed one
from a worker costs that worker (SIGTERM, its task fails), never the supervisor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets

SOCKET_NAME = "workers.sock"

ABORT = b'{"t":"abort"}'
STOP = b'{"t":"stop"}'  # end the work as planned (an export's stop): the task ends done
ACK = b'{"t":"ack"}'

FINAL = frozenset({"result", "error", "stopped"})
# A worker's message: results and events are small; a bigger one is not a worker of ours.
MAX_MESSAGE_BYTES = 4 << 20
MAX_TOPIC_LENGTH = 64

# Worker exit codes (as gunicorn names its reserved ones): what a WorkerDied error's
# exit_code means when the worker never reported.
EXIT_NOT_ADOPTED = 70  # the supervisor died before it adopted the worker (or someone else did)
EXIT_NO_ACK = 71  # it reported its outcome but no ack came within ACK_TIMEOUT_MS
EXIT_RUNTIME_FAILED = 72  # the worker runtime itself failed (not the operation: that is "error")
EXIT_MEANINGS = {
    EXIT_NOT_ADOPTED: "never adopted by the supervisor",
    EXIT_NO_ACK: "its final report was never acknowledged",
    EXIT_RUNTIME_FAILED: "the worker runtime failed (see the agent's log)",
}
ACK_TIMEOUT_MS = 10_000

OPERATION_PREFIX = b"op:"
# Where an operation's process finds its signed identity (set by the worker that starts it).
EVENT_IDENTITY_ENV = "HOSTAGENT_EVENT_IDENTITY"


class ProtocolError(Exception):
    """A message that breaks this protocol."""


def endpoint(run_dir) -> str:
    return f"ipc://{run_dir}/{SOCKET_NAME}"


def exports_dir(run_dir) -> str:
    """Where workers make their qemu-nbd exports' directories, one `<pid>-<random>` each:
    the agent's start-up removes those whose process is gone (a killed worker's)."""
    return os.path.join(str(run_dir), "exports")


def new_token(seq: int) -> str:
    """A worker's identity: a sequence number (for people) and 128 random bits."""
    return f"w{seq}-{secrets.token_hex(16)}"


def new_key() -> bytes:
    """The key of this life of the agent, for operation identities."""
    return secrets.token_bytes(32)


def operation_identity(key: bytes, operation_id: str) -> str:
    mac = hmac.new(key, operation_id.encode(), hashlib.sha256).hexdigest()[:32]
    return f"op:{operation_id}:{mac}"


def operation_of(key: bytes, identity: bytes) -> str | None:
    """The operation ID an `op:` identity names, if its mac is right under `key`."""
    try:
        _, operation_id, mac = identity.decode("ascii").split(":")
    except ValueError:  # not ASCII, or not three fields
        return None
    good = operation_identity(key, operation_id).rsplit(":", 1)[1]
    return operation_id if hmac.compare_digest(mac, good) else None


def encode(kind: str, **fields) -> bytes:
    return json.dumps({"t": kind, **fields}, separators=(",", ":")).encode()


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise ProtocolError(why)


def decode(frame: bytes) -> dict:
    """A worker's message, checked; ProtocolError if it is not one."""
    _require(len(frame) <= MAX_MESSAGE_BYTES, f"message of {len(frame)} bytes")
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        raise ProtocolError("not JSON") from None
    _require(isinstance(msg, dict) and isinstance(msg.get("t"), str), "no type")
    kind = msg["t"]
    if kind == "hello":
        pid = msg.get("pid")
        _require(isinstance(pid, int) and not isinstance(pid, bool) and pid > 0, "bad pid")
    elif kind == "progress":
        _require(_number(msg.get("progress")), "bad progress")
    elif kind == "event":
        topic = msg.get("topic")
        _require(isinstance(topic, str) and 0 < len(topic) <= MAX_TOPIC_LENGTH, "bad topic")
        _require(isinstance(msg.get("params"), dict), "bad event params")
    elif kind == "error":
        error = msg.get("error")
        _require(isinstance(error, dict) and isinstance(error.get("message", ""), str)
                 and isinstance(error.get("data", {}), dict), "bad error")
    elif kind not in ("beat", "return", "result", "stopped"):
        raise ProtocolError(f"unknown type {kind[:32]!r}")
    return msg


def decode_operation_event(frame: bytes) -> dict:
    """An operation process's message: only `event` with topic Operation.state."""
    msg = decode(frame)
    _require(msg["t"] == "event" and msg["topic"] == "Operation.state",
             "an operation may only publish Operation.state")
    task_id = msg.get("task_id")
    _require(task_id is None or isinstance(task_id, str), "bad task_id")
    return msg


class Stopped(Exception):
    """An op stopped because it was asked to (an abort message or SIGTERM): the worker ends
    with the `stopped` report."""
