"""Merges (Image.merge): a snapshot (top) folded into its parent (base), resumable from any
crash, continued from any host; the steps and their records: agent/storage/merges.py.

The worker holds the leases of base, top and top's child for its whole life. The commit is
a layer copy (workers/ops/copying/qemu.py): top's chain read through one qemu-nbd with
qemu:allocation-depth, base written through another; only what top holds itself (its data
and its zeros) is written, each checkpoint after a flush, and every range of the guest view
is hashed on the way (top's data as it passes, the rest read from below), so base ends with
the checksum of the view it now holds. Base's own ranges are read where the commit never
writes, which is why its reader may open base while its writer has it open. Top's dirty
bitmaps are then merged into base's (agent/storage/tracking.py, fold) before the commit's
end is recorded.
"""

from __future__ import annotations

import contextlib
import os
import time

from agent import errors
from agent.storage import chain, leases, metadata, qcow2, qemu_img, sizing, tracking, volumes
from agent.storage.markers import expected_generation
from agent.storage.metadata import DomainDB
from agent.storage.volumes import FORMATS, open_domain
from workers.ops.copying import qemu as qemu_copy
from workers.ops.copying.progress import Reporter
from workers.ops.volume import holder


def merge(ctx, args):
    base_id, top_id = args["baseVolumeID"], args["topVolumeID"]
    with open_domain(args) as db:
        done = _merged_before(db, args)
        if done is not None:
            return done
        with _leases(ctx, db, args):
            m = _own(ctx, db, args)
            ctx.returned(_answer(m, "merging"))
            base = {"domainID": db.domain_id, "imageID": args["imageID"], "volumeID": base_id,
                    "topVolumeID": top_id, "generation": m["generation"], "total": m["size"]}
            ctx.event("Image.merge", {**base, "state": "started", "step": m["step"],
                                      "copied": m["copied"]})
            try:
                _run(ctx, db, m, base)
            except errors.AgentError as exc:
                _record_error(db, m, exc, ctx.task_id)
                raise
            # Its row is gone: a leftover now (beating: freeing a large file takes a while).
            FORMATS[m["top_format"]].remove(m["top_path"], ctx.beat)
    ctx.event("Image.merge", {**base, "state": "done", "step": "done", "copied": m["size"],
                              "generation": m["generation"] + 1})
    return {**_answer(m, "done"), "generation": m["generation"] + 1, "copied": m["size"]}


def _answer(m: dict, state: str) -> dict:
    return {"volumeID": m["volume_id"], "baseVolumeID": m["volume_id"],
            "topVolumeID": m["top_id"], "state": state, "step": m["step"],
            "generation": m["generation"], "copied": m["copied"], "total": m["size"],
            "attempts": m["attempts"], "failures": m["failures"]}


def _merged_before(db: DomainDB, args: dict) -> dict | None:
    """A merge asked again after it ended (its answer lost): answered done, nothing run."""
    if db.get_volume(args["topVolumeID"]) is not None:
        return None
    record = db.get_merged(args["topVolumeID"])
    if record is None or record["base_id"] != args["baseVolumeID"] \
            or record["image_id"] != args["imageID"]:
        return None  # NoSuchVolume follows from the checks
    if args.get("expect_generation") is not None:
        raise errors.GenerationMismatch("the merge ended", volumeID=args["baseVolumeID"])
    base = db.get_volume(record["base_id"]) or {}
    return {"volumeID": record["base_id"], "baseVolumeID": record["base_id"],
            "topVolumeID": record["top_id"], "state": "done", "step": "done",
            "generation": record["generation"], "total": base.get("size"), "already": True}


@contextlib.contextmanager
def _leases(ctx, db: DomainDB, args: dict):
    """Base's, top's and top's child's leases (in one order, so two mergers never wait on
    each other): nobody else writes, deletes or re-points them while this worker lives."""
    ids = {args["baseVolumeID"], args["topVolumeID"]}
    if db.get_volume(args["topVolumeID"]) is not None:
        ids.update(db.children(args["topVolumeID"]))
    recorded = db.get_merge(args["baseVolumeID"])
    if recorded is not None and recorded["child_id"]:
        ids.add(recorded["child_id"])
    manager = leases.for_domain(db)
    with contextlib.ExitStack() as held:
        for vid in sorted(ids):
            held.enter_context(manager.acquire(vid, holder(ctx, "merge")))
        yield


def _own(ctx, db: DomainDB, args: dict) -> dict:
    """Begin the merge (checked, recorded on storage) or take over the one recorded."""
    base_id, top_id = args["baseVolumeID"], args["topVolumeID"]
    m = db.get_merge(base_id)
    if m is None:
        if args.get("expect_generation") is not None:
            raise errors.GenerationMismatch("the merge is gone", volumeID=base_id)
        base, top = db.mergeable(args["imageID"], base_id, top_id)
        _not_read_by_copies(db, args, base)
        children = db.children(top_id)
        rows = db.chain(children[0] if children else top_id)
        chain.inspect(db.layout, rows, ctx.beat, structure=True)  # before any answer
        _check_room(db, base, top)
        m = db.begin_merge(args["imageID"], base_id, top_id, ctx.host_id, ctx.task_id)
    else:
        if m["top_id"] != top_id or m["image_id"] != args["imageID"]:
            raise errors.VolumeInUse("the base has a merge of another volume in progress",
                                     volumeID=base_id, reason="merge", top=m["top_id"])
        m = db.take_over_merge(base_id, ctx.host_id, ctx.task_id,
                               expect_generation=args.get("expect_generation"),
                               restart=args.get("recover") == "restart",
                               failed_tasks=args.get("failed_tasks"),
                               previous_errors=args.get("previous_errors"))
    top = db.get_volume(top_id)
    m["top_format"], m["top_path"] = top["format"], db.layout.data_path(top)
    return m


def _not_read_by_copies(db: DomainDB, args: dict, base: dict) -> None:
    """VolumeInUse if a copy in progress (in any domain attached here, from any host) reads
    a volume whose guest view rests on base: its data is about to move."""
    affected = {base["volume_id"]}
    for row in db.image_volumes(args["imageID"]):
        with contextlib.suppress(errors.AgentError):
            if base["volume_id"] in {r["volume_id"] for r in db.chain(row["volume_id"])}:
                affected.add(row["volume_id"])
    for domain_id, path in sorted((args.get("domains") or {}).items()):
        other = db if domain_id == db.domain_id else None
        try:
            other = other or DomainDB.open(path, domain_id)
        except errors.AgentError:
            continue  # not readable now: its copies cannot be running here either
        try:
            for marker in other.list_markers():
                if marker["state"] == "copying" and marker["src_domain"] == db.domain_id \
                        and marker["src_volume"] in affected:
                    raise errors.VolumeInUse(
                        "a copy in progress reads this chain", volumeID=marker["src_volume"],
                        reason="copy-source", copy={"domainID": domain_id,
                                                    "imageID": marker["image_id"],
                                                    "volumeID": marker["volume_id"]})
        finally:
            if other is not db:
                other.close()


def _check_room(db: DomainDB, base: dict, top: dict) -> None:
    """NoSpace before anything is recorded if base cannot take what top holds (a raw base
    allocated whole takes it in place)."""
    need = volumes.allocated(db.layout.data_path(top))
    base_path = db.layout.data_path(base)
    if base["format"] == "raw" and volumes.allocated(base_path) >= base["size"]:
        need = max(0, top["size"] - base["size"])
    st = os.statvfs(db.layout.root)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise errors.NoSpace(f"the merge needs up to {need} bytes, the domain has {free} free",
                             needed=need, free=free)


def _run(ctx, db: DomainDB, m: dict, base: dict) -> None:
    base_id, gen = m["volume_id"], m["generation"]
    digest = None
    if m["step"] == "commit":
        digest = _commit(ctx, db, m, base)
        tracking.fold(db, db.get_volume(base_id), db.get_volume(m["top_id"]), ctx.beat)
        ctx.event("Image.merge", {**base, "state": "merging", "step": "committed",
                                  "copied": m["size"]})
        if db.children(m["top_id"]):  # else the last transaction ends it at once
            if not db.merge_committed(base_id, gen, digest):
                raise errors.GenerationMismatch("superseded during the merge",
                                                volumeID=base_id)
            m.update(step="committed")
    if m["step"] == "committed":
        _repoint(ctx, db, m)
    if not db.complete_merge(base_id, gen, checksum=digest):
        raise errors.GenerationMismatch("superseded during the merge", volumeID=base_id)


def _commit(ctx, db: DomainDB, m: dict, base: dict) -> str | None:
    """Base grown to top's size if smaller (file first, row next), then top's own extents
    written into it from the checkpoint on; the merged view's checksum."""
    base_id, gen = m["volume_id"], m["generation"]
    row = db.get_volume(base_id)
    if row["size"] < m["size"]:
        sizing.grow(db.layout, row, m["size"], beat=ctx.beat)
        if not db.grow_base(base_id, gen, m["size"]):
            raise errors.GenerationMismatch("superseded during the merge", volumeID=base_id)
    whole = sizing.preallocation_of(db.layout.data_path(row), row) == "preallocated"
    rows = db.chain(m["top_id"])  # [..., base, top]
    chain.inspect(db.layout, rows, ctx.beat)
    # A resumed merge's cow base: what a killed writer allocated and never linked is
    # reclaimed (a fresh merge's base was checked whole before its answer).
    if rows[-2]["format"] == "cow" and m["attempts"] > 1:
        chain.reclaim_leaks(db.layout, rows[-2], ctx.beat, ctx.wait, on_wait=lambda: ctx.event(
            "Image.merge", {**base, "state": "waiting", "reason": "image-locked"}))
    cfg = ctx.settings.get("copy", {})
    report = Reporter(ctx, db, base_id, gen, m["size"], base, None,
                      cfg.get("max_bytes_per_second", 0), topic="Image.merge",
                      save=lambda offset: db.merge_checkpoint(base_id, gen, offset))
    digest, _, _ = qemu_copy.move(ctx, src_db=db, src_rows=rows, dst_db=db, dst_rows=rows[:-1],
                               start=m["copied"], fresh=False, layer=True, report=report,
                               record=cfg.get("record_checksum", True), merge=True,
                               punch=not whole)  # a preallocated base keeps its blocks
    return digest


def _repoint(ctx, db: DomainDB, m: dict) -> None:
    """Top's child backs onto base: its header (if it still names top) rewritten, then its
    row and the step in one transaction. Either order of a crash reads the same data: base
    holds top's view since the commit."""
    base_row, top_row = db.get_volume(m["volume_id"]), db.get_volume(m["top_id"])
    for child_id in db.children(m["top_id"]):
        ctx.beat()
        child = db.get_volume(child_id)
        path = db.layout.data_path(child)
        named = qcow2.read(path, child_id).backing
        if named == chain.file_name(top_row):
            qemu_img.rebase_unsafe(path, chain.file_name(base_row), base_row["format"],
                                   beat=ctx.beat)
            if metadata._after_write_hook is not None:  # the crash-point seam counts it too
                metadata._after_write_hook("write:repoint-header")
        elif named != chain.file_name(base_row):
            raise errors.ImageInvalid("the child's backing file is neither the top's nor the "
                                      "base's", volumeID=child_id, reason="chain")
    if not db.repoint(m["volume_id"], m["generation"]):
        raise errors.GenerationMismatch("superseded during the merge", volumeID=m["volume_id"])


def _record_error(db: DomainDB, m: dict, exc: errors.AgentError, task_id) -> None:
    with contextlib.suppress(errors.AgentError):  # a full disk may hold the metadata too
        if db.record_merge_error(m["volume_id"], m["generation"],
                                 {**exc.to_json(), "time": time.time(), "task_id": task_id}):
            exc.data["recorded"] = True


def abandon(ctx, args):
    """Give a merge up (recovery policy): base and top stay ILLEGAL with the merge recorded,
    'abandoned', until someone continues it (Image.merge of the same pair)."""
    with open_domain(args) as db, \
            leases.for_domain(db).acquire(args["baseVolumeID"], holder(ctx, "abandon")):
        merge = db.get_merge(args["baseVolumeID"])
        gen = args["expect_generation"] if merge is None else expected_generation(
            merge, args["expect_generation"], ctx.host_id, args.get("failed_tasks"))
        if not db.abandon_merge(args["baseVolumeID"], gen, args.get("previous_errors")):
            raise errors.GenerationMismatch("the merge changed hands",
                                            volumeID=args["baseVolumeID"])
        return {"volumeID": args["baseVolumeID"], "state": "abandoned", "generation": gen}


def describe(db: DomainDB, m: dict, probe: dict | None = None) -> dict:
    """A merge as Image.getStatus and Image.getInfo show it."""
    if probe is None:
        probe = leases.for_domain(db).probe(m["volume_id"])
    return {"baseVolumeID": m["volume_id"], "topVolumeID": m["top_id"],
            "childVolumeID": m["child_id"], "step": m["step"], "state": m["state"],
            "copied": m["copied"], "total": m["size"],
            "percent": round(100.0 * m["copied"] / m["size"], 2) if m["size"] else 100.0,
            "generation": m["generation"], "attempts": m["attempts"],
            "failures": m["failures"], "errors": m["errors"], "started": m["started"],
            "updated": m["updated"], "host_id": m["host_id"], "task_id": m["task_id"],
            "lease": probe if probe and probe.get("host_id") else None,
            "running": bool((probe or {}).get("live"))}
