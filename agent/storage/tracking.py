"""Dirty bitmaps in the images: `qemu-img bitmap` behind a thin seam, each volume's bitmaps
as its rows (agent/storage/bitmaps.py) and its qcow2's directory (agent/storage/qcow2.py)
say together, and a bitmap over a chain.

A bitmap is `ok` only when both agree: a row the agent wrote, the same name in the image's
directory, not in use (qemu sets that flag while a writer has the image open and clears it
when it stores the bitmap: a writer that died leaves it set), the same granularity, enabled
on a leaf (it records the guest's writes), and no reason recorded by the agent. Anything
else is `broken` with the reason, and is never used; a bitmap of the image that no row names
is `unknown` (a stranger's, or one an add killed before its row left), never used either.

A bitmap named B over a chain is the union of B in the layers from the volume down to the
one where B began (a layer whose row does not `continue` its parent's): every write since B
was added lands in one of them. Every layer down there must hold B ok, or the whole is
broken (chain). qemu-nbd exports one bitmap of one node, so an export builds the union in a
private qcow2 overlay on top of the chain (as VDSM does): a bitmap of its own, into which
each layer's B is merged (`qemu-img bitmap --merge`).
"""

from __future__ import annotations

import json

from agent import errors
from agent.storage import chain, metadata, qcow2, qemu_img

GRANULARITY = 64 << 10  # qemu's default for a 64 KiB-cluster qcow2


def _run(args: list[str], path: str, beat, volume_id: str | None = None) -> None:
    """One `qemu-img bitmap`; another process holding the image's lock is VolumeInUse
    (reason open: a guest, an export), as qemu_img.tool_error names it."""
    try:
        qemu_img.run(["bitmap", *args], beat, path=path)
    except errors.VolumeInUse as exc:
        exc.data["volumeID"] = volume_id
        raise
    if metadata._after_write_hook is not None:  # the crash-point seam counts image writes
        metadata._after_write_hook("write:bitmap" + args[1])


def layer_opts(layout, row: dict) -> str:
    return chain.image_opts(layout, [row], direct=False, layer_only=True)


def file_opts(path: str) -> str:
    """A lone private qcow2 (a backup's overlay), no backing opened."""
    return f"driver=qcow2,file.driver=file,file.filename={qemu_img.escape(path)},backing="


def _source(layout, row: dict) -> str:
    """A layer named to `--merge -b` as json: (its backing never opened)."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {
        "driver": "file", "filename": layout.data_path(row)}})


def add(opts: str, path: str, name: str, granularity: int, beat=lambda: None,
        volume_id: str | None = None) -> None:
    _run(["--image-opts", "--add", "-g", str(granularity), opts, name], path, beat, volume_id)


def remove(opts: str, path: str, name: str, beat=lambda: None,
           volume_id: str | None = None) -> None:
    _run(["--image-opts", "--remove", opts, name], path, beat, volume_id)


def merge_from(opts: str, path: str, target: str, layout, src_row: dict,
               name: str | None = None, beat=lambda: None, volume_id: str | None = None) -> None:
    """Bitmap `target` of the image `opts` opens gets every bit of bitmap `name` (default:
    the same name) of src_row's image."""
    _run(["--image-opts", "--merge", name or target, "-b", _source(layout, src_row), "-F",
          "qcow2", opts, target], path, beat, volume_id)


def on_disk(layout, row: dict) -> tuple[qcow2.Header, dict[str, qcow2.Bitmap]]:
    path = layout.data_path(row)
    head = qcow2.read(path, row["volume_id"])
    return head, {b.name: b for b in qcow2.bitmaps(path, head, row["volume_id"])}


def verdict(rec: dict, found: qcow2.Bitmap | None, head: qcow2.Header,
            leaf: bool) -> str | None:
    """Why the recorded bitmap `rec` cannot be used (None: it is ok)."""
    if rec["broken"]:
        return rec["broken"]
    if found is None:
        return "missing"
    if not head.bitmaps_consistent:
        return "inconsistent"
    if found.in_use:
        return "in-use"
    if found.granularity != rec["granularity"]:
        return "granularity"
    if leaf and not found.auto:
        return "disabled"
    return None


def states(db, row: dict) -> list[dict]:
    """The volume's bitmaps, recorded or found: {name, state (ok | broken | unknown),
    reason, granularity, continues, in_image}."""
    head, found = on_disk(db.layout, row)
    leaf = not db.children(row["volume_id"])
    out = []
    for rec in db.bitmaps_of(row["volume_id"]):
        reason = verdict(rec, found.pop(rec["name"], None), head, leaf)
        out.append({"name": rec["name"], "state": "broken" if reason else "ok",
                    "reason": reason, "granularity": rec["granularity"],
                    "continues": bool(rec["continues"]),
                    "in_image": reason != "missing"})
    for name, b in sorted(found.items()):
        out.append({"name": name, "state": "unknown", "reason": "no-record",
                    "granularity": b.granularity, "continues": False, "in_image": True})
    return sorted(out, key=lambda b: b["name"])


def ok_rows(db, row: dict) -> list[dict]:
    """The volume's bitmaps in state ok, as rows."""
    good = {b["name"] for b in states(db, row) if b["state"] == "ok"}
    return [r for r in db.bitmaps_of(row["volume_id"]) if r["name"] in good]


def start(db, row: dict, name: str, granularity: int, beat=lambda: None) -> bool:
    """Bitmap `name` started in the volume (the image first, then its row); False if it
    exists ok with that granularity already (an add asked again). BitmapExists if it
    exists otherwise. A bitmap of that name no row names is removed first: never adopted."""
    vid = row["volume_id"]
    head, found = on_disk(db.layout, row)
    rec = db.get_bitmap(vid, name)
    if rec is not None:
        reason = verdict(rec, found.get(name), head, leaf=not db.children(vid))
        if reason is None and rec["granularity"] == granularity:
            return False
        raise errors.BitmapExists("the volume has a bitmap of that name", volumeID=vid,
                                  bitmap=name, state="broken" if reason else "ok",
                                  reason=reason, granularity=rec["granularity"])
    opts, path = layer_opts(db.layout, row), db.layout.data_path(row)
    if name in found:
        remove(opts, path, name, beat, vid)
    add(opts, path, name, granularity, beat, vid)
    db.record_bitmap(vid, name, granularity)
    return True


def layers(db, rows: list[dict], name: str) -> list[dict]:
    """The layers of the chain `rows` (base first) whose bitmap `name` together make the
    bitmap of rows[-1], leaf side first: NoSuchBitmap if rows[-1] has none, BitmapBroken
    if one of them is not ok or the chain does not carry it down to where it began."""
    out = []
    for i in range(len(rows) - 1, -1, -1):
        row = rows[i]
        rec = db.get_bitmap(row["volume_id"], name)
        if rec is None:
            if not out:
                raise errors.NoSuchBitmap("the volume has no bitmap of that name",
                                          volumeID=row["volume_id"], bitmap=name)
            raise errors.BitmapBroken("a layer of the chain does not carry the bitmap",
                                      volumeID=row["volume_id"], bitmap=name, reason="chain")
        if row["format"] != "cow":
            raise errors.BitmapBroken("a raw layer cannot carry the bitmap", bitmap=name,
                                      volumeID=row["volume_id"], reason="chain")
        head, found = on_disk(db.layout, row)
        leaf = i == len(rows) - 1 and not db.children(row["volume_id"])  # as states() says
        reason = verdict(rec, found.get(name), head, leaf=leaf)
        if reason:
            raise errors.BitmapBroken(f"the bitmap is broken ({reason})", bitmap=name,
                                      volumeID=row["volume_id"], reason=reason)
        out.append({**row, "bitmap_granularity": rec["granularity"]})
        if not rec["continues"]:
            return out
    raise errors.BitmapBroken("the bitmap continues a parent the chain does not have",
                              volumeID=rows[0]["volume_id"], bitmap=name, reason="chain")


def merge_chain(layout, parts: list[dict], name: str, opts: str, path: str,
                target: str, beat=lambda: None) -> None:
    """Bitmap `target` of the image `opts` opens (added here) made the union of bitmap
    `name` over `parts` (as `layers` returns them)."""
    add(opts, path, target, parts[0]["bitmap_granularity"], beat)
    for part in parts:
        merge_from(opts, path, target, layout, part, name, beat)


def fold(db, base: dict, top: dict, beat=lambda: None) -> None:
    """A merge's, after its commit: top's bitmaps merged into base's (a name base lacks is
    added first), base's rows rewritten in one transaction. What cannot be right is
    recorded broken: a bitmap of base a killed commit left in use, and whatever a broken
    bitmap of top was merged into. Run again after a crash, it does the same (a merge of
    bits is idempotent; a name it added to base but did not record is added afresh)."""
    if base["format"] != "cow":
        return  # a raw base holds no bitmaps: a child that continues top's finds them broken
    bhead, bfound = on_disk(db.layout, base)
    thead, tfound = on_disk(db.layout, top)
    opts, path = layer_opts(db.layout, base), db.layout.data_path(base)
    rows = {}
    for rec in db.bitmaps_of(base["volume_id"]):
        reason = verdict(rec, bfound.get(rec["name"]), bhead, leaf=False)
        rows[rec["name"]] = {**rec, "broken": reason}
    top_leaf = not db.children(top["volume_id"])
    for rec in db.bitmaps_of(top["volume_id"]):
        name = rec["name"]
        reason = verdict(rec, tfound.get(name), thead, leaf=top_leaf)
        mine = rows.get(name)
        if mine is None:
            mine = rows[name] = {**rec, "broken": "merged-broken" if reason else None}
            if name in bfound:
                remove(opts, path, name, beat, base["volume_id"])
            if reason:
                continue
            add(opts, path, name, rec["granularity"], beat, base["volume_id"])
        elif mine["broken"]:
            continue
        elif reason:
            mine["broken"] = "merged-broken"
            continue
        merge_from(opts, path, name, db.layout, top, beat=beat, volume_id=base["volume_id"])
    db.set_bitmaps(base["volume_id"], list(rows.values()))


def carry(src_db, src: dict, dst_db, dst: dict, beat=lambda: None) -> None:
    """A chain copy's, after a layer's data: the destination layer's bitmaps made the
    source layer's (what an earlier attempt left removed first), rows written after the
    image; a broken one is recorded broken, not copied."""
    if src["format"] != "cow" or dst["format"] != "cow":
        return
    shead, sfound = on_disk(src_db.layout, src)
    _dhead, dfound = on_disk(dst_db.layout, dst)
    opts, path = layer_opts(dst_db.layout, dst), dst_db.layout.data_path(dst)
    for name in sorted(dfound):
        remove(opts, path, name, beat, dst["volume_id"])
    leaf = not src_db.children(src["volume_id"])
    rows = []
    for rec in src_db.bitmaps_of(src["volume_id"]):
        reason = verdict(rec, sfound.get(rec["name"]), shead, leaf)
        rows.append({**rec, "broken": reason})
        if not reason:
            add(opts, path, rec["name"], rec["granularity"], beat, dst["volume_id"])
            merge_from(opts, path, rec["name"], src_db.layout, src, beat=beat,
                       volume_id=dst["volume_id"])
    dst_db.set_bitmaps(dst["volume_id"], rows)


def collapse(src_db, src_rows: list[dict], dst_db, dst: dict, beat=lambda: None) -> list:
    """A collapse's into a cow volume, when asked: every bitmap usable over the source's
    chain, as its union, in the destination (rows after the image; a broken one is not
    carried). The names carried."""
    _dhead, dfound = on_disk(dst_db.layout, dst)
    opts, path = layer_opts(dst_db.layout, dst), dst_db.layout.data_path(dst)
    for name in sorted(dfound):
        remove(opts, path, name, beat, dst["volume_id"])
    rows = []
    for rec in src_db.bitmaps_of(src_rows[-1]["volume_id"]):
        try:
            parts = layers(src_db, src_rows, rec["name"])
        except errors.BitmapBroken:
            continue
        merge_chain(src_db.layout, parts, rec["name"], opts, path, rec["name"], beat)
        rows.append({"name": rec["name"], "granularity": rec["granularity"]})
    dst_db.set_bitmaps(dst["volume_id"], rows)
    return [r["name"] for r in rows]
