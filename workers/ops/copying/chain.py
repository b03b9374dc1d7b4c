"""Chain copies: every volume of the source's chain, up to and including the source, into
the destination image, with the same structure (each copy's backing file is its parent's
copy). How a disk with snapshots moves to another domain.

Every layer's destination has its own marker, made with the others in one transaction, so
the answer names volumes that all exist and each layer resumes on its own. Layers are copied
base first and each turns LEGAL as it ends, with the source layer's dirty bitmaps
(agent/storage/tracking.py, carry); the copy holds every layer's lease for its life. The
destination's layers keep the source's volume IDs when the caller names the source's
volumeID as the destination's (a move to another domain, as oVirt does); otherwise each is
derived from the destination's volumeID and its source layer (uuid5), so a continue finds
the same volumes. Start-up recovery continues a chain from its leaf's marker.
"""

from __future__ import annotations

import contextlib
import uuid

from agent import errors
from agent.storage import chain, leases, qcow2, sizing, tracking
from agent.storage.markers import source_identity
from agent.storage.metadata import DomainDB
from workers.ops.copying import qemu
from workers.ops.copying.progress import Reporter, record_error
from workers.ops.volume import holder

_NAMESPACE = uuid.UUID("6f0c1d3e-8a43-4a36-9a43-2f1c6b0a7e51")


def layer_ids(dst_volume: str, src_rows: list[dict]) -> list[str]:
    """The destination's volume IDs, base first; the last is the caller's."""
    if dst_volume == src_rows[-1]["volume_id"]:
        return [r["volume_id"] for r in src_rows]
    return [str(uuid.uuid5(_NAMESPACE, f"{dst_volume}/{r['volume_id']}"))
            for r in src_rows[:-1]] + [dst_volume]


def _location(domain_id: str, row: dict) -> dict:
    return {"domainID": domain_id, "imageID": row["image_id"], "volumeID": row["volume_id"]}


def _own(ctx, args, src_db: DomainDB, dst_db: DomainDB, src_rows, ids) -> list:
    """[(marker or None (copied already), fresh)] per layer, base first."""
    dst, n = args["dst"], len(ids)
    rows = [dst_db.get_volume(v) for v in ids]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing and missing != list(range(missing[0], n)):
        raise errors.CopyConflict("the destination's chain is not whole", reason="chain",
                                  volumeID=dst["volumeID"], missing=[ids[i] for i in missing])
    if rows[-1] is not None and dst_db.get_marker(ids[-1]) is None:
        raise errors.VolumeExists("the destination exists and has no copy in progress",
                                  volumeID=ids[-1], legality=rows[-1]["legality"])
    if rows[-1] is None and args.get("expect_generation") is not None:
        raise errors.GenerationMismatch("the copy marker is gone", volumeID=ids[-1])
    out = []
    for i, row in enumerate(rows[:missing[0] if missing else n]):
        expected = ids[i - 1] if i else None
        if row["image_id"] != dst["imageID"] or row["parent_id"] != expected:
            raise errors.CopyConflict("a volume of the destination's chain is another's",
                                      volumeID=row["volume_id"], reason="chain")
        marker = dst_db.get_marker(row["volume_id"])
        if marker is None:
            out.append((None, False))
            continue
        if marker["kind"] != "chain" or marker["src_volume"] != src_rows[i]["volume_id"]:
            raise errors.CopyConflict("the destination has a copy from another source",
                                      volumeID=row["volume_id"], reason="source-replaced")
        leaf = i == n - 1
        marker = dst_db.take_over(
            row["volume_id"], ctx.host_id, ctx.task_id,
            expect_generation=args.get("expect_generation") if leaf else marker["generation"],
            restart=args.get("recover") == "restart",
            src_identity=source_identity(src_rows[i]),
            failed_tasks=args.get("failed_tasks") if leaf else None,
            previous_errors=args.get("previous_errors") if leaf else None)
        out.append((marker, marker["copied"] == 0))
    if missing:
        layers = [{"imageID": dst["imageID"], "volumeID": ids[i], "size": src_rows[i]["size"],
                   "src": _location(args["src"]["domainID"], src_rows[i]),
                   "src_identity": source_identity(src_rows[i]),
                   "format": src_rows[i]["format"], "parent_id": ids[i - 1] if i else None,
                   "kind": "chain"} for i in missing]
        out += [(m, True) for m in dst_db.begin_chain(layers, ctx.host_id, ctx.task_id)]
    return out


def _empty(src_db: DomainDB, row: dict, i: int, headers: dict, checks: dict) -> bool:
    """Whether a layer's copy can be left as made (qemu.move's holds_nothing): the base, if
    it holds no data; a layer above, if it maps no cluster, not even one of zeros (which
    would hide its parent's data there)."""
    if i == 0:
        return sizing.holds_nothing(src_db.layout, [row], headers, checks)
    header = headers.get(row["volume_id"])
    return header is not None and qcow2.maps_nothing(src_db.layout.data_path(row), header)


def _copy_layer(ctx, i, n, src_db, dst_db, src_rows, ids, marker, fresh, dst_base,
                inherited, empty: bool, ahead: qemu.Ahead | None,
                on_copying) -> list[bytes] | None:
    """One layer copied; returns its block digests for the next layer (None: not kept).
    `empty`: it holds nothing of its own (_empty: qemu.move's holds_nothing); `ahead`:
    what was begun for it while the layer before it copied; `on_copying()`: called once
    its data moves, to begin the next."""
    vid, gen = ids[i], marker["generation"]
    base = {**dst_base, "volumeID": vid, "generation": gen, "total": marker["size"],
            "layer": i, "layers": n}
    ctx.event("Image.copy", {**base, "state": "started", "copied": marker["copied"]})
    cfg = ctx.settings.get("copy", {})
    report = Reporter(ctx, dst_db, vid, gen, marker["size"], base, None,
                      cfg.get("max_bytes_per_second", 0), share=(i, n))
    try:
        digest, _, blocks = qemu.move(
            ctx, src_db=src_db, src_rows=src_rows[:i + 1], dst_db=dst_db,
            dst_rows=[dst_db.get_volume(v) for v in ids[:i + 1]], start=marker["copied"],
            fresh=fresh, layer=i > 0, report=report,
            record=cfg.get("record_checksum", True), inherited=inherited,
            keep_blocks=i < n - 1, holds_nothing=empty, ahead=ahead, on_copying=on_copying)
        now = src_db.get_volume(src_rows[i]["volume_id"])
        if now is None or source_identity(now) != source_identity(src_rows[i]):
            raise errors.CopyConflict("the source was deleted or changed during the copy",
                                      volumeID=vid, reason="source-gone")
        tracking.carry(src_db, now, dst_db, dst_db.get_volume(vid), ctx.beat)
    except errors.AgentError as exc:
        record_error(dst_db, vid, gen, exc, ctx.task_id)
        raise
    if not dst_db.complete_copy(vid, gen, checksum=digest):
        raise errors.GenerationMismatch("superseded before completion", volumeID=vid,
                                        generation=gen)
    ctx.event("Image.copy", {**base, "state": "done", "copied": marker["size"],
                             "generation": gen + 1})
    return blocks


def copy_chain(ctx, args, src_db: DomainDB, dst_db: DomainDB, src_row: dict) -> dict:
    """Called under the destination leaf's lease; returns the task's result."""
    dst = args["dst"]
    src_rows = src_db.chain(src_row["volume_id"])
    chain.require_legal(src_rows)
    ids = layer_ids(dst["volumeID"], src_rows)
    checks: dict = {}
    headers = chain.inspect(src_db.layout, src_rows, ctx.beat, structure=True,
                            checks=checks)  # before any answer
    if dst_db.get_volume(ids[0]) is None:
        qemu.check_room(src_db, src_rows, dst_db, [r["format"] for r in src_rows], headers,
                        checks, ctx.beat)
    with contextlib.ExitStack() as held:
        manager = leases.for_domain(dst_db)
        for vid in ids[:-1]:
            held.enter_context(manager.acquire(vid, holder(ctx, "copy")))
        layers = _own(ctx, args, src_db, dst_db, src_rows, ids)
        leaf, _ = layers[-1]
        ctx.returned({"volumeID": ids[-1], "state": "copying", "generation": leaf["generation"],
                      "copied": leaf["copied"], "total": leaf["size"],
                      "attempts": leaf["attempts"], "failures": leaf["failures"],
                      "kind": "chain", "chain": ids})
        dst_base = {"domainID": dst["domainID"], "imageID": dst["imageID"]}
        dst_db.layout.ensure_image_dir(dst["imageID"])
        # Each layer's block digests go to the next (nbd.copy_image): one copied in an
        # earlier life left none, and its child reads what it does not hold for the checksum.
        empty = [marker is not None and _empty(src_db, row, i, headers, checks)
                 for i, (row, (marker, _)) in enumerate(zip(src_rows, layers))]  # to copy
        inherited, ahead = None, {}

        def begin(i: int) -> None:  # layer i, begun while the one before it copies
            if i < len(layers) and layers[i][0] is not None and layers[i][1]:
                ahead[i] = held.enter_context(contextlib.closing(qemu.Ahead(
                    src_db, src_rows[:i + 1], dst_db,
                    [dst_db.get_volume(v) for v in ids[:i + 1]], empty=empty[i])))
        for i, (marker, fresh) in enumerate(layers):
            inherited = None if marker is None else _copy_layer(
                ctx, i, len(ids), src_db, dst_db, src_rows, ids, marker, fresh, dst_base,
                inherited, empty[i], ahead.pop(i, None), lambda i=i: begin(i + 1))
        dst_db.close()
    size = src_rows[-1]["size"]
    return {"volumeID": ids[-1], "state": "done", "generation": leaf["generation"] + 1,
            "copied": size, "total": size, "kind": "chain", "chain": ids}
