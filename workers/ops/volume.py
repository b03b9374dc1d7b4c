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


def fence(ctx, args):
    """Take the volume's lease (waiting out a holder, up to the timeout: a dead host's lease
    frees once sanlock counts it dead), raise its generation, let the lease go."""
    with volumes.open_domain(args) as db:
        volumes.volume_row(db, args)
        manager = leases.for_domain(db)
        deadline = time.monotonic() + args.get("timeout", 300)
        while True:
            try:
                lease = manager.acquire(args["volumeID"], holder(ctx, "fence"))
                break
            except errors.LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                ctx.wait(1.0)
        began = args.get("began")
        with lease:
            generation = db.fence(args["volumeID"], args["generation"])
        return {"volumeID": args["volumeID"], "generation": generation, "fenced": True,
                "waited": round(time.time() - began, 3) if began else None}
