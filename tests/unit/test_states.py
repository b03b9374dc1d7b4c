"""The task states as data: every edge, every end (agent/supervisor/states.py)."""


import pytest

from agent.supervisor import states


def test_every_edge_in_transitions():
    assert len(states.TRANSITIONS) == 10
    for (state, event), new in states.TRANSITIONS.items():
        assert state in states.STATES and new in states.STATES
        assert states.next_state(state, event) == new


def test_ended_states_have_no_outgoing_edge():
    assert states.ENDED | states.ACTIVE == set(states.STATES)
    assert not states.ENDED & states.ACTIVE
    for state in states.ENDED:
        for event in ("start", "succeed", "fail", "abort"):
            with pytest.raises(states.InvalidTransition):
                states.next_state(state, event)


def test_every_active_state_can_end():
    for state in states.ACTIVE:
        seen, todo = set(), [state]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo += [n for (f, _), n in states.TRANSITIONS.items() if f == s and n not in seen]
        assert seen & states.ENDED, state


@pytest.mark.parametrize("state, event", [("running", "start"), ("aborting", "abort"),
                                          ("pending", "explode"), ("nowhere", "start")])
def test_invalid_transition(state, event):
    with pytest.raises(states.InvalidTransition, match=f"{state} --{event}-->"):
        states.next_state(state, event)
