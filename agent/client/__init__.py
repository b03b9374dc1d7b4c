"""Clients of the agent, for engines, scripts, the CLI and the tests.

- `AsyncClient` (aio.py): asyncio; many calls in flight on one socket, `subscribe` (events
  flagged on gaps and restarts), `wait_task` (events, with polling and storage as the
  fallback: the recommended way to track work, see wait.py), `copy_image`, `continue_copy`.
- `BlockingClient` (blocking.py): the same API for blocking code, over the AsyncClient.
- `Client` (dealer.py): a blocking DEALER socket with send/recv/call, for code that wants
  the wire itself (the tests, `hostagent call`).

Errors (protocol.py): CallError (code, message, data, name), Timeout, TaskFailed,
NeedsContinuing, TaskLost.
"""

from agent.client.protocol import (
                                   CallError,
                                   NeedsContinuing,
                                   TaskFailed,
                                   TaskLost,
                                   Timeout,
                                   endpoints_of,
                                   guess_events_endpoint,
)

__all__ = ["AsyncClient", "BlockingClient", "BlockingSubscription", "Client", "CallError",
           "Timeout", "TaskFailed", "NeedsContinuing", "TaskLost", "Event", "SeqTracker",
           "Subscription", "Outcome", "Progress", "endpoints_of", "guess_events_endpoint"]


def __getattr__(name: str):
    """The clients, imported when first named: asyncio (what AsyncClient and BlockingClient
    run on) is a third of a command's start, which one that only calls (Client) or needs
    only an error class does not pay (docs/performance.md)."""
    if name == "AsyncClient":
        from agent.client import aio as module
    elif name in ("BlockingClient", "BlockingSubscription"):
        from agent.client import blocking as module
    elif name == "Client":
        from agent.client import dealer as module
    elif name in ("Event", "SeqTracker", "Subscription"):
        from agent.client import subscription as module
    elif name in ("Outcome", "Progress"):
        from agent.client import wait as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)
    return value
