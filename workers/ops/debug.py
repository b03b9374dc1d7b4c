"""Debug operations: exercise the worker machinery without storage."""

from __future__ import annotations

import os
import signal
import time

from agent import errors


def sleep(ctx, args: dict) -> dict:
    if args.get("exit_code") is not None:
        os._exit(args["exit_code"])  # die without reporting: the supervisor must notice
    seconds = float(args["seconds"])
    if args.get("stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctx.beat()  # alive, but deaf to stop requests
            time.sleep(0.05)
        return {"slept": seconds}
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        ctx.progress(100.0 * elapsed / seconds)
        ctx.wait(min(0.05, seconds - elapsed))
    ctx.progress(100.0)
    if args.get("fail"):
        raise errors.OperationFailed("failed as asked", asked=True)
    return {"slept": seconds}
