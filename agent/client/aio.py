"""The asyncio client: many calls in flight on one DEALER socket, events, and waiting.

    async with AsyncClient("tcp://127.0.0.1:5670") as agent:
        await agent.call("Host.ping")                      # True
        outcome = await agent.copy_image(src, dst)         # returns once dst is LEGAL

One reader task receives every response and hands each to the future of the call with that
id, so calls answer in whatever order the agent finishes them. Every wait has a deadline:
sending too (a DEALER with no connected agent would queue or block for ever: the socket is
ZMQ_IMMEDIATE, so a request that could not be sent in time is never sent later), and a
response that comes after its call timed out is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import zmq
import zmq.asyncio

from agent.client import wait as waiting
from agent.client.protocol import (
    CallError,
    Timeout,
    check_task_id,
    guess_events_endpoint,
    request,
)
from agent.client.subscription import Subscription


class AsyncClient:
    def __init__(self, endpoint: str, events_endpoint: str | None = None, *,
                 ctx: zmq.asyncio.Context | None = None, timeout: float = 10.0,
                 client_key: str | None = None, server_key: str | None = None):
        """`endpoint`: the agent's RPC endpoint; `events_endpoint`: its events endpoint
        (default: guessed from `endpoint`, see protocol.guess_events_endpoint). `client_key`
        (our .key_secret file) and `server_key` (the agent's public .key file) make both
        sockets CURVE clients, for an agent with [security] set. `timeout`: the default of
        every call, in seconds."""
        if bool(client_key) != bool(server_key):
            raise ValueError("CURVE needs both client_key and server_key")
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint or guess_events_endpoint(endpoint)
        self.timeout = timeout
        self.keys = {"client_key": client_key, "server_key": server_key} if client_key \
            else None
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.keys:
            from agent.client.curve import make_client
            make_client(self.sock, client_key, server_key)
        self.sock.connect(endpoint)
        self._pending: dict = {}  # id -> future of its response
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._subscriptions: list[Subscription] = []
        self.closed = False

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # -- calls -----------------------------------------------------------------------------

    async def call(self, method: str, params=None, task_id=None, timeout: float | None = None):
        """The result, or CallError (code, message, name = data.name); Timeout after
        `timeout` seconds (the client's default if None), sending included.

        `task_id` is the request's id, hence the task's ID (generated if None): reuse one
        to make a command run once on a host (a second one while the first is active is
        refused with 100 TaskIdInUse)."""
        if self.closed:
            raise RuntimeError("the client is closed")
        task_id = self.new_id() if task_id is None else task_id
        check_task_id(task_id)
        if task_id in self._pending:
            raise CallError.local(100, "TaskIdInUse", f"a call with id {task_id!r} is already "
                                  f"waiting on this client", taskID=str(task_id))
        t = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + t
        self._start_reader()
        fut = loop.create_future()
        self._pending[task_id] = fut
        try:
            await self._send(request(method, params, task_id), deadline, t)
            try:
                resp = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise Timeout(f"no response to {method} within {t} s") from None
        finally:
            if self._pending.get(task_id) is fut:
                del self._pending[task_id]
        if "error" in resp:
            raise CallError(resp["error"])
        return resp.get("result")

    async def notify(self, method: str, params=None, timeout: float | None = None) -> None:
        """Send a notification: never answered (a verb that does work runs as a task the
        agent names notification:<boot>:<n>)."""
        t = self.timeout if timeout is None else timeout
        await self._send(request(method, params), asyncio.get_running_loop().time() + t, t)

    async def _send(self, body: bytes, deadline: float, t: float) -> None:
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.sock.send(body), left)
        except asyncio.TimeoutError:
            raise Timeout(f"cannot send within {t} s: no connection to the agent at "
                          f"{self.endpoint}") from None

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                body = await self.sock.recv()
            except zmq.ZMQError:  # closed under us
                return
            try:
                resp = json.loads(body)
            except ValueError:
                continue
            for r in resp if isinstance(resp, list) else [resp]:
                if isinstance(r, dict):
                    self._dispatch(r)

    def _dispatch(self, resp: dict) -> None:
        fut = self._pending.get(resp.get("id"))
        if fut is None and resp.get("id") is None and "error" in resp and \
                len(self._pending) == 1:
            # The agent refused a request whose id it could not read: ours, the only one.
            fut = next(iter(self._pending.values()))
        if fut is not None and not fut.done():
            fut.set_result(resp)
        # Anything else answers a call that timed out (or not ours): dropped.

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, topics=None, *, boot_id: str | None = None,
                  rcvhwm: int | None = None) -> Subscription:
        """Events whose topic starts with one of `topics` (default: all), each flagged when
        events were lost before it (`gap`) or the agent restarted (`restarted`): then
        re-read state. `boot_id`: the agent life you already know, so a restart before the
        first event is noticed too. Use as `async with client.subscribe(...) as sub:` and
        `async for event in sub`, or `await sub.next(timeout)`."""
        if isinstance(topics, str):
            topics = [topics]
        sub = Subscription(self.ctx, self.events_endpoint, topics, boot_id=boot_id,
                           rcvhwm=rcvhwm, keys=self.keys)
        self._subscriptions = [s for s in self._subscriptions if not s.closed] + [sub]
        return sub

    # -- waiting, and the common flows -----------------------------------------------------

    async def wait_task(self, task_id, *, dst: dict | None = None, timeout: float | None = None,
                        poll_interval: float = 1.0, settle: float = 10.0,
                        unreachable_timeout: float = 60.0, on_progress=None,
                        subscription: Subscription | None = None) -> waiting.Outcome:
        """Wait for a task to end; the recommended way to track work, copies above all.

        It follows the task's `Task.state` events and, whenever they are silent for
        `poll_interval` seconds, lost (a gap) or from a new agent life, re-reads
        `Task.getStatus` instead. A copy outlives its task: given the copy's destination
        (`dst`), once the task is gone (101 NoSuchTask: the agent restarted) or failed after
        it owned the destination (it is retried by policy), it follows the destination on
        storage with `Image.getStatus`, which any host attached to the domain can answer:
        LEGAL means done; a marker with a live lease is being copied (by a retry, by the
        restarted agent's recovery, or by another host); a marker that is abandoned, or
        whose lease stays free for `settle` seconds with no task of this agent on it, needs
        continuing (`continue_copy`).

        Returns an Outcome (state done, failed, aborted, needs_continuing or lost; see
        Outcome.raise_for_state). Raises Timeout after `timeout` seconds in all, or when the
        agent answered nothing for `unreachable_timeout` seconds. `on_progress(Progress)` is
        called with what is known of the progress, from events or polls."""
        return await waiting.follow(self, task_id, dst=dst, timeout=timeout,
                                    poll_interval=poll_interval, settle=settle,
                                    unreachable_timeout=unreachable_timeout,
                                    on_progress=on_progress, subscription=subscription)

    async def copy_image(self, src: dict, dst: dict, wait: bool = True, *, task_id=None,
                         on_progress=None, mode: str | None = None, format: str | None = None,
                         **wait_options):
        """Copy volume `src` to a new volume `dst` (each {domainID, imageID, volumeID});
        `mode` collapse or chain and `format` raw or cow as Image.copy takes them.

        wait=False: the agent's first answer once the destination exists (ILLEGAL, with its
        marker) and the data is being copied, plus its taskID. wait=True: the Outcome once
        the destination is LEGAL, followed as in wait_task, across agent restarts; raises
        TaskFailed, NeedsContinuing or TaskLost (see Outcome.raise_for_state) otherwise."""
        how = {k: v for k, v in (("mode", mode), ("format", format)) if v is not None}
        return await self._start_copy(src, dst, wait, task_id, on_progress, wait_options,
                                      how=how)

    async def continue_copy(self, dst: dict, src: dict | None = None, wait: bool = True, *,
                            task_id=None, on_progress=None, **wait_options):
        """Continue a copy into `dst` from its last checkpoint, as a new task.

        `src` defaults to the source recorded in the destination's marker (read with
        Image.getStatus). A destination that is LEGAL already needs nothing: the answer is
        a done Outcome (wait=True) or {"taskID": None, "state": "done", ...}. If someone
        holds the destination's lease (a recovery or a retry got there first) and wait is
        true, that copy is followed instead."""
        status = await self.call("Image.getStatus", dst)
        if status["legality"] == "LEGAL" and status["copy"] is None:
            if wait:
                return waiting.Outcome(task_id, "done", result=status, image=status, dst=dst,
                                       via="storage")
            return {"taskID": None, "state": "done", "volumeID": status["volumeID"],
                    "generation": status["generation"]}
        if src is None:
            src = (status["copy"] or {}).get("source")
            if src is None:
                raise CallError.local(-32602, "InvalidParams",
                                      "the destination has no copy marker to name its source")
        return await self._start_copy(src, dst, wait, task_id, on_progress, wait_options,
                                      follow_held=True)

    async def merge_image(self, base: dict, top_volume_id: str, wait: bool = True, *,
                          task_id=None, on_progress=None, **wait_options):
        """Merge the snapshot `top_volume_id` into its parent `base` ({domainID, imageID,
        volumeID}): as copy_image, the first answer (wait=False) or the Outcome once base is
        LEGAL with the merge gone, followed on storage across agent restarts. Asked again
        for a merge in progress, it continues it; if someone holds it (a recovery, a
        retry) and wait is true, that merge is followed instead."""
        task_id = self.new_id() if task_id is None else task_id
        params = {"domainID": base["domainID"], "imageID": base["imageID"],
                  "baseVolumeID": base["volumeID"], "topVolumeID": top_volume_id}
        sub = self.subscribe() if wait else None
        try:
            try:
                first = await self.call("Image.merge", params, task_id=task_id)
            except CallError as exc:
                if not (wait and exc.name == "LeaseHeld"):
                    raise
                task_id = (exc.data.get("holder") or {}).get("task_id") or task_id
                first = {}
            if not wait:
                return {"taskID": task_id, **first}
            if first.get("state") == "done":  # done before: nothing ran
                return waiting.Outcome(task_id, "done", result=first, dst=base, via="task")
            outcome = await self.wait_task(task_id, dst=base, on_progress=on_progress,
                                           subscription=sub, **wait_options)
            return outcome.raise_for_state()
        finally:
            if sub is not None:
                sub.close()

    async def _start_copy(self, src, dst, wait, task_id, on_progress, wait_options,
                          follow_held: bool = False, how: dict | None = None):
        task_id = self.new_id() if task_id is None else task_id
        sub = self.subscribe() if wait else None  # before the call: no event is missed
        try:
            try:
                first = await self.call("Image.copy", {"src": src, "dst": dst, **(how or {})},
                                        task_id=task_id)
            except CallError as exc:
                if not (wait and follow_held and exc.name == "LeaseHeld"):
                    raise
                holder = exc.data.get("holder") or {}
                task_id = holder.get("task_id") or task_id
            if not wait:
                return {"taskID": task_id, **first}
            outcome = await self.wait_task(task_id, dst=dst, on_progress=on_progress,
                                           subscription=sub, **wait_options)
            outcome.raise_for_state()
            return outcome
        finally:
            if sub is not None:
                sub.close()

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        for sub in self._subscriptions:
            sub.close()
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
