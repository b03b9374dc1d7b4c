"""Broadcast events: [topic, JSON-RPC 2.0 notification] on a PUB socket.

Each notification's params carry `seq`, rising by one per event in this life of the agent,
and `boot_id`, new at every start, so a subscriber can tell a gap from a restart. Publishing
never blocks the agent: a subscriber too slow to keep up loses events past the high-water mark
(and sees the gap in seq), the agent never waits for it.
"""

from __future__ import annotations

import math

import zmq

from agent import jsonrpc, transport

TOPICS = {
    "Host.booted": "the agent finished start-up and serves requests",
    "Task.state": "a task changed state; params.task is its whole record",
    "Task.progress": "a task's progress changed (at most about 10 a second per task)",
    "Image.copy": "a copy's state: started, copying (about once a second: copied, total,"
                  " percent), done, or abandoned (after max_attempts, with its last error)",
    "Image.recovered": "start-up found a copy marker and applied the recovery policy to it",
    "Operation.state": "an operation (a scrub) started or ended; best effort, from the agent "
                       "that started it while it lives: getOperationStatuses is the truth",
}

# Plain ints, and one send per frame: send_multipart and enum flags cost more than the send.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Publisher:
    def __init__(self, ctx: zmq.Context, endpoints: list[str], boot_id: str, hwm: int = 10000,
                 guard=None):
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
        except ValueError:  # NaN or Infinity somewhere: not JSON, sent as null, never a crash
            data = jsonrpc.dumps(_finite(body))
        try:
            self.sock.send(topic.encode(), _MORE)
            self.sock.send(data, _LAST)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self.sock.close(0)


def _finite(obj):
    """`obj` with every float that JSON cannot carry (NaN, Infinity) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
