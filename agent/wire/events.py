"""Broadcast events: [topic, JSON-RPC 2.0 notification] on a PUB socket.

Each notification's params carry `seq`, rising by one per event in this life of the agent,
and `boot_id`, new at every start, so a subscriber can tell a gap from a restart. Publishing
never blocks the agent: a subscriber too slow to keep up loses events past the high-water mark
(and sees the gap in seq), the agent never waits for it.

What a subscriber that never reads can cost: `[events] max_queued` events (ZMQ_SNDHWM), each
at most `[events] max_event_bytes`. A Task.state event carries a worker's result only when it
is small and never a query's answer (result_omitted: true); an event still too large goes out
with its error's data cut to its name, and one that cannot be made to fit is dropped and
counted (`oversized`, Host.getStats).
"""

from __future__ import annotations

import math

import zmq

from agent.wire import jsonrpc, transport

TOPICS = {
    "Host.booted": "the agent finished start-up and serves requests",
    "Task.state": "a task changed state; params.task is its whole record",
    "Task.progress": "a task's progress changed (at most about 10 a second per task)",
    "Image.copy": "a copy's state: started, copying (about once a second: copied, total,"
                  " percent), done, or abandoned (after max_attempts, with its last error)",
    "Image.merge": "a merge's state: started, merging (about once a second: copied, total,"
                   " percent; then step committed), done, or abandoned",
    "Image.recovered": "start-up found a copy marker or a merge and applied the recovery "
                       "policy to it (kind: merge for a merge)",
    "Operation.state": "an operation (a scrub) started or ended; best effort, from the agent "
                       "that started it while it lives: getOperationStatuses is the truth",
}

# Plain ints, and one send per frame: send_multipart and enum flags cost more than the send.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Publisher:
    def __init__(self, ctx: zmq.Context, endpoints: list[str], boot_id: str, hwm: int = 10000,
                 guard=None, max_bytes: int = 16384):
        self.max_bytes = max_bytes
        self.oversized = 0
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        if guard is not None:
            guard.protect(self.sock)
        self.endpoints = transport.bind_all(self.sock, endpoints)
        self.boot_id = boot_id
        self.seq = 0
        self.dropped = 0

    def publish(self, topic: str, params: dict) -> None:
        self.seq += 1
        body = {"jsonrpc": "2.0", "method": topic,
                "params": {**params, "seq": self.seq, "boot_id": self.boot_id}}
        try:
            data = jsonrpc.dumps(body)
        except (TypeError, ValueError):  # NaN, Infinity, or worse: never a crash
            data = jsonrpc.dumps(_finite(body))
        if len(data) > self.max_bytes:
            data = jsonrpc.dumps(_trimmed(body))
            if len(data) > self.max_bytes:
                self.oversized += 1  # the seq it had is a gap subscribers can see
                return
        try:
            self.sock.send(topic.encode(), _MORE)
            self.sock.send(data, _LAST)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self.sock.close(0)


def fits(obj, limit: int) -> bool:
    """Whether `obj` encodes to at most `limit` bytes of JSON."""
    try:
        return len(jsonrpc.dumps(obj)) <= limit
    except (TypeError, ValueError):
        return False


def _trimmed(body: dict) -> dict:
    """`body` with every error's data cut to its name and its message to 500 characters."""
    def trim(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("data"), dict) and "code" in obj and "message" in obj:
                return {"code": obj["code"], "message": str(obj["message"])[:500],
                        "data": {"name": obj["data"].get("name")}}
            return {k: trim(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [trim(v) for v in obj]
        return obj
    return _finite(trim(body))


def _finite(obj):
    """`obj` with every float that JSON cannot carry (NaN, Infinity) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is not None and not isinstance(obj, (dict, list, tuple, str, int, bool)):
        return None  # nothing JSON can carry
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
