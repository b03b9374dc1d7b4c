"""What a task ends with when its work did not succeed: the one place that decides.

- A task being aborted ends `aborted` with 106 TaskAborted, whatever stopped it (its
  worker's own error, its exit, a failing end hook) kept as `cause`.
- While a task is being aborted, its worker's reported error waits: the abort is over when
  the worker's process is gone, not when it says so (`defers`).
- A worker that stopped when asked (its "stopped" report) ends its task with why it was
  asked: past its deadline, 104 WorkerTimeout; by a SIGTERM from outside the agent, 103
  WorkerDied; by an abort, TaskAborted (above); for breaking the worker protocol, the
  WorkerDied the table recorded.
- A worker gone without a report ends its task with the error its exit makes
  (agent/supervisor/workertable.py: WorkerDied with the signal or exit code, or
  WorkerTimeout), unless something above was recorded first.
"""

from __future__ import annotations

from agent import errors
from agent.supervisor import states


def final(state: str, error: errors.AgentError | None) -> errors.AgentError | None:
    """The error a task in `state` fails with, given what failed it."""
    if state == states.ABORTING:
        return errors.TaskAborted("the task was aborted",
                                  cause=error.to_json() if error else None)
    return error


def defers(state: str) -> bool:
    """Whether a worker's reported error waits for its process to be gone."""
    return state == states.ABORTING


def stopped(kill_reason: str | None) -> errors.AgentError | None:
    """Why a worker that stopped when asked was asked (None: an abort, or already known)."""
    if kill_reason == "timeout":
        return errors.WorkerTimeout("worker silent past its deadline, stopped on SIGTERM",
                                    signal="SIGTERM")
    if kill_reason is None:
        return errors.WorkerDied("the worker stopped on SIGTERM from outside the agent",
                                 signal="SIGTERM")
    return None
