"""Image copies: the work that outlives its task, because its state lives on storage.

The worker holds the destination's lease for its whole life. The destination is ILLEGAL
with a copy marker until one transaction makes it LEGAL (generation + 1, marker gone). Data
is made durable before the marker's `copied` says so, and every metadata write names the
generation this worker took over with, so a superseded worker writes nothing.
"""

from __future__ import annotations

import os

from agent import errors
from agent.storage import chain, leases, sizing, tracking, volumes
from agent.storage.copy import kernel, readback
from agent.storage.markers import check_source, expected_generation, source_identity
from agent.storage.metadata import DomainDB
from agent.storage.volumes import open_domain, volume_row
from workers.ops import merge as merge_op
from workers.ops.copying import chain as chain_copy
from workers.ops.copying import qemu as qemu_copy
from workers.ops.copying.progress import Reporter, record_error
from workers.ops.volume import holder
from workers.protocol import Stopped


def _source(src_db: DomainDB, src: dict) -> dict:
    row = volume_row(src_db, src)
    if row["legality"] != "LEGAL":
        raise errors.VolumeIllegal("the source volume is not LEGAL", volumeID=src["volumeID"])
    return row


def _same_source(marker: dict, src: dict) -> bool:
    return (marker["src_domain"], marker["src_image"], marker["src_volume"]) == (
        src["domainID"], src["imageID"], src["volumeID"])


def _own(dst_db: DomainDB, ctx, src: dict, dst: dict, src_row: dict, args: dict,
         fmt: str = "raw") -> tuple:
    """Become the copier of dst: a new marker, or take over the existing one.

    Returns (marker, fresh). Under the lease, so nobody else is deciding the same thing.
    The marker is bound to the source as it is now (source_identity): a continue from a
    source deleted and re-created with the same IDs, or resized, is a CopyConflict.
    """
    row = dst_db.get_volume(dst["volumeID"])
    identity = source_identity(src_row)
    if row is None:
        if args.get("expect_generation") is not None:  # a retry or recovery: copy went away
            raise errors.GenerationMismatch("the copy marker is gone", volumeID=dst["volumeID"])
        marker = dst_db.begin_copy(dst["imageID"], dst["volumeID"], src_row["size"], src,
                                   ctx.host_id, ctx.task_id, src_identity=identity, fmt=fmt,
                                   bitmaps=bool(args.get("bitmaps")))
        return marker, True
    marker = dst_db.get_marker(dst["volumeID"])
    if marker is None:
        if args.get("expect_generation") is not None:
            raise errors.GenerationMismatch("the copy already ended", volumeID=dst["volumeID"],
                                            legality=row["legality"])
        raise errors.VolumeExists("the destination exists and has no copy in progress",
                                  volumeID=dst["volumeID"], legality=row["legality"])
    if row["image_id"] != dst["imageID"] or not _same_source(marker, src):
        raise errors.CopyConflict("the destination has a copy from another source",
                                  volumeID=dst["volumeID"],
                                  source={"domainID": marker["src_domain"],
                                          "imageID": marker["src_image"],
                                          "volumeID": marker["src_volume"]})
    marker = dst_db.take_over(dst["volumeID"], ctx.host_id, ctx.task_id,
                              expect_generation=args.get("expect_generation"),
                              restart=args.get("recover") == "restart", src_identity=identity,
                              failed_tasks=args.get("failed_tasks"),
                              previous_errors=args.get("previous_errors"))
    return marker, marker["copied"] == 0


def _kernel_copy(src_rows: list[dict], dst_format: str) -> bool:
    """Raw to raw of a lone volume: a kernel copy (copy_file_range); all else goes through
    qemu (workers/ops/copying/qemu.py)."""
    return len(src_rows) == 1 and src_rows[0]["format"] == dst_format == "raw"


def _kind(dst_db: DomainDB, dst: dict, args: dict) -> str:
    """collapse or chain: what the copy being continued is, else what the caller asked
    (collapse by default)."""
    marker = dst_db.get_marker(dst["volumeID"])
    asked = args.get("kind")
    row = dst_db.get_volume(dst["volumeID"]) if marker is not None else None
    if row is not None and args.get("format") not in (None, row["format"]):
        raise errors.CopyConflict(f"the destination's copy in progress is {row['format']}",
                                  volumeID=dst["volumeID"], reason="format",
                                  format=row["format"])
    if marker is not None:
        if asked is not None and asked != marker["kind"]:
            raise errors.CopyConflict(f"the destination has a {marker['kind']} copy in "
                                      "progress", volumeID=dst["volumeID"], reason="kind",
                                      kind=marker["kind"])
        return marker["kind"]
    return asked or "collapse"


def _collapse_format(args: dict, src_row: dict) -> str:
    """The format a collapse writes, if the request can have it (InvalidParams)."""
    fmt, size = args.get("format") or src_row["format"], src_row["size"]
    if fmt == "cow" and size % chain.SECTOR:  # qemu would make it a sector larger
        raise errors.InvalidParams(f"a cow copy needs a size that is a multiple of "
                                   f"{chain.SECTOR} bytes (the source's is {size})",
                                   param="format")
    if args.get("bitmaps") and fmt != "cow":
        raise errors.InvalidParams("bitmaps live in a cow volume: a collapse into raw "
                                   "cannot carry them", param="bitmaps")
    return fmt


def copy(ctx, args):
    src, dst = args["src"], args["dst"]
    dst_db = open_domain(dst)
    src_db = dst_db if src["domainID"] == dst["domainID"] else open_domain(src)
    with leases.for_domain(dst_db).acquire(dst["volumeID"], holder(ctx, "copy")):
        src_row = _source(src_db, src)
        if _kind(dst_db, dst, args) == "chain":
            return chain_copy.copy_chain(ctx, args, src_db, dst_db, src_row)
        size = src_row["size"]
        src_rows = src_db.chain(src["volumeID"])
        chain.require_legal(src_rows)  # a merge may be folding a layer beneath the source
        fmt = _collapse_format(args, src_row)
        checks: dict = {}
        headers = chain.inspect(src_db.layout, src_rows, ctx.beat, structure=True,
                                checks=checks)  # before any answer
        if not _kernel_copy(src_rows, fmt) and dst_db.get_volume(dst["volumeID"]) is None:
            qemu_copy.check_room(src_db, src_rows, dst_db, [fmt], headers, checks,
                                 ctx.beat)
        marker, fresh = _own(dst_db, ctx, src, dst, src_row, args, fmt=fmt)
        dst_db.layout.ensure_image_dir(dst["imageID"])
        gen, start = marker["generation"], marker["copied"]
        ctx.returned({"volumeID": dst["volumeID"], "state": "copying", "generation": gen,
                      "copied": start, "total": size, "attempts": marker["attempts"],
                      "failures": marker["failures"]})
        base = {"domainID": dst["domainID"], "imageID": dst["imageID"],
                "volumeID": dst["volumeID"], "generation": gen, "total": size}
        ctx.event("Image.copy", {**base, "state": "started", "copied": start})
        try:
            dst_row = dst_db.get_volume(dst["volumeID"])  # a continue: its own format
            if _kernel_copy(src_rows, dst_row["format"]):
                digest = _move_data(ctx, dst_db, src_db, src, dst, size, gen, start, fresh,
                                    base, marker)
            else:
                _source_row_still(src_db, src, marker)
                report = Reporter(ctx, dst_db, dst["volumeID"], gen, size, base, None,
                                   ctx.settings.get("copy", {}).get("max_bytes_per_second", 0))
                digest, _, _ = qemu_copy.move(
                    ctx, src_db=src_db, src_rows=src_rows, dst_db=dst_db, dst_rows=[dst_row],
                    start=start, fresh=fresh, layer=False, report=report,
                    record=ctx.settings.get("copy", {}).get("record_checksum", True),
                    holds_nothing=sizing.holds_nothing(src_db.layout, src_rows, headers,
                                                       checks))
                _source_row_still(src_db, src, marker)
                if marker.get("bitmaps"):
                    tracking.collapse(src_db, src_rows, dst_db, dst_row, ctx.beat)
        except errors.AgentError as exc:
            record_error(dst_db, dst["volumeID"], gen, exc, ctx.task_id)
            raise
        if not dst_db.complete_copy(dst["volumeID"], gen, checksum=digest):
            raise errors.GenerationMismatch("superseded before completion",
                                            volumeID=dst["volumeID"], generation=gen)
        dst_db.close()
    # The lease is released before the result is reported: when the task says done, the
    # volume is free for the next operation.
    ctx.event("Image.copy", {**base, "state": "done", "copied": size, "generation": gen + 1})
    return {"volumeID": dst["volumeID"], "state": "done", "generation": gen + 1,
            "copied": size, "total": size}


def _source_row_still(src_db: DomainDB, src: dict, marker: dict) -> None:
    """The source's row is still the one the copy is bound to (token, generation, size)."""
    row = src_db.get_volume(src["volumeID"])
    if row is None or row["legality"] != "LEGAL":
        raise errors.CopyConflict("the source was deleted or changed during the copy",
                                  volumeID=marker["volume_id"], reason="source-gone")
    check_source(marker, source_identity(row))


def _source_still(src_db: DomainDB, src: dict, src_fd: int, src_path: str, size: int,
                  marker: dict) -> None:
    """The source is still the one the copy is bound to, and its data is whole: its row
    (token, generation, size), its data file (the one we read, not a replacement) and its
    length. Checked before the first byte and before the commit, so a volume never turns
    LEGAL with data from another source or with zeros where a short source ended."""
    _source_row_still(src_db, src, marker)
    st = os.fstat(src_fd)
    try:
        now = os.stat(src_path)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise errors.CopyConflict("the source's data file was replaced during the copy",
                                  volumeID=marker["volume_id"], reason="source-replaced")
    if st.st_size < size:
        raise errors.VolumeTruncated(
            f"the source's data ends at {st.st_size} bytes, before its size of {size}",
            volumeID=src["volumeID"], size=size, data_bytes=st.st_size)


def _open_pair(src_path: str, dst_path: str) -> tuple[int, int]:
    src_fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return src_fd, os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(src_fd)
        raise


def _size_destination(dst_fd: int, size: int, fresh: bool) -> None:
    if fresh:  # whatever an earlier life left here is not ours: holes must stay holes
        os.ftruncate(dst_fd, 0)
    try:
        os.ftruncate(dst_fd, size)
    except OSError as exc:
        raise errors.from_os_error(exc, "cannot size the destination") from None


def _move_data(ctx, dst_db, src_db, src, dst, size, gen, start, fresh, base,
               marker) -> str | None:
    """Copy the data, durable, and return the destination's checksum (None when [copy]
    record_checksum is off): hashed behind the copy as it goes, so a scrub can later tell
    whether the data changed since, without a second pass over it now."""
    src_path = src_db.layout.volume_path(src["imageID"], src["volumeID"])
    src_fd, dst_fd = _open_pair(src_path,
                                dst_db.layout.volume_path(dst["imageID"], dst["volumeID"]))
    follower = None
    try:
        _source_still(src_db, src, src_fd, src_path, size, marker)
        _size_destination(dst_fd, size, fresh)
        cfg = ctx.settings.get("copy", {})
        rate = cfg.get("max_bytes_per_second", 0)
        # On a resume the bytes below `start` are an earlier life's: read back from disk,
        # no faster than the copy may go.
        if cfg.get("record_checksum", True):
            follower = readback.Follower(dst_fd, size, written=start, rate=rate)
        report = Reporter(ctx, dst_db, dst["volumeID"], gen, size, base, follower, rate)
        try:
            kernel.copy_range(
                src_fd, dst_fd, start, size, checkpoint=report.checkpoint,
                progress=report.progress, should_stop=ctx.stop_requested,
                chunk=cfg.get("chunk_bytes", 16 << 20),
                checkpoint_bytes=cfg.get("checkpoint_bytes", 256 << 20),
                checkpoint_seconds=cfg.get("checkpoint_seconds", 1.0),
                hashed=None if follower is None else lambda: follower.hasher.pos)
        except kernel.CopyStopped:
            raise Stopped() from None
        os.fsync(dst_fd)
        digest = None
        if follower is not None:
            follower.advance(size)
            digest = follower.result(beat=ctx.check)
        _source_still(src_db, src, src_fd, src_path, size, marker)
        return digest
    finally:
        if follower is not None:
            follower.cancel()  # before the fd it reads is closed
        os.close(src_fd)
        os.close(dst_fd)


def status(ctx, args):
    with open_domain(args) as db:
        row = volume_row(db, args)
        marker = db.get_marker(args["volumeID"])
        out = {"domainID": db.domain_id, "imageID": row["image_id"],
               "volumeID": row["volume_id"], "legality": row["legality"],
               "generation": row["generation"], "size": row["size"], "copy": None,
               "transfer": volumes.transfer_status(db, args["volumeID"]), "merge": None}
        merge = db.merge_of(args["volumeID"])
        if merge is not None:
            out["merge"] = merge_op.describe(db, merge)
        if marker is not None:
            probe = leases.for_domain(db).probe(args["volumeID"])
            total = marker["size"] or 0
            out["copy"] = {
                "source": {"domainID": marker["src_domain"], "imageID": marker["src_image"],
                           "volumeID": marker["src_volume"]},
                "copied": marker["copied"], "total": total,
                "percent": round(100.0 * marker["copied"] / total, 2) if total else 100.0,
                "state": marker["state"], "generation": marker["generation"],
                "attempts": marker["attempts"], "failures": marker["failures"],
                "errors": marker["errors"],
                "started": marker["started"], "updated": marker["updated"],
                "host_id": marker["host_id"], "task_id": marker["task_id"],
                "lease": probe,
            }
        return out


def abandon(ctx, args):
    """Give a copy up (recovery policy, or too many failed attempts): the destination stays
    ILLEGAL with its marker, state 'abandoned', until someone continues or deletes it."""
    dst = args["dst"]
    with open_domain(dst) as db, \
            leases.for_domain(db).acquire(dst["volumeID"], holder(ctx, "abandon")):
        marker = db.get_marker(dst["volumeID"])
        gen = args["expect_generation"] if marker is None else expected_generation(
            marker, args["expect_generation"], ctx.host_id, args.get("failed_tasks"))
        if not db.abandon(dst["volumeID"], gen, args.get("previous_errors")):
            raise errors.GenerationMismatch("the copy changed hands", volumeID=dst["volumeID"])
        return {"volumeID": dst["volumeID"], "state": "abandoned", "generation": gen}


def info(ctx, args):
    """An image's chain, base first (Image.getInfo)."""
    with open_domain(args) as db:
        return {**volumes.image_info(db, args),
                "merges": [merge_op.describe(db, m) for m in db.list_merges(args["imageID"])]}
