"""Events as a subscriber sees them: what it may have missed, and whether the agent restarted.

Each event's params carry `seq` (rising by one per event in one life of the agent) and
`boot_id` (new at every start). A subscriber that sees seq jump has lost events (it fell
behind the agent's high-water mark, or its connection dropped); one that sees a new boot_id
knows the agent restarted and forgot every task. Either way what it believed may be stale:
it must re-read state. `Event.gap` and `Event.restarted` say so on the first event after.

seq counts every event, whatever its topic, so a subscription receives them all and filters
topics here: a topic filter on the socket would make every other topic look like a gap.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from agent.client.protocol import Timeout


@dataclass(frozen=True)
class Event:
    topic: str
    params: dict
    seq: int | None = None
    boot_id: str | None = None
    gap: int = 0  # events lost just before this one (seq jumped by gap + 1)
    restarted: bool = False  # the first event seen from a new life of the agent
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def stale(self) -> bool:
        """Whether state read before this event may be stale: re-read it."""
        return bool(self.gap or self.restarted)


class SeqTracker:
    """Pure bookkeeping of (boot_id, seq): what `Event.gap` and `Event.restarted` say.

    `boot_id` is the life the caller already knows of (from Host.getCapabilities), if any:
    a first event from another life is then a restart too."""

    def __init__(self, boot_id: str | None = None):
        self.boot_id = boot_id
        self.seq: int | None = None

    def see(self, boot_id, seq) -> tuple[int, bool]:
        """(gap, restarted) for an event with this boot_id and seq."""
        if not isinstance(seq, int) or isinstance(seq, bool):
            return 0, False  # not an agent's event: nothing to tell
        gap, restarted = 0, False
        if self.boot_id is not None and boot_id != self.boot_id:
            restarted = True
            gap = seq - 1  # what the new life published before we heard from it
        elif self.seq is not None and seq > self.seq + 1:
            gap = seq - self.seq - 1
        self.boot_id, self.seq = boot_id, seq
        return gap, restarted


def decode(frames: list[bytes], tracker: SeqTracker) -> Event | None:
    """The event in a [topic, notification] message, or None if it is not one."""
    if len(frames) != 2:
        return None
    try:
        body = json.loads(frames[1])
        topic = frames[0].decode()
    except (ValueError, UnicodeDecodeError):
        return None
    params = body.get("params") if isinstance(body, dict) else None
    if not isinstance(params, dict):
        return None
    seq, boot_id = params.get("seq"), params.get("boot_id")
    gap, restarted = tracker.see(boot_id, seq)
    return Event(topic, params, seq, boot_id, gap, restarted, body)


def matches(topic: str, topics) -> bool:
    """ZeroMQ's rule: a topic matches a subscription that is a prefix of it."""
    return not topics or any(topic.startswith(t) for t in topics)


class Subscription:
    """The agent's events, filtered by topic prefix, with gaps and restarts marked.

    `async for event in sub` waits for ever; `await sub.next(timeout)` returns None when
    nothing arrives in time. Close it (or use `async with`) when done.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, topics=None, *,
                 boot_id: str | None = None, rcvhwm: int | None = None, keys=None):
        self.topics = tuple(topics or ())
        self.tracker = SeqTracker(boot_id)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if keys:
            from agent.client.curve import make_client
            make_client(self.sock, keys["client_key"], keys["server_key"])
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.closed = False

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next matching event, or None if none arrives within `timeout` seconds.
        An event that does not match still counts for gaps: its successor is not flagged,
        but a flag the skipped one carried moves on to the next event returned."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        carried_gap, carried_restart = 0, False
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if left is not None and not await self.sock.poll(int(left * 1000)):
                if carried_gap or carried_restart:  # say it even with nothing to carry it
                    return Event("", {}, self.tracker.seq, self.tracker.boot_id,
                                 carried_gap, carried_restart)
                return None
            ev = decode(await self.sock.recv_multipart(), self.tracker)
            if ev is None:
                continue
            carried_gap += ev.gap
            carried_restart = carried_restart or ev.restarted
            if matches(ev.topic, self.topics):
                if carried_gap != ev.gap or carried_restart != ev.restarted:
                    ev = Event(ev.topic, ev.params, ev.seq, ev.boot_id, carried_gap,
                               carried_restart, ev.raw)
                return ev

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        ev = await self.next()
        if ev is None:  # pragma: no cover (no timeout: never)
            raise Timeout("no event")
        return ev

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close(0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
