"""Requests in: read from the RPC socket, framed, parsed, and dispatched to tasks.

Functions of the loop (they take the Supervisor): what a message may be (a request's worth of
frames, agent/wire/replies.py's bounds), what answers it (one answer per request, whatever
happens while serving it), and where a task ID is refused as in use (Supervisor.admit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import zmq

from agent import errors
from agent.wire import jsonrpc, replies, verbs

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

# Plain ints, and the socket's own methods: this is the path of every request, and pyzmq's
# attribute options (sock.rcvmore) cost more than the recv.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_MOST = replies.MAX_ROUTE_FRAMES + 1
ECHO_MAX = 256  # characters of an unknown method's name said back
TURN_BUDGET = 0.05  # seconds of requests served in one turn of the loop


def drain(agent: Supervisor, limit: int, budget: float = TURN_BUDGET) -> None:
    """Read up to `limit` requests, and for at most `budget` seconds (what is left waits for
    the next turn: the loop, its workers and its timers are never starved by one client's
    expensive queries), frame by frame: frames past MAX_ROUTE_FRAMES + 1 are read and
    dropped at once, so one message of many frames never holds more than a request's worth
    of memory (ZMQ_MAXMSGSIZE bounds each frame)."""
    recv, opt = agent.rpc.recv, agent.rpc.getsockopt
    clock = agent.system.monotonic
    until = clock() + budget
    for i in range(limit):
        if clock() > until:
            return
        # The poll found the first. Most turns serve one request: asking whether a second
        # is there costs a third of the zmq.Again a recv on an empty socket raises; a
        # burst is read to its end, and one zmq.Again.
        if i == 1 and not opt(_EVENTS) & _POLLIN:
            return
        try:
            frames = [recv(_NOBLOCK)]
        except zmq.Again:
            return
        extra = 0
        while opt(_RCVMORE):
            frame = recv()
            if len(frames) < _MOST:
                frames.append(frame)
            else:
                extra += len(frame) + 1
        if extra or _long_route(frames):
            agent.dropped_messages += 1  # not a request: no route worth keeping or answering
            agent.ledger.freed(extra + sum(map(len, frames)))
            continue
        agent.guarded("message", on_message, agent, frames)


def _long_route(frames: list[bytes]) -> bool:
    for i in range(len(frames) - 1):
        if len(frames[i]) > replies.MAX_ROUTE_FRAME_BYTES:
            return True
    return False


def on_message(agent: Supervisor, frames: list[bytes]) -> None:
    if len(frames) < 2:
        return
    route = replies.Route(agent.rpc, frames[:-1], agent.ledger)
    try:
        payload = jsonrpc.loads(frames[-1])
    except errors.ParseError as exc:
        route.send(jsonrpc.error_response(None, exc))
        return
    if not isinstance(payload, list):
        dispatch(agent, payload, replies.single(route))
        return
    rpc = agent.config["rpc"]
    limit = rpc["max_batch_length"]
    if not payload or len(payload) > limit:
        why = "an empty batch" if not payload else f"a batch of more than {limit} requests"
        route.send(jsonrpc.error_response(None, errors.InvalidRequest(
            f"{why} is not a valid request", limit=limit)))
        return
    batch = replies.Batch(route, len(payload), rpc["max_message_bytes"])
    for index, obj in enumerate(payload):
        if batch.full:  # no answer would fit: refuse the rest without serving them
            batch.refuse(index, obj)
        else:
            dispatch(agent, obj, batch.member(index))


def dispatch(agent: Supervisor, obj, reply) -> None:
    """Serve one request object. Whatever goes wrong while serving it, it gets exactly one
    answer (-32603 for a bug, logged with its traceback) and the agent goes on."""
    reply = replies.once(reply)
    try:
        _serve(agent, obj, reply)
    except Exception:
        agent.callback_errors += 1
        agent.log.exception("request_crashed")
        request_id = obj.get("id") if isinstance(obj, dict) else None
        reply(jsonrpc.error_response(request_id if jsonrpc.valid_id(request_id) else None,
                                     errors.InternalError("internal error")))


def _serve(agent: Supervisor, obj, reply) -> None:
    try:
        req = jsonrpc.parse_request(obj)
    except jsonrpc.BadRequest as bad:
        reply(jsonrpc.error_response(bad.id, bad.error))
        return
    if req.is_notification:  # never answered; its work (if any) is a task of our naming
        reply(None)
        reply = None
    try:
        if agent.recovering:
            raise errors.RecoveryInProgress("the agent is starting up")
        verb = agent.verbs.get(req.method)
        if verb is None or not agent.serves(verb):
            name = req.method[:ECHO_MAX]  # an answer never grows with what a peer sends
            raise errors.MethodNotFound(f"no method {name!r}", method=name)
        params = verbs.bind(verb, req.params)
        task = agent.admit(req.task_id or agent.notification_id(), verb.name,
                           limited=verb.worker)
    except errors.AgentError as exc:
        if reply is not None:
            reply(jsonrpc.error_response(req.id, exc))
        return
    task.reply, task.request_id = reply, req.id
    agent.run_task(task, verb.handler, params)
