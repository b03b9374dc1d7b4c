"""Exports: one volume served by qemu-nbd to clients (uploads, downloads, ovirt-imageio),
for as long as the task lives; and the finish of a transfer written through one.

mode read: the guest view of the volume's whole chain; layer: what the volume itself holds
(its backing not opened; qemu:allocation-depth says which ranges are its own); write: a
transfer into the volume. Every mode opens the chain as the metadata says it is, after
chain.inspect (headers read by the agent before qemu opens the file; formats given).

A write export holds the volume's lease for its whole life and makes the volume ILLEGAL
with a transfer row before it answers (agent/storage/transfers.py): what a client writes is
never trusted until `finish` has checked it as an uploaded image is checked (headers, size,
chain confinement, `qemu-img check`, the client's expected checksum) and made the volume
LEGAL with generation + 1 and its checksum. Killing the worker kills qemu-nbd (its
parent-death signal); the transfer then stays ILLEGAL, readable from any host, to be
exported again (the client resumes) or deleted.
"""

from __future__ import annotations

import contextlib
import time

from agent import errors
from agent.system import fsync_path
from agent.storage import chain, checksum, leases, qemu_img, qemu_nbd, volumes
from agent.storage.copy import nbd
from agent.storage.volumes import FORMATS, open_domain, volume_row
from workers.ops import backup
from workers.ops.volume import acquire_waiting, holder
from workers.protocol import Stopped

TOUCH_SECONDS = 2.0  # how often a write export records what its volume holds
POLL_SECONDS = 0.25
MAX_BLOCKS = 4096  # block digests in one Image.checksum answer (16 GiB of 4 MiB blocks)


def start(ctx, args):
    """Serve the volume until stopped (Export.stop: done), aborted (Task.abort), or idle
    (no client connected for the inactivity timeout: done)."""
    with open_domain(args) as db:
        if args["mode"] == "write":
            with leases.for_domain(db).acquire(args["volumeID"], holder(ctx, "export")):
                return _serve_transfer(ctx, db, args)
        row = volume_row(db, args)
        if row["legality"] != "LEGAL":
            raise errors.VolumeIllegal("the volume is not LEGAL (a copy or a transfer into it "
                                       "has not finished)", volumeID=args["volumeID"])
        rows = db.chain(args["volumeID"])
        chain.require_legal(rows)
        layer = args["mode"] == "layer"
        chain.inspect(db.layout, rows, ctx.beat, structure=True)
        if args.get("bitmap") or args.get("checkpoint"):
            with backup.prepared(ctx, db, args, rows) as opts:
                return _serve(ctx, db, args, row, opts, writable=False,
                              bitmap=args.get("bitmap"))
        opts = chain.image_opts(db.layout, rows, direct=False, layer_only=layer)
        return _serve(ctx, db, args, row, opts, writable=False, depth=layer)


def _serve_transfer(ctx, db, args):
    """Under the volume's lease: the volume made (or taken over) as a transfer, served."""
    create, vid = args.get("create"), args["volumeID"]
    row = db.get_volume(vid)
    made = row is None and create is not None
    if made:  # data file first, then the row (volumes.py)
        db.layout.ensure_image_dir(args["imageID"])
        volumes.remove_leftovers(db, args["imageID"], vid, ctx.beat)
        path = db.layout.volume_path(args["imageID"], vid, create["format"])
        FORMATS[create["format"]].create(path, create["size"], beat=ctx.beat)
        try:
            transfer = db.begin_transfer(args["imageID"], vid, host_id=ctx.host_id,
                                         task_id=ctx.task_id, tag=args.get("tag"),
                                         create=create)
        except errors.AgentError:
            FORMATS[create["format"]].remove(path, ctx.beat)
            raise
    else:
        if row is not None:  # its headers before anything of it is recorded or opened
            chain.inspect(db.layout, db.chain(vid), ctx.beat)
        transfer = db.begin_transfer(args["imageID"], vid, host_id=ctx.host_id,
                                     task_id=ctx.task_id, tag=args.get("tag"), create=create)
    row = db.get_volume(vid)
    rows = db.chain(vid)
    try:
        if not made and row["format"] == "cow":  # what an earlier writer left
            _reclaim_leaks(ctx, db, rows, args)
    except errors.AgentError:  # not served: the transfer is stopped, not interrupted
        db.touch_transfer(vid, transfer["generation"],
                          volumes.allocated(db.layout.data_path(row)), "stopped")
        raise
    # O_DIRECT as copies write, unless the size is not one of the storage's blocks (qemu
    # then cannot write the last one: an upload of a file of any size must work).
    direct = qemu_img.direct_io(db.layout.data_path(row)) and row["size"] % 4096 == 0
    opts = chain.image_opts(db.layout, rows, direct=direct)
    return _serve(ctx, db, args, row, opts, writable=True, transfer=transfer)


def _reclaim_leaks(ctx, db, rows: list[dict], args: dict) -> None:
    """A qcow2 an earlier writer left, checked before qemu-nbd opens it for writing
    (chain.reclaim_leaks); a wait for its killed qemu-nbd's lock said once as Export.state
    "waiting"."""
    chain.reclaim_leaks(db.layout, rows[-1], ctx.beat, ctx.wait, on_wait=lambda: ctx.event(
        "Export.state", {**{k: args[k] for k in ("domainID", "imageID", "volumeID", "mode")},
                         "state": "waiting", "reason": "image-locked"}))


def _serve(ctx, db, args, row, opts, *, writable: bool, depth: bool = False,
           transfer: dict | None = None, bitmap: str | None = None):
    cfg = ctx.settings.get("exports", {})
    timeout = args.get("timeout") or cfg.get("inactivity_seconds", 300.0)
    server = qemu_nbd.Server(opts, writable=writable, depth=depth, group=cfg.get("group", ""),
                             max_connections=cfg.get("max_connections", 8), bitmap=bitmap)
    base = {"domainID": args["domainID"], "imageID": args["imageID"],
            "volumeID": args["volumeID"], "mode": args["mode"]}
    marks = {k: args[k] for k in ("bitmap", "checkpoint") if args.get(k)}
    gen = transfer["generation"] if transfer else row["generation"]
    server.start()
    try:
        ctx.returned({**base, **server.urls(), "size": row["size"], "format": "raw",
                      "volume_format": row["format"], "generation": gen,
                      "inactivity_timeout": timeout, "max_connections": server.max_connections,
                      **marks})
        ctx.event("Export.state", {**base, "state": "serving", "generation": gen})
        ended = _until_ended(ctx, db, server, row, transfer, timeout)
    finally:
        code = server.stop(beat=ctx.beat)
    path = db.layout.data_path(row)
    if writable:  # qemu-nbd flushed as it exited; make it durable whatever it did
        fsync_path(path)
        if not db.touch_transfer(row["volume_id"], gen, volumes.allocated(path), "stopped"):
            raise errors.GenerationMismatch("the transfer was fenced off",
                                            volumeID=row["volume_id"], generation=gen)
    if ended == "abort":
        raise Stopped()
    result = {**base, "ended": ended, "generation": gen, "qemu_nbd_exit": code}
    if writable:
        result["written"] = volumes.allocated(path)
    ctx.event("Export.state", {**base, "state": "ended", "ended": ended, "generation": gen})
    return result


def _until_ended(ctx, db, server, row, transfer, timeout: float) -> str:
    """Wait, heartbeating, for a stop, an abort or the inactivity timeout; a qemu-nbd that
    died, or a transfer fenced off (Volume.fence), fails the task."""
    last_client = touched = time.monotonic()
    path = db.layout.data_path(row)
    while True:
        if ctx.stop_requested():
            return ctx.stop_reason
        if not server.alive():
            raise errors.OperationFailed("qemu-nbd ended by itself", reason="server-died",
                                         qemu_nbd=qemu_img.redact(server.log()))
        now = time.monotonic()
        if server.connections():
            last_client = now
        elif now - last_client >= timeout:
            return "inactive"
        if transfer is not None and now - touched >= TOUCH_SECONDS:
            touched = now
            if not db.touch_transfer(row["volume_id"], transfer["generation"],
                                     volumes.allocated(path)):
                raise errors.GenerationMismatch("the transfer was fenced off",
                                                volumeID=row["volume_id"],
                                                generation=transfer["generation"])
        ctx.pause(POLL_SECONDS)


def finish(ctx, args):
    """Check what a transfer wrote and make the volume LEGAL (Export.finish)."""
    vid = args["volumeID"]
    # The lease, once an export that was just asked to stop lets it go.
    with open_domain(args) as db, acquire_waiting(ctx, db, vid, holder(ctx, "finish"),
                                                  args.get("wait", 30.0), interval=0.1):
        row = volume_row(db, args)
        transfer = db.get_transfer(vid)
        expected = args.get("checksum")
        if transfer is None:
            return _finished_before(row, expected)
        rows = db.chain(vid)
        path = db.layout.data_path(row)
        fsync_path(path)
        chain.inspect(db.layout, rows, ctx.beat, structure=True)  # as an upload is checked
        kind = expected.split(":", 1)[0] if expected else checksum.BLOCKS
        sums = _guest_checksums(ctx, db, rows, sorted({checksum.BLOCKS, kind}))
        if expected and sums[kind] != expected:
            raise errors.TransferConflict("what was written is not what the client sent "
                                          "(checksums differ): the volume stays ILLEGAL",
                                          volumeID=vid, reason="checksum", expected=expected,
                                          found=sums[kind])
        if not db.finish_transfer(vid, transfer["generation"], sums[checksum.BLOCKS]):
            raise errors.GenerationMismatch("the transfer changed hands",
                                            volumeID=vid, generation=transfer["generation"])
    ctx.event("Export.state", {"domainID": args["domainID"], "imageID": args["imageID"],
                               "volumeID": vid, "state": "finished",
                               "generation": transfer["generation"] + 1})
    return {"volumeID": vid, "legality": "LEGAL", "generation": transfer["generation"] + 1,
            "checksum": sums[checksum.BLOCKS], "size": row["size"], "format": row["format"],
            "already": False}


def _finished_before(row: dict, expected: str | None) -> dict:
    """A finish asked again (its answer lost, a client resuming): the same answer, if the
    volume is LEGAL and, when the client says what it sent, its recorded checksum is that
    (a volume the agent cannot vouch for is never said to hold a client's upload)."""
    if row["legality"] != "LEGAL":
        raise errors.TransferConflict("the volume has no transfer in progress",
                                      volumeID=row["volume_id"], reason="no-transfer",
                                      legality=row["legality"])
    if expected and row["checksum"] != expected:
        raise errors.TransferConflict("the volume has no transfer in progress, and its "
                                      "recorded checksum is not the one given",
                                      volumeID=row["volume_id"], reason="checksum",
                                      expected=expected, found=row["checksum"])
    return {"volumeID": row["volume_id"], "legality": "LEGAL",
            "generation": row["generation"], "checksum": row["checksum"], "size": row["size"],
            "format": row["format"], "already": True}


def _guest_checksums(ctx, db, rows: list[dict], kinds: list[str]) -> dict:
    """{kind: "kind:hex"} of the guest view of rows[-1], in one read through qemu-nbd."""
    size = rows[-1]["size"]
    hashers = {k: checksum.StreamHasher(size, k) for k in kinds}
    opts = chain.image_opts(db.layout, rows, direct=False)
    with qemu_nbd.export(opts) as exp:
        nbd.hash_prefix(exp, size, checksum.Tee(*hashers.values()), ctx.check,
                        on_chunk=lambda at, n: ctx.progress(100.0 * at / size if size else 100))
    return {k: h.hexdigest() for k, h in hashers.items()}


def image_checksum(ctx, args):
    """Image.checksum: the guest view's checksum, or each 4 MiB block's digest in a range,
    read by a private read-only qemu-nbd (zero and unallocated ranges never read). A
    volume under transfer is read under its lease (no export of it may be live)."""
    kind = args.get("algorithm") or checksum.BLOCKS
    with open_domain(args) as db:
        row = volume_row(db, args)
        transfer = db.get_transfer(args["volumeID"])
        if row["legality"] != "LEGAL" and transfer is None:
            raise errors.VolumeIllegal("the volume has a copy in progress",
                                       volumeID=args["volumeID"])
        held = leases.for_domain(db).acquire(args["volumeID"], holder(ctx, "checksum")) \
            if transfer is not None else contextlib.nullcontext()
        with held:
            rows = db.chain(args["volumeID"])
            chain.require_legal(rows[:-1] if transfer is not None else rows)
            chain.inspect(db.layout, rows, ctx.beat)
            return _sums(ctx, db, rows, kind, args.get("blocks"), args.get("layer", False))


def _sums(ctx, db, rows, kind: str, blocks: dict | None, layer: bool) -> dict:
    size = rows[-1]["size"]
    start, end = 0, size
    if blocks is not None:
        start = blocks["offset"]
        if start % checksum.BLOCK:
            raise errors.InvalidParams(f"blocks.offset must be a multiple of {checksum.BLOCK}",
                                       param="blocks")
        end = min(size, start + min(blocks["length"], MAX_BLOCKS * checksum.BLOCK))
        if start > size:
            raise errors.InvalidParams("blocks.offset is past the volume's end",
                                       param="blocks", size=size)
    hasher = checksum.StreamHasher(end - start, kind, keep_blocks=blocks is not None)
    opts = chain.image_opts(db.layout, rows, direct=False, layer_only=layer)
    with qemu_nbd.export(opts) as exp:
        nbd.hash_prefix(exp, end, hasher, ctx.check, start=start, on_chunk=lambda at, n:
                        ctx.progress(100.0 * (at - start) / (end - start) if end > start
                                     else 100))
    out = {"algorithm": kind, "block_size": checksum.BLOCK, "size": size}
    if blocks is None:
        out["checksum"] = hasher.hexdigest().split(":", 1)[1]
        return out
    hasher.hexdigest()  # every byte of the range hashed
    return {**out, "offset": start, "length": end - start,
            "blocks": [d.hex() for d in hasher.blocks]}
