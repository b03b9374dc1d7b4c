"""Task: read and abort the transient tasks of this agent's life. There is no clean verb."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import errors
from agent.supervisor import states
from agent.wire.verbs import Param, verb

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


def _states(value):
    if not all(isinstance(s, str) and s in states.STATES for s in value):
        raise ValueError(f"each state must be one of {', '.join(states.STATES)}")
    return set(value)


@verb("Task.getStatus", Param("taskID", "taskid", doc="the task's ID (its request's id)"))
def get_status(agent: Supervisor, params):
    """The record of one task: id, method, state, progress, returned, result, error, times.

    Errors: 101 NoSuchTask (never seen in this life of the agent, or no longer retained).
    """
    task = agent.tasks.get(params["taskID"])
    if task is None:
        raise errors.NoSuchTask(f"no task {params['taskID']!r}", taskID=params["taskID"])
    return task.record()


@verb("Task.getAll", Param("states", "list", required=False, check=_states,
                           doc="only tasks in these states"))
def get_all(agent: Supervisor, params):
    """Every task this agent still knows, active first, then ended ones oldest first.

    Result: [record, ...].
    """
    return [t.record() for t in agent.tasks.all(params["states"])]


@verb("Task.abort", Param("taskID", "taskid"), events=("Task.state",))
def abort(agent: Supervisor, params):
    """Abort an active task in two phases, without revert.

    The task turns `aborting` at once (this call answers its record); its worker gets an
    abort message and SIGTERM, SIGKILL after `workers.kill_grace_seconds`; the task turns
    `aborted` once the worker is gone (or `done` if it finished first).
    Errors: 101 NoSuchTask, 102 TaskNotActive.
    """
    task = agent.tasks.get(params["taskID"])
    if task is None:
        raise errors.NoSuchTask(f"no task {params['taskID']!r}", taskID=params["taskID"])
    if not task.active:
        raise errors.TaskNotActive(f"task {task.id!r} is {task.state}", taskID=task.id,
                                   state=task.state)
    agent.abort(task)
    return task.record()
