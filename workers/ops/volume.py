"""Volume operations: create, delete, inspect (agent/storage/volumes.py does the work)."""

from __future__ import annotations

import time

from agent import errors
from agent.storage import leases, volumes


def holder(ctx, op: str) -> dict:
    return volumes.holder(ctx.host_id, ctx.task_id, op)


def create(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.create(db, args, holder(ctx, "create"), beat=ctx.beat)


def delete(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.delete(db, args, holder(ctx, "delete"))


def info(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.info(db, args)


def acquire_waiting(ctx, db, volume_id: str, who: dict, seconds: float,
                    interval: float = 1.0):
    """The volume's lease, waiting out a holder for up to `seconds` (heartbeating; an abort
    stops the wait): LeaseHeld if it is still held then."""
    manager = leases.for_domain(db)
    deadline = time.monotonic() + seconds
    while True:
        try:
            return manager.acquire(volume_id, who)
        except errors.LeaseHeld:
            if time.monotonic() >= deadline:
                raise
            ctx.wait(interval)


def fence(ctx, args):
    """Take the volume's lease (waiting out a holder, up to the timeout: a dead host's lease
    frees once sanlock counts it dead), raise its generation, let the lease go."""
    with volumes.open_domain(args) as db:
        volumes.volume_row(db, args)
        lease = acquire_waiting(ctx, db, args["volumeID"], holder(ctx, "fence"),
                                args.get("timeout", 300))
        began = args.get("began")
        with lease:
            generation = db.fence(args["volumeID"], args["generation"])
        return {"volumeID": args["volumeID"], "generation": generation, "fenced": True,
                "waited": round(time.time() - began, 3) if began else None}
