"""Clients of the agent, for engines, scripts, the CLI and the tests.

- `AsyncClient` (aio.py): asyncio; many calls in flight on one socket, `subscribe` (events
  flagged on gaps and restarts), `wait_task` (events, with polling and storage as the
  fallback: the recommended way to track work, see wait.py), `copy_image`, `continue_copy`.
- `BlockingClient` (blocking.py): the same API for blocking code, over the AsyncClient.
- `Client` (blocking.py): a blocking DEALER socket with send/recv/call, for code that wants
  the wire itself (the tests, `hostagent call`).

Errors (protocol.py): CallError (code, message, data, name), Timeout, TaskFailed,
NeedsContinuing, TaskLost.
"""

from agent.client.aio import AsyncClient
from agent.client.blocking import BlockingClient, BlockingSubscription, Client
from agent.client.protocol import (
                                   CallError,
                                   NeedsContinuing,
                                   TaskFailed,
                                   TaskLost,
                                   Timeout,
                                   endpoints_of,
                                   guess_events_endpoint,
)
from agent.client.subscription import Event, SeqTracker, Subscription
from agent.client.wait import Outcome, Progress

__all__ = ["AsyncClient", "BlockingClient", "BlockingSubscription", "Client", "CallError",
           "Timeout", "TaskFailed", "NeedsContinuing", "TaskLost", "Event", "SeqTracker",
           "Subscription", "Outcome", "Progress", "endpoints_of", "guess_events_endpoint"]
