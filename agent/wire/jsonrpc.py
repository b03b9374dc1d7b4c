"""JSON-RPC 2.0 framing: decoding a message, checking a request object, building responses.

Pure functions, no sockets. The rules are the specification's, to the letter: a parse error
answers -32700 with id null; an invalid request answers -32600; NaN and Infinity are not
JSON and are a parse error; nesting too deep for the parser is a parse error, never a crash.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from orjson import JSONDecodeError as _OrjsonError
from orjson import dumps as _orjson_dumps
from orjson import loads as _orjson_loads

from agent import errors

MAX_ID_LENGTH = 128  # of a request's id, which names its task

NO_ID = object()  # a notification: the request had no "id" member


class HugeInt(str):
    """An integer literal too long for int(): kept as text so that validation refuses it
    with a proper error instead of the parser failing on valid JSON."""


def _parse_int(text: str):
    return int(text) if len(text) <= 1000 else HugeInt(text)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads/json.dumps with any non-default option build a new codec per call,
# which was a tenth of the cost of a Host.ping round trip.
_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=_reject_constant)
# allow_nan=False: a result must never carry something a strict client cannot parse.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


# A run of digits orjson may not read as the standard library does: it makes an integer
# beyond 64 bits a float, where the standard library keeps it (or HugeInt, refused by name).
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def loads(body: bytes) -> Any:
    """One message's JSON. orjson reads what it can (a tenth of a Host.ping's serving went
    to the standard library's decoder); whatever it refuses or may read differently (a long
    number, NaN, a lone surrogate, a byte order mark, deep nesting) goes to the standard
    library, whose answer or error is the one given: the result is the same either way."""
    if not _LONG_NUMBER.search(body):
        try:
            return _orjson_loads(body)
        except _OrjsonError:
            pass
    try:
        text = body.decode("utf-8")
        return _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.ParseError("Parse error", reason=str(exc)[:200]) from None


def dumps(obj: Any) -> bytes:
    """Compact JSON. orjson (Rust): a fifth of the RPC path's cost was the standard library's
    encoder (docs/performance.md). A float JSON cannot carry (NaN, Infinity) goes out as
    null, as in an event. What orjson refuses (an integer beyond 64 bits, a key that is not
    a string) is encoded by the standard library, which may refuse it too (ValueError,
    TypeError: the callers' to handle)."""
    try:
        return _orjson_dumps(obj)
    except TypeError:
        return _ENCODER.encode(_nulled(obj)).encode()


def _nulled(obj):
    """`obj` with NaN and Infinity as None, as orjson writes them (the rest untouched)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nulled(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nulled(v) for v in obj]
    return obj


@dataclass(slots=True)
class Request:
    id: Any  # the id exactly as sent (NO_ID for a notification)
    task_id: str | None  # the task ID it names: the id as a string
    method: str
    params: Any  # dict, list or None

    @property
    def is_notification(self) -> bool:
        return self.id is NO_ID


class BadRequest(Exception):
    """An invalid request object, with the id to answer with (null unless it was valid)."""

    def __init__(self, error: errors.AgentError, id: Any = None):
        self.error = error
        self.id = id


def task_id_of(value: Any) -> str:
    """The task ID an id names; an id that cannot name a task raises InvalidRequest."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or isinstance(value, HugeInt):
        raise errors.InvalidRequest("id must be a string or an integer")
    text = value if isinstance(value, str) else str(value)
    if not 1 <= len(text) <= MAX_ID_LENGTH:
        raise errors.InvalidRequest(f"id must be 1 to {MAX_ID_LENGTH} characters")
    return text


def valid_id(value: Any) -> bool:
    """Whether `value` may be echoed as a response's id (else the answer carries null)."""
    try:
        task_id_of(value)
        return True
    except errors.InvalidRequest:
        return False


def parse_request(obj: Any) -> Request:
    if not isinstance(obj, dict):
        raise BadRequest(errors.InvalidRequest("a request must be an object"))
    id_ = obj.get("id", NO_ID)
    task_id = None
    if id_ is not NO_ID:
        try:
            task_id = task_id_of(id_)
        except errors.InvalidRequest as exc:
            raise BadRequest(exc) from None
    answer_id = None if id_ is NO_ID else id_
    if obj.get("jsonrpc") != "2.0":
        raise BadRequest(errors.InvalidRequest('"jsonrpc" must be "2.0"'), answer_id)
    method = obj.get("method")
    if not isinstance(method, str):
        raise BadRequest(errors.InvalidRequest('"method" must be a string'), answer_id)
    params = obj.get("params")
    if "params" in obj and not isinstance(params, (dict, list)):
        raise BadRequest(errors.InvalidRequest('"params" must be an object or an array'), answer_id)
    return Request(id_, task_id, method, params)


def result_response(id_: Any, result: Any) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "result": result}


def error_response(id_: Any, error: errors.AgentError) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "error": error.to_json()}
