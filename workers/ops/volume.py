"""Volume operations: create, delete, inspect (agent/storage/volumes.py does the work)."""

from __future__ import annotations

from agent.storage import volumes


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


def image_info(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.image_info(db, args)
