"""The ledger of large replies (agent/wire/replies.py): how long it waits for libzmq's word
that a client's oldest reply is written before refusing that client another one. Real
libzmq trackers say so from pyzmq's own thread; here a tracker that never does records what
it was asked, and the clock is the test's."""

import pytest
import zmq

from agent.wire import replies

MiB = 1 << 20


class Unwritten:
    """A tracker whose reply is never written: it records each wait it is asked for."""

    def __init__(self, asked: list):
        self.asked = asked
        self.done = False

    def wait(self, timeout):
        self.asked.append(timeout)
        raise zmq.NotDone


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(replies.time, "monotonic", lambda: now[0])
    return now


def test_a_readers_one_reply_is_waited_for_longer_but_not_for_everyone_at_once(clock):
    ledger, asked = replies.Ledger(per_peer=4 * MiB), []
    for hog in (b"h1", b"h2", b"h3", b"h4"):  # the all-clients bound (16 MiB) is full
        ledger.add(hog, Unwritten(asked), 4 * MiB)
    ledger.add(b"reader", Unwritten(asked), MiB)  # its last answer, read, word not yet in
    assert not ledger.admits(b"reader", MiB)
    assert asked == [replies.READER_LATE_NEWS_SECONDS]
    ledger.add(b"another", Unwritten(asked), MiB)
    assert not ledger.admits(b"another", MiB)  # a crowd of them: one long wait at a time
    assert asked[-1] == replies.LATE_NEWS_SECONDS
    ledger.add(b"piped", Unwritten(asked), MiB)
    ledger.add(b"piped", Unwritten(asked), MiB)
    clock[0] += replies.LONG_WAITS_APART
    assert not ledger.admits(b"piped", MiB)  # two unwritten: not a reader's pattern
    assert asked[-1] == replies.LATE_NEWS_SECONDS
    assert not ledger.admits(b"reader", MiB)  # once per reply: no second wait for it
    assert len(asked) == 3 and ledger.refused == 4
    assert ledger.admits(b"newcomer", 8 * MiB)  # a client with nothing unread is served
