"""`hostagent backup SRC FILE`: a full backup (the guest view into a raw or qcow2 FILE,
as a download) or, with `--incremental BITMAP --base PREVIOUS`, an incremental one: a qcow2
FILE whose backing file is PREVIOUS, holding only the extents the bitmap marks dirty (data
read and written, zeros written as zeros so that they hide what PREVIOUS holds there).
`--checkpoint NAME` starts the next backup's bitmap in the same step as the export (no
write falls between two backups: agent/api/export.py).

Cut short, the same command resumes: a full backup as a download does (block digests of
both ends compared, only what differs sent); an incremental one by writing its dirty
extents again into the partial FILE (they are what it holds; a resumed checkpoint is kept,
and tracks from the first attempt on, so the next backup reads a little more, never less).
A state file beside FILE says what it is a partial backup of.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid

from agent.cli import output, transfers
from agent.cli.storage import parse_location, show_location
from agent.client import ends
from agent.client import transfer as tx


def backup(ctx, args) -> int:
    if args.incremental is None:
        if args.base:
            raise output.UsageError("--base is for an incremental backup (--incremental)")
        args.layer = False
        return transfers.download(ctx, args, checkpoint=args.checkpoint, what="backup")
    if not args.base:
        raise output.UsageError("an incremental backup needs --base PREVIOUS (the backup "
                                "it adds to)")
    if args.format != "qcow2":
        raise output.UsageError("an incremental backup is a qcow2 (its backing file is "
                                "PREVIOUS): --format qcow2")
    return _incremental(ctx, args)


def _incremental(ctx, args) -> int:
    src = parse_location(args.src)
    base = os.path.realpath(args.base)
    if not os.path.isfile(base):
        raise transfers.TransferError(f"{args.base} is not a file (the previous backup)")
    state_path = args.file + transfers.STATE_SUFFIX
    want = {"src": src, "format": "qcow2", "layer": False, "bitmap": args.incremental,
            "base": base, **({"checkpoint": args.checkpoint} if args.checkpoint else {})}
    export_id = f"backup-{uuid.uuid4().hex[:8]}"
    params = {**src, "mode": "read", "bitmap": args.incremental}
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    resume = os.path.exists(args.file) and not args.restart
    if resume:  # FILE must be a partial backup of this, and its export of it is stopped
        info = ctx.calls.call("Volume.getInfo", src)
        want.update(size=info["size"], generation=info["generation"])
        resume = transfers.download_state(args, state_path, want)
        transfers.stop_earlier(ctx, state_path)
    elif os.path.exists(state_path):  # a run killed before it made FILE: its export
        with contextlib.suppress(ValueError, OSError):
            transfers.stop_earlier(ctx, state_path)
    # A fresh backup asks nothing first: the export's answer says the size and generation
    # (one round trip less; a run killed before its state file leaves an idle export).
    exp = ctx.calls.call("Export.start", params, id=export_id,
                         timeout=max(ctx.settings.timeout, 600))
    size = exp["size"]
    want.update(size=size, generation=exp["generation"])
    transfers.write_state(state_path, {**want, "export": export_id})
    if not resume:
        _make_overlay(args.file, base, size)
    stats, began = tx.Stats(), time.monotonic()

    def move(local, bar):
        with bar or contextlib.nullcontext():
            tx.run_blocks(lambda: ends.connect_export(exp["socket"]), local.connect, size,
                          fresh=False, stats=stats, threads=transfers.threads(exp),
                          on_block=transfers.progress(bar, size), rate=args.rate,
                          extents_of=lambda: ends.connect_export(
                              exp["socket"], dirty=args.incremental), digests=False)
    if not transfers.pull(ctx, args, "qcow2", export_id, state_path,
                          f"backup {src['volumeID'][:8]}", move):
        return output.DETACHED
    return transfers.done(ctx, "backup", src, {"file": args.file, "format": "qcow2",
                                               "base": base, "bitmap": args.incremental,
                                               "checkpoint": args.checkpoint},
                          stats, began, size, resume)


def _make_overlay(path: str, base: str, size: int) -> None:
    """FILE: an empty qcow2 on PREVIOUS (named relative to FILE's directory when it is
    there, so the chain of backups moves as a whole), PREVIOUS's format given."""
    fmt = "qcow2" if ends.is_qcow2(base) else "raw"
    here = os.path.dirname(os.path.realpath(path))
    name = os.path.basename(base) if os.path.dirname(base) == here else base
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-b", name,
                    "-F", fmt, path, str(size)], check=True, capture_output=True, timeout=120)


def bitmap(ctx, args) -> int:
    """`hostagent bitmap list|add|remove|clear VOLUME [NAME]`."""
    loc = parse_location(args.location)
    if args.action == "list":
        result = ctx.calls.call("Bitmap.list", loc)
        if ctx.json:
            output.emit_json(result)
            return output.OK
        t = output.table("BITMAP", "STATE", "WHY", "GRANULARITY", "CONTINUES ITS PARENT'S")
        for b in result["bitmaps"]:
            t.add_row(b["name"], output.styled(b["state"]), b["reason"] or "",
                      output.size(b["granularity"]), "yes" if b["continues"] else "no")
        ctx.out.print(t if result["bitmaps"] else f"{show_location(loc)} has no bitmaps")
        return output.OK
    params = dict(loc)
    if args.action in ("add", "remove"):
        params["name"] = args.name
    if args.action == "add" and args.granularity:
        params["granularity"] = output.parse_size(args.granularity)
    result = ctx.calls.call(f"Bitmap.{args.action}", params)
    if ctx.json:
        output.emit_json(result)
    elif args.action == "add":
        done = "was there already in" if result["already"] else "added to"
        ctx.out.print(f"bitmap {args.name} {done} {show_location(loc)}", soft_wrap=True)
    elif args.action == "remove":
        ctx.out.print(f"bitmap {args.name} removed from {show_location(loc)}", soft_wrap=True)
    else:
        ctx.out.print(f"removed from {show_location(loc)}: "
                      f"{', '.join(result['removed']) or 'nothing'}", soft_wrap=True)
    return output.OK


def add_parsers(sub, common) -> None:
    p = sub.add_parser("bitmap", help="a cow volume's dirty bitmaps: list, add, remove, clear")
    bsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (("list", "its bitmaps, as the metadata and the image say together"),
                         ("add", "start a bitmap (tracks every write from now on)"),
                         ("remove", "remove a bitmap (broken or unknown ones too)"),
                         ("clear", "remove every bitmap (the way back from broken ones)")):
        q = bsub.add_parser(action, parents=[common], help=what)
        q.add_argument("location", metavar="DOMAIN/IMAGE/VOLUME")
        if action in ("add", "remove"):
            q.add_argument("name", metavar="NAME")
        if action == "add":
            q.add_argument("--granularity", help="bytes one bit stands for (default 64K)")
        q.set_defaults(func=bitmap)
    p = sub.add_parser("backup", parents=[common],
                       help="back a volume up into a local file, full or incremental "
                            "(again: resume)")
    p.add_argument("src", metavar="SRC", help="DOMAIN/IMAGE/VOLUME")
    p.add_argument("file", metavar="FILE", help="the backup file (made sparse)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="qcow2",
                   help="FILE's format (default qcow2; an incremental backup is qcow2)")
    p.add_argument("--incremental", metavar="BITMAP",
                   help="only what changed since BITMAP began (Bitmap.add, or an earlier "
                        "backup's --checkpoint)")
    p.add_argument("--base", metavar="PREVIOUS",
                   help="with --incremental: the previous backup, FILE's backing file")
    p.add_argument("--checkpoint", metavar="NAME",
                   help="start bitmap NAME in the volume in the same step (the next "
                        "backup's --incremental)")
    p.add_argument("--restart", action="store_true",
                   help="overwrite FILE even if it is not a partial backup of SRC")
    transfers.rate(p)
    p.set_defaults(func=transfers.run(backup))
