"""Where a response goes: back through the route it came by, alone or as part of a batch.

A reply is a callable taking a response object (or None for a notification, which is never
answered). A batch collects its members' responses and sends them as one array once every
member has answered; a batch of only notifications sends nothing, as the spec requires.
"""

from __future__ import annotations

import zmq

from agent import errors, jsonrpc, logs

log = logs.get(component="rpc")

# Plain ints, and one send per frame: send_multipart and enum flags cost more than the send.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Route:
    """The frames a message came with (identity, and the empty delimiter of a REQ client)."""

    __slots__ = ("sock", "frames")

    def __init__(self, sock: zmq.Socket, frames: list[bytes]):
        self.sock = sock
        self.frames = frames

    def send(self, payload) -> None:
        try:
            body = jsonrpc.dumps(payload)
        except (TypeError, ValueError):
            # A result that is not JSON is our bug; the client still gets a proper answer.
            log.error("unserializable_response")
            ids = payload if isinstance(payload, list) else [payload]
            body = jsonrpc.dumps([jsonrpc.error_response(p.get("id"), errors.InternalError())
                                  for p in ids] if isinstance(payload, list)
                                 else jsonrpc.error_response(payload.get("id"),
                                                             errors.InternalError()))
        try:
            # ROUTER drops what it cannot route (a client gone, a full pipe): never blocks.
            for frame in self.frames:
                self.sock.send(frame, _MORE)
            self.sock.send(body, _LAST)
        except zmq.ZMQError as exc:
            log.warning("response_dropped", error=str(exc))


def single(route: Route):
    def reply(response):
        if response is not None:
            route.send(response)
    return reply


class Batch:
    def __init__(self, route: Route, size: int):
        self.route = route
        self.slots: list = [None] * size
        self.waiting = size

    def member(self, index: int):
        def reply(response):
            self.slots[index] = response
            self.waiting -= 1
            if self.waiting == 0:
                answers = [r for r in self.slots if r is not None]
                if answers:
                    self.route.send(answers)
        return reply
