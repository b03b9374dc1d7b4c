"""What both clients share: the errors a caller catches, and where an agent's sockets are.

Every failure a client raises is one of these, never a bare zmq or asyncio exception:

- `CallError`: the agent answered with an error object (`.code`, `.message`, `.data`, and
  `.name`, which is `data.name`: switch on that stable word);
- `Timeout`: no answer in time, or the request could not even be sent (no agent there, or a
  CURVE handshake it refused);
- `TaskFailed` (a CallError): a task we waited for ended failed or aborted;
- `NeedsContinuing`: a copy stopped and nobody is copying it any more;
- `TaskLost`: the agent forgot the task (it restarted) and there is no storage to follow.
"""

from __future__ import annotations

import json
import os
import re

# JSON-RPC ids name tasks; the agent refuses longer ones (its own copy: agent/wire/jsonrpc.py,
# held equal by tests/test_architecture.py).
MAX_ID_LENGTH = 128


class Timeout(Exception):
    """No answer in time (or the request could not be sent: no connected agent)."""


class CallError(Exception):
    """An error response: code, message and data (data["name"] is the agent's error name)."""

    def __init__(self, error: dict):
        data = error.get("data") or {}
        super().__init__(f"{error.get('code')} {data.get('name', '')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")
        self.data = data
        self.name = data.get("name")
        self.error = error

    @classmethod
    def local(cls, code: int, name: str, message: str, **data) -> "CallError":
        """The error the agent would answer, raised without asking it."""
        return cls({"code": code, "message": message, "data": {**data, "name": name}})


class TaskFailed(CallError):
    """A task we waited for ended failed or aborted: its error, and the whole outcome."""

    def __init__(self, outcome):
        super().__init__(outcome.error or {"code": None, "message": outcome.state,
                                           "data": {"name": None}})
        self.outcome = outcome


class NeedsContinuing(Exception):
    """A copy's destination is ILLEGAL with a marker and nobody is copying it: it was
    abandoned (too many failures, or the recovery policy), or left (policy manual, a foreign
    host's marker, the source not attached). Continue it with `continue_copy(dst)`, or delete
    it with Volume.delete."""

    def __init__(self, outcome):
        copy = (outcome.image or {}).get("copy") or {}
        super().__init__(
            f"the copy into {outcome.dst and outcome.dst.get('volumeID')} stopped at "
            f"{copy.get('copied')} of {copy.get('total')} bytes ({copy.get('state')}) and "
            f"nobody is copying it: continue it (continue_copy, `hostagent continue`) or "
            f"delete it")
        self.outcome = outcome


class TaskLost(Exception):
    """The agent no longer knows the task (it restarted, or the record was pruned) and there
    is nothing on storage to follow it by."""

    def __init__(self, outcome):
        super().__init__(f"task {outcome.task_id!r} is unknown to the agent (it restarted?); "
                         f"look at what it was doing to know whether it happened")
        self.outcome = outcome


def check_task_id(task_id) -> None:
    """Refuse, as the agent would (-32600), an id that cannot name a task."""
    ok = (isinstance(task_id, (str, int)) and not isinstance(task_id, bool)
          and 1 <= len(str(task_id)) <= MAX_ID_LENGTH)
    if not ok:
        raise CallError.local(-32600, "InvalidRequest",
                              f"id must be a string or an integer of 1 to {MAX_ID_LENGTH} "
                              f"characters")


def request(method: str, params=None, id=None) -> bytes:
    msg = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if id is not None:
        msg["id"] = id
    return json.dumps(msg).encode()


def endpoints_of(run_dir) -> dict:
    """The endpoints a running agent bound (wildcard ports resolved), from its run dir."""
    with open(os.path.join(run_dir, "endpoints.json")) as f:
        return json.load(f)


def guess_events_endpoint(rpc_endpoint: str) -> str:
    """The events endpoint that goes with an RPC endpoint in the default layout: the port
    after the RPC port (5670 -> 5671), or events.sock beside rpc.sock. A guess: pass the real
    one when an agent is configured otherwise (a wrong guess only costs events; waiting
    falls back to polling)."""
    m = re.fullmatch(r"(tcp://.*):(\d+)", rpc_endpoint)
    if m:
        return f"{m.group(1)}:{int(m.group(2)) + 1}"
    if rpc_endpoint.startswith("ipc://"):
        head, _, _tail = rpc_endpoint.rpartition("/")
        return f"{head}/events.sock"
    return rpc_endpoint
