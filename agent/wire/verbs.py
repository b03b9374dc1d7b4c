"""The verbs' table: each RPC verb's declared params, its handler, and the binding of a
request's params to checked values.

A verb declares its params; the table validates them before a handler sees them, so
handlers take checked values. Unknown names are refused; nothing is looked up with getattr
on input. A handler either returns its result (it runs in the supervisor and must be quick
and touch no storage) or returns a WorkerJob (agent/supervisor/jobs.py), which the
supervisor runs in a worker process. The namespaces that register verbs are agent/api/.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from agent import errors
from agent.ids import check_uuid
from agent.wire.jsonrpc import task_id_of


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # str, int, number, bool, uuid, object, list, taskid
    required: bool = True
    default: Any = None
    doc: str = ""
    check: Callable[[Any], Any] | None = None  # extra validation; raises ValueError


@dataclass
class Verb:
    name: str
    params: tuple[Param, ...]
    handler: Callable
    doc: str
    debug_only: bool = False
    worker: bool = False  # whether it runs in a worker (and so counts as an active task)
    events: tuple[str, ...] = field(default=())


REGISTRY: dict[str, Verb] = {}


def one_of(*allowed: str) -> Callable[[Any], Any]:
    """A Param check: the value is one of `allowed`."""
    def check(value):
        if value not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return value
    return check


def verb(name: str, *params: Param, worker: bool = False, debug_only: bool = False,
         events: tuple[str, ...] = ()):
    def register(fn):
        if name in REGISTRY:
            raise RuntimeError(f"verb {name} registered twice")
        REGISTRY[name] = Verb(name, params, fn, inspect.getdoc(fn) or "", debug_only, worker,
                              events)
        return fn
    return register


def _typed(param: Param, value: Any) -> Any:
    t = param.type
    if t in ("str", "uuid"):
        ok = isinstance(value, str)
    elif t == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "number":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    elif t == "bool":
        ok = isinstance(value, bool)
    elif t == "object":
        ok = isinstance(value, dict)
    elif t == "list":
        ok = isinstance(value, list)
    elif t == "taskid":  # as in a request's id: a string, or an integer taken as its decimal
        try:
            return task_id_of(value)
        except errors.InvalidRequest as exc:
            raise errors.InvalidParams(f"{param.name}: {exc.message}", param=param.name) from None
    else:
        raise AssertionError(t)
    if not ok:
        raise errors.InvalidParams(f"{param.name} must be of type {t}", param=param.name)
    if t == "uuid":
        check = lambda v: check_uuid(v, param.name)  # noqa: E731
    else:
        check = param.check
    if check:
        try:
            return check(value)
        except ValueError as exc:
            raise errors.InvalidParams(f"{param.name}: {exc}", param=param.name) from None
        except errors.InvalidParams as exc:  # a nested check: say which param it was in
            raise errors.InvalidParams(exc.message, param=param.name) from None
    return value


def bind(v: Verb, raw: Any) -> dict:
    """Checked params by name, from an object, an array (declared order) or nothing."""
    if raw is None:
        raw = {}
    if isinstance(raw, list):
        if len(raw) > len(v.params):
            raise errors.InvalidParams(f"{v.name} takes at most {len(v.params)} params")
        raw = {p.name: value for p, value in zip(v.params, raw)}
    known = {p.name for p in v.params}
    extra = sorted(set(raw) - known)
    if extra:
        raise errors.InvalidParams(f"unknown param {extra[0]!r} for {v.name}", param=extra[0])
    out = {}
    for p in v.params:
        if p.name in raw:
            out[p.name] = _typed(p, raw[p.name])
        elif p.required:
            raise errors.InvalidParams(f"missing param {p.name!r}", param=p.name)
        else:
            out[p.name] = p.default
    return out


def describe(v: Verb) -> dict:
    return {
        "name": v.name,
        "params": [{"name": p.name, "type": p.type, "required": p.required, "doc": p.doc}
                   for p in v.params],
        "doc": v.doc.split("\n\n")[0],
        "runs_in": "worker" if v.worker else "supervisor",
    }
