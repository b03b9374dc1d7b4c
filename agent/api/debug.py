"""Debug: verbs for tests and benchmarks, served only with `debug = true`."""

from __future__ import annotations

from agent.api import Param, WorkerJob, verb


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
def sleep(agent, params):
    """Sleep in a worker process, reporting progress, then answer (or fail if asked).

    Result: {"slept": seconds}. Errors: 105 OperationFailed when fail is true.
    """
    return WorkerJob("debug.sleep", params)


@verb("Debug.crash", debug_only=True)
def crash(agent, params):
    """Raise an unexpected exception in the supervisor's handler (tests -32603).

    Errors: -32603 InternalError, without a traceback; the agent logs the traceback.
    """
    raise RuntimeError("a deliberate bug, with a secret in its message: hunter2")
