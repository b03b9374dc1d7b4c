"""Bitmap operations: add, remove, clear and list a volume's persistent dirty bitmaps
(agent/storage/tracking.py and agent/storage/bitmaps.py hold the rules).

Each runs under the volume's lease, on a LEGAL cow volume that no copy, transfer or merge
writes. The image is written first, then the rows, so that a refusal by the image (another
process holds its lock: VolumeInUse) changes nothing, and a crash between the two reads as
a named state, never as an ok bitmap that missed a write:
    add     a bitmap no row names is unknown (never used); the same add again removes it
            and adds it afresh (it tracks from the answer on)
    remove  a row whose bitmap the image lacks is broken (missing); the same remove again
            drops the row
    clear   every bitmap of the image (unknown ones too), then every row: what to do with a
            volume whose bitmaps are broken, before a full backup
"""

from __future__ import annotations

from agent import errors
from agent.storage import chain, leases, tracking, volumes
from workers.ops.volume import holder


def _checked(db, args: dict, beat, need_legal: bool = True) -> dict:
    """The volume's row, if bitmaps may change in it now; its chain's headers read and
    checked as every opener checks them (agent/storage/chain.py) before qemu-img opens it."""
    row = volumes.volume_row(db, args)
    vid = row["volume_id"]
    if row["format"] != "cow":
        raise errors.BitmapsUnsupported("a raw volume has no dirty bitmaps", volumeID=vid,
                                        format=row["format"])
    for busy, reason in ((db.get_marker(vid), "copy-destination"),
                         (db.get_transfer(vid), "transfer"), (db.merge_of(vid), "merge")):
        if busy is not None:
            raise errors.VolumeInUse("the volume is being written", volumeID=vid,
                                     reason=reason)
    if need_legal and row["legality"] != "LEGAL":
        raise errors.VolumeIllegal("the volume is not LEGAL", volumeID=vid)
    chain.inspect(db.layout, db.chain(vid), beat)
    return row


def _opts(db, row: dict) -> tuple[str, str]:
    return tracking.layer_opts(db.layout, row), db.layout.data_path(row)


def add(ctx, args):
    name, vid = args["name"], args["volumeID"]
    with volumes.open_domain(args) as db, \
            leases.for_domain(db).acquire(vid, holder(ctx, "bitmap-add")):
        row = _checked(db, args, ctx.beat)
        added = tracking.start(db, row, name, args.get("granularity") or tracking.GRANULARITY,
                               ctx.beat)
        return _answer(row, db.get_bitmap(vid, name), already=not added)


def _answer(row: dict, rec: dict, already: bool) -> dict:
    return {"volumeID": row["volume_id"], "name": rec["name"],
            "granularity": rec["granularity"], "added": not already, "already": already}


def remove(ctx, args):
    name, vid = args["name"], args["volumeID"]
    with volumes.open_domain(args) as db, \
            leases.for_domain(db).acquire(vid, holder(ctx, "bitmap-remove")):
        row = _checked(db, args, ctx.beat, need_legal=False)
        _head, found = tracking.on_disk(db.layout, row)
        if db.get_bitmap(vid, name) is None and name not in found:
            raise errors.NoSuchBitmap("the volume has no bitmap of that name", volumeID=vid,
                                      bitmap=name)
        if name in found:
            tracking.remove(*_opts(db, row), name, ctx.beat, vid)
        db.drop_bitmaps(vid, [name])
        return {"volumeID": vid, "name": name, "removed": True}


def clear(ctx, args):
    vid = args["volumeID"]
    with volumes.open_domain(args) as db, \
            leases.for_domain(db).acquire(vid, holder(ctx, "bitmap-clear")):
        row = _checked(db, args, ctx.beat, need_legal=False)
        _head, found = tracking.on_disk(db.layout, row)
        names = sorted({r["name"] for r in db.bitmaps_of(vid)} | set(found))
        opts, path = _opts(db, row)
        for name in sorted(found):
            tracking.remove(opts, path, name, ctx.beat, vid)
        db.drop_bitmaps(vid)
        return {"volumeID": vid, "removed": names}


def list_(ctx, args):
    with volumes.open_domain(args) as db:
        row = volumes.volume_row(db, args)
        if row["format"] != "cow":
            return {"volumeID": row["volume_id"], "bitmaps": []}
        chain.inspect(db.layout, db.chain(row["volume_id"]), ctx.beat)
        return {"volumeID": row["volume_id"], "bitmaps": tracking.states(db, row)}
