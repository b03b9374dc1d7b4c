"""`Client`: a DEALER socket and little else, for code that wants the wire itself.

Many calls can be in flight; `send` returns at once and `recv` matches nothing, so callers
that pipeline match responses by id themselves; `call` is the one-shot form. Tests that
look at the wire use it, `hostagent call`, and the commands that only call (no waits, no
events): it needs neither asyncio nor a thread, and a command that imports no asyncio
starts in about half the time (docs/performance.md).
"""

from __future__ import annotations

import itertools
import json
import uuid

import zmq

from agent.client.protocol import CallError, Timeout


class Client:
    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, timeout: float = 10.0,
                 client_key: str | None = None, server_key: str | None = None):
        """`client_key` (our .key_secret file) and `server_key` (the agent's public .key
        file) make it a CURVE client, for an agent with [security] set."""
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if client_key or server_key:
            from agent.client.curve import make_client
            make_client(self.sock, client_key, server_key)
        self.sock.connect(endpoint)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def send_raw(self, body: bytes, timeout: float | None = None) -> None:
        """Send, or Timeout: a DEALER with no connected peer (agent down, handshake refused)
        would otherwise block for ever."""
        t = self.timeout if timeout is None else timeout
        if not self.sock.poll(int(t * 1000), zmq.POLLOUT):
            raise Timeout(f"cannot send within {t} s: no connection to the agent")
        self.sock.send(body, zmq.NOBLOCK)

    def send(self, method: str, params=None, id=None, notification: bool = False):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if not notification:
            msg["id"] = self.new_id() if id is None else id
        self.send_raw(json.dumps(msg).encode())
        return msg.get("id")

    def recv(self, timeout: float | None = None):
        """The next response object (or batch list); Timeout if none arrives in time."""
        t = self.timeout if timeout is None else timeout
        if not self.sock.poll(int(t * 1000)):
            raise Timeout(f"no response within {t} s")
        return json.loads(self.sock.recv())

    def call(self, method: str, params=None, id=None, timeout: float | None = None):
        """The result, or CallError. Responses to other ids that arrive first are skipped.

        An error answered with id null is the agent refusing a request whose id it could not
        use (too long, say): it is taken as the answer to this one rather than waited past.
        """
        sent = self.send(method, params, id)
        while True:
            resp = self.recv(timeout)
            if not isinstance(resp, dict):
                continue
            if resp.get("id") == sent or (resp.get("id") is None and "error" in resp):
                if "error" in resp:
                    raise CallError(resp["error"])
                return resp["result"]

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
