"""Task states and their transitions, as plain data (stdlib only).

The loop (loop.py) is the only place that performs what a transition implies
(spawn, kill, respond, publish); this module only says which edges exist.
"""

PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
ABORTING = "aborting"
ABORTED = "aborted"

STATES = (PENDING, RUNNING, DONE, FAILED, ABORTING, ABORTED)
ACTIVE = frozenset({PENDING, RUNNING, ABORTING})
ENDED = frozenset({DONE, FAILED, ABORTED})

# (state, event) -> new state. Every edge the agent can take, and no other.
TRANSITIONS = {
    (PENDING, "start"): RUNNING,  # PENDING -> RUNNING: the worker said hello / the handler runs
    (PENDING, "succeed"): DONE,  # PENDING -> DONE: a worker that finished before its hello was read
    (PENDING, "fail"): FAILED,  # PENDING -> FAILED: the worker could not be spawned or died at once
    (PENDING, "abort"): ABORTING,  # PENDING -> ABORTING: killed as soon as its pid is known
    (RUNNING, "succeed"): DONE,
    (RUNNING, "fail"): FAILED,
    (RUNNING, "abort"): ABORTING,  # RUNNING -> ABORTING: SIGTERM sent, SIGKILL after a grace
    (ABORTING, "start"): ABORTING,  # a hello that raced the abort changes nothing
    (ABORTING, "succeed"): DONE,  # the work finished before the abort landed: say so, not "aborted"
    (ABORTING, "fail"): ABORTED,  # ABORTING -> ABORTED: the worker is gone, however it went
}


class InvalidTransition(Exception):
    pass


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{state} --{event}-->") from None
