"""Where a response goes: back through the route it came by, alone or as part of a batch.

A reply is a callable taking a response object (or None for a notification, which is never
answered). A batch collects its members' responses and sends them as one array once every
member has answered; a batch of only notifications sends nothing, as the spec requires.

Replies a client does not read wait in libzmq's queue for it, so the queue is bounded:
- at most `[rpc] max_queued_replies` replies per client (ZMQ_SNDHWM, with ROUTER_MANDATORY
  so that one past the bound is dropped and counted, never queued);
- replies over TRACKED_BYTES are sent zero-copy and tracked until libzmq has written them
  to the client's connection: while a client's tracked, unwritten replies hold more than
  `[rpc] max_unread_reply_bytes` (or, for a client with any unwritten, all clients' hold
  more than four times that), its next large reply is replaced by a small error, 1100
  ResourceExhausted (data.reason "unread-replies"), and counted. A client that reads gets
  every reply.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import time

import zmq

from agent import errors, logs
from agent.wire import jsonrpc

log = logs.get(component="rpc")

LATE_NEWS_SECONDS = 0.002  # at most, once per large reply (Ledger._late_news)
# A client whose one large reply is unwritten is most likely a reader that has read it: on a
# busy machine pyzmq's word can take longer than LATE_NEWS_SECONDS (a reader refused in CI
# while hogs held the all-clients bound). It is waited for longer, but no more often than
# LONG_WAITS_APART, so no crowd of clients can make those waits cost the loop > ~10 %.
READER_LATE_NEWS_SECONDS = 0.025
LONG_WAITS_APART = 0.25
TRACKED_BYTES = 2048  # replies larger than this are tracked (most answers are far smaller)
MAX_ROUTE_FRAMES = 7  # routing frames of a request: identity, delimiter, proxies' identities
MAX_ROUTE_FRAME_BYTES = 256  # libzmq identities are at most 255 bytes


class Ledger:
    """Bytes of large replies queued for each client and not yet written to its connection."""

    def __init__(self, per_peer: int):
        self.per_peer = per_peer
        self.total_limit = 4 * per_peer
        self.queued: dict[bytes, collections.deque] = {}  # identity -> (tracker, size)
        self.bytes: dict[bytes, int] = {}
        self.total = 0
        self.refused = 0  # large replies replaced by ResourceExhausted
        self.dropped = 0  # replies dropped: client gone, or its queue at max_queued_replies
        self.freed_since_trim = 0
        self.waited: dict[bytes, object] = {}  # peer -> the tracker last waited for
        self.long_wait_at = -LONG_WAITS_APART  # time.monotonic() of the last long wait

    def _settle(self, peer: bytes) -> None:
        q = self.queued.get(peer)
        while q and q[0][0].done:
            _, size = q.popleft()
            self.bytes[peer] -= size
            self.total -= size
            self.freed(size)
        if not q:
            self.queued.pop(peer, None)
            self.bytes.pop(peer, None)
            self.waited.pop(peer, None)

    def admits(self, peer: bytes, size: int) -> bool:
        """Whether a large reply of `size` may be queued for `peer`. The all-clients bound
        holds back clients that leave replies unread, never one that has read all of its
        own (else a few hogs would starve every reader)."""
        self._settle(peer)
        if self._over(peer, size) and self._late_news(peer):
            self._settle(peer)
        if self._over(peer, size):
            self.refused += 1
            return False
        return True

    def _over(self, peer: bytes, size: int) -> bool:
        """A client with nothing unwritten is over no bound, whatever the size of its reply
        (a reply larger than the bound would otherwise never reach anyone)."""
        mine = self.bytes.get(peer, 0)
        return bool(mine) and (mine + size > self.per_peer
                               or self.total + size > self.total_limit)

    def _late_news(self, peer: bytes) -> bool:
        """Whether the peer's oldest queued reply turns out written after all. libzmq says
        so through pyzmq's own thread, a little after the fact: a reader that asks again at
        once (a fast client, a fast encoder) could be refused for a reply it has read. So
        before refusing, wait for that word, briefly, and once per reply: a client that
        never reads costs this at most once per large reply it is sent."""
        queue = self.queued[peer]
        tracker = queue[0][0]
        if self.waited.get(peer) is tracker:
            return False
        self.waited[peer] = tracker
        seconds, now = LATE_NEWS_SECONDS, time.monotonic()
        if len(queue) == 1 and now - self.long_wait_at >= LONG_WAITS_APART:
            seconds, self.long_wait_at = READER_LATE_NEWS_SECONDS, now
        try:
            tracker.wait(seconds)
        except zmq.NotDone:
            return False
        return True

    def add(self, peer: bytes, tracker, size: int) -> None:
        self.queued.setdefault(peer, collections.deque()).append((tracker, size))
        self.bytes[peer] = self.bytes.get(peer, 0) + size
        self.total += size

    def sweep(self) -> None:
        """Settle every client's written replies (those of clients gone too)."""
        for peer in list(self.queued):
            self._settle(peer)

    def freed(self, size: int) -> None:
        """`size` bytes the agent held are free: once a large amount is, give it back to
        the OS, which glibc does not do by itself."""
        self.freed_since_trim += size
        if self.freed_since_trim >= 16 << 20:
            self.freed_since_trim = 0
            _trim()

    def stats(self) -> dict:
        return {"unread_reply_bytes": self.total, "clients_with_unread_replies": len(self.queued),
                "replies_refused": self.refused, "replies_dropped": self.dropped}


def _trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_unlogged = itertools.count()

# Plain ints, and one send per frame: send_multipart and enum flags cost more than the send.
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


class Route:
    """The frames a message came with (identity, and the empty delimiter of a REQ client)."""

    __slots__ = ("sock", "frames", "ledger")

    def __init__(self, sock: zmq.Socket, frames: list[bytes], ledger: Ledger):
        self.sock = sock
        self.frames = frames
        self.ledger = ledger

    def send(self, payload: dict) -> None:
        """Send one response object."""
        self.send_body(_encoded(payload), payload.get("id"))

    def send_body(self, body: bytes, ids) -> None:
        """Send an encoded response (`ids`: its id), or batch of them (`ids`: a list)."""
        peer = self.frames[0]
        tracked = len(body) > TRACKED_BYTES
        if tracked and not self.ledger.admits(peer, len(body)):
            body = jsonrpc.dumps(_unread(ids, self.ledger.per_peer))
            tracked = False
        try:
            # Never blocks: a client gone, or one whose queue is full, loses this reply.
            for frame in self.frames:
                self.sock.send(frame, _MORE)
            if tracked:
                self.ledger.add(peer, self.sock.send(body, _LAST, copy=False, track=True),
                                len(body))
            else:
                self.sock.send(body, _LAST)
        except zmq.ZMQError as exc:
            self.ledger.dropped += 1
            if next(_unlogged) % 1000 == 0:  # a flood of them must not flood the log
                log.warning("response_dropped", error=str(exc), dropped=self.ledger.dropped)


def _unread(ids, limit: int):
    """The small answer that replaces a large one a client has no room for."""
    def refusal(id_):
        return jsonrpc.error_response(id_, errors.ResourceExhausted(
            "this client's earlier replies are unread", reason="unread-replies", limit=limit))
    return [refusal(i) for i in ids] if isinstance(ids, list) else refusal(ids)


def once(reply):
    """`reply`, answering at most once: a request that crashed half-way through being served
    may already have been answered, and a batch counts each member's answer exactly once."""
    done = False

    def answer(response):
        nonlocal done
        if not done:
            done = True
            reply(response)
    return answer


def single(route: Route):
    def reply(response):
        if response is not None:
            route.send(response)
    return reply


class Batch:
    """Members' answers, each kept encoded as it comes (never the objects a query built),
    sent as one array once all have answered. An answer that would take the whole past
    `limit` bytes is replaced by 1100 ResourceExhausted (data.reason "batch-too-large")."""

    def __init__(self, route: Route, size: int, limit: int):
        self.route = route
        self.slots: list = [None] * size
        self.ids: list = [None] * size
        self.waiting = size
        self.limit = limit
        self.bytes = 2
        self.full = False  # the answer has no room left for another result

    def member(self, index: int):
        def reply(response):
            if response is not None:
                body = _encoded(response)
                if self.bytes + len(body) + 1 > self.limit:
                    self.full = True
                    body = jsonrpc.dumps(self._refusal(response.get("id")))
                self.bytes += len(body) + 1
                self.slots[index], self.ids[index] = body, response.get("id")
            self.waiting -= 1
            if self.waiting == 0:
                answered = [i for i, b in enumerate(self.slots) if b is not None]
                if answered:
                    self.route.send_body(b"[" + b",".join(self.slots[i] for i in answered)
                                         + b"]", [self.ids[i] for i in answered])
        return reply


    def _refusal(self, id_) -> dict:
        return jsonrpc.error_response(id_, errors.ResourceExhausted(
            "the batch's answers would exceed max_message_bytes", reason="batch-too-large",
            limit=self.limit))

    def refuse(self, index: int, obj) -> None:
        """Answer a member without serving it (a notification gets nothing, as ever)."""
        is_request = isinstance(obj, dict) and "id" in obj
        id_ = obj["id"] if is_request and jsonrpc.valid_id(obj["id"]) else None
        self.member(index)(self._refusal(id_) if is_request else None)


def _encoded(response: dict) -> bytes:
    try:
        return jsonrpc.dumps(response)
    except (TypeError, ValueError):  # our bug; the client still gets a proper answer
        log.error("unserializable_response")
        return jsonrpc.dumps(jsonrpc.error_response(response.get("id"), errors.InternalError()))
