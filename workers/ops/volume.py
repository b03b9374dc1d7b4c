"""Volume operations: create, delete, inspect, fence, extend and measure
(agent/storage/volumes.py and agent/storage/sizing.py do the work)."""

from __future__ import annotations

import time

from agent import errors
from agent.storage import chain, leases, sizing, volumes


def holder(ctx, op: str) -> dict:
    return volumes.holder(ctx.host_id, ctx.task_id, op)


def create(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.create(db, args, holder(ctx, "create"), beat=ctx.beat)


def delete(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.delete(db, args, holder(ctx, "delete"), ctx.beat)


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


def extend(ctx, args):
    """Grow a volume with no children: its data file first, then its row (size, generation
    + 1), under its lease. The same size again is answered with nothing done (a retry)."""
    with volumes.open_domain(args) as db, \
            leases.for_domain(db).acquire(args["volumeID"], holder(ctx, "extend")):
        row = volumes.volume_row(db, args)
        size = args["size"]
        unchanged = {"volumeID": row["volume_id"], "size": row["size"],
                     "generation": row["generation"], "extended": False}
        if size == row["size"] and row["legality"] == "LEGAL" \
                and not sizing.grown_unrecorded(db.layout, row):
            return unchanged  # a retry; unless a crash left the header to mend
        _extendable(db, row, size)
        if args.get("generation") is not None and args["generation"] != row["generation"]:
            raise errors.GenerationMismatch("the volume's generation changed",
                                            volumeID=row["volume_id"],
                                            expected=args["generation"],
                                            generation=row["generation"])
        _inspected(db, row, ctx.beat)
        sizing.grow(db.layout, row, size, args.get("preallocation"), beat=ctx.beat)
        if not db.extend_volume(row["volume_id"], row["generation"], size):
            raise errors.GenerationMismatch("the volume changed during the extend",
                                            volumeID=row["volume_id"])
        return {"volumeID": row["volume_id"], "size": size,
                "generation": row["generation"] + 1, "extended": True}


def _inspected(db, row: dict, beat) -> None:
    """The chain's headers checked as every opener checks them, with one allowance: a leaf
    whose header says more than its row is a grow a crash cut short (sizing.grow mends it)."""
    try:
        chain.inspect(db.layout, db.chain(row["volume_id"]), beat)
    except errors.ImageInvalid as exc:
        if not (exc.data.get("reason") == "size" and exc.data.get("volumeID") ==
                row["volume_id"] and (exc.data.get("found") or 0) > row["size"]):
            raise


def _extendable(db, row: dict, size: int) -> None:
    vid = row["volume_id"]
    children = db.children(vid)
    if children:
        raise errors.VolumeHasChildren("only a volume with no snapshots on it grows (its "
                                       "children's size would not follow)", volumeID=vid,
                                       children=children)
    for busy, reason in ((db.get_marker(vid), "copy-destination"),
                         (db.get_transfer(vid), "transfer"), (db.merge_of(vid), "merge")):
        if busy is not None:
            raise errors.VolumeInUse("the volume is being written", volumeID=vid,
                                     reason=reason)
    if row["legality"] != "LEGAL":
        raise errors.VolumeIllegal("the volume is not LEGAL", volumeID=vid)
    if size < row["size"]:
        raise errors.ShrinkRefused("a volume never shrinks", volumeID=vid, size=row["size"],
                                   requested=size)
    if row["format"] == "cow" and size % chain.SECTOR:
        raise errors.InvalidParams(f"a cow volume's size is a multiple of {chain.SECTOR} "
                                   "bytes", param="size")


def measure(ctx, args):
    """What a copy of the volume's guest view (its whole chain) needs in a format."""
    with volumes.open_domain(args) as db:
        row = volumes.volume_row(db, args)
        rows = db.chain(row["volume_id"])
        chain.require_legal(rows)
        fmt = args.get("format") or row["format"]
        return {"volumeID": row["volume_id"], "format": fmt, "size": row["size"],
                **sizing.measure(db.layout, rows, fmt, ctx.beat)}
