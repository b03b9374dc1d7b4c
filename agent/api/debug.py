"""Debug: verbs for tests and benchmarks, served only with `debug = true`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.supervisor.jobs import WorkerJob
from agent.wire.verbs import Param, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


def _seconds(value):
    if value < 0 or value > 86400:
        raise ValueError("must be between 0 and 86400")
    return value


@verb("Debug.sleep", Param("seconds", "number", check=_seconds),
      Param("fail", "bool", required=False, default=False, doc="end with an error"),
      Param("exit_code", "int", required=False, default=None,
            doc="exit the worker with this code instead of reporting (tests the reaper)"),
      Param("stubborn", "bool", required=False, default=False,
            doc="ignore SIGTERM and abort messages, like a worker stuck in I/O"),
      worker=True, debug_only=True, events=("Task.state", "Task.progress"))
def sleep(agent: Supervisor, params):
    """Sleep in a worker process, reporting progress, then answer (or fail if asked).

    Result: {"slept": seconds}. Errors: 105 OperationFailed when fail is true.
    """
    hook = _PLANTED.pop(id(agent), None)  # Debug.fault "hook"
    return WorkerJob("debug.sleep", params, on_end=hook)


_PLANTED: dict[int, callable] = {}  # agent -> the end hook planted for its next Debug.sleep


@verb("Debug.crash", debug_only=True)
def crash(agent: Supervisor, params):
    """Raise an unexpected exception in the supervisor's handler (tests -32603).

    Errors: -32603 InternalError, without a traceback; the agent logs the traceback.
    """
    raise RuntimeError("a deliberate bug, with a secret in its message: hunter2")


FAULT_PLACES = ("hook", "timer", "listener")


def _place(value: str) -> str:
    if value not in FAULT_PLACES:
        raise ValueError(f"must be one of {', '.join(FAULT_PLACES)}")
    return value


@verb("Debug.fault", Param("where", "str", check=_place,
                           doc="hook: the next Debug.sleep's end hook; timer: a timer due "
                               "now; listener: the next worker report the loop handles"),
      debug_only=True)
def fault(agent: Supervisor, params):
    """Plant one bug in a callback of the supervisor's loop (the test seam for the rule that
    a bug in one callback costs only what it was serving, never the agent).

    hook: the next Debug.sleep task's end hook raises, so that task fails with -32603;
    timer: a timer raises on the loop's next turn; listener: handling the next progress
    report of a worker raises, so that worker is stopped and its task fails (WorkerDied).
    Result: true. The agent logs each with its traceback and counts it
    (Host.getStats agent.callback_errors).
    """
    def boom(*_):
        raise RuntimeError(f"a planted bug in a {params['where']}")

    if params["where"] == "hook":
        _PLANTED[id(agent)] = boom
    elif params["where"] == "timer":
        agent.call_later(0, boom)
    else:
        reports = agent.workers.listener
        real = reports._progress  # applied in the loop's transition phase
        fired = []

        def once(*args):
            # Reports queued in one turn each hold this function: only the first fails.
            if fired:
                return real(*args)
            fired.append(True)
            reports._progress = real
            boom()
        reports._progress = once
    return True
