"""`hostagent volume ...` and `hostagent domain ...`: the storage verbs, for people.

A volume is named DOMAIN/IMAGE/VOLUME (three UUIDs). Where a new volume is made (volume
create, the destination of a copy) the trailing parts may be left out, or written `new`:
fresh UUIDs are chosen and printed.
"""

from __future__ import annotations

import os
import uuid

from agent.cli import output
from agent.cli.output import UsageError
from agent.errors import InvalidParams
from agent.ids import check_uuid

PARTS = ("domainID", "imageID", "volumeID")


def parse_location(text: str, fill: bool = False) -> dict:
    parts = text.strip("/").split("/")
    if len(parts) > 3 or (len(parts) < 3 and not fill) or not parts[0]:
        raise UsageError(f"{text!r} is not DOMAIN/IMAGE/VOLUME"
                         + (" (IMAGE and VOLUME may be left out)" if fill else ""))
    parts += ["new"] * (3 - len(parts))
    loc = {}
    for name, part in zip(PARTS, parts):
        if part == "new" and fill and name != "domainID":
            loc[name] = str(uuid.uuid4())
            continue
        loc[name] = _uuid_arg(part, name, f"{name} {part!r} in {text!r}")
    return loc


def _uuid_arg(value: str, field: str, shown: str) -> str:
    """A UUID from the command line, or a usage error that says which argument it was."""
    try:
        return check_uuid(value, field)
    except InvalidParams:
        raise UsageError(f"{shown} is not a UUID") from None


def show_location(loc: dict) -> str:
    return "/".join(loc[p] for p in PARTS)


def _print_volume(ctx, info: dict, title: str) -> None:
    pairs = [("volume", show_location(info)), ("size", f"{output.size(info.get('size'))} "
                                                       f"({info.get('size')} bytes)"),
             *([("format", info["format"]),
                ("allocated", output.size(info.get("allocated"))),
                ("parent", info.get("parent") or "none (a base)"),
                ("children", ", ".join(info.get("children") or []) or "none (the leaf)")]
               if "format" in info else []),
             ("legality", output.styled(info.get("legality"))),
             ("generation", info.get("generation"))]
    if "path" in info:
        pairs.append(("path", info["path"]))
    lease = info.get("lease")
    if lease:
        pairs.append(("lease", f"{'held' if lease.get('live') else 'last held'} by "
                               f"{lease.get('host_id')} pid {lease.get('pid')} "
                               f"(task {lease.get('task_id')})"))
    copy = info.get("copy")
    if copy:
        src = copy.get("source") or {}
        pairs += [("copy", f"{output.styled(copy.get('state'))} from {show_location(src)}"),
                  ("copied", f"{output.size(copy.get('copied'))} of "
                             f"{output.size(copy.get('total'))} ({copy.get('percent')}%)"),
                  ("attempts", copy.get("attempts")),
                  ("copy host", f"{copy.get('host_id')} (task {copy.get('task_id')})"),
                  ("copying now", "yes" if (copy.get("lease") or {}).get("live") else "no")]
        for err in copy.get("errors") or []:
            pairs.append(("error", f"{(err.get('data') or {}).get('name')}: "
                                   f"{err.get('message')}"))
    merge = info.get("merge")
    if merge:
        pairs += [("merge", f"{merge.get('topVolumeID')} into {merge.get('baseVolumeID')}: "
                            f"{merge.get('step')}, {output.styled(merge.get('state'))}"),
                  ("merged", f"{output.size(merge.get('copied'))} of "
                             f"{output.size(merge.get('total'))} ({merge.get('percent')}%)"),
                  ("merging now", "yes" if merge.get("running") else
                   f"no: continue it with hostagent merge "
                   f"{info['domainID']}/{info['imageID']}/{merge.get('topVolumeID')} --wait")]
    ctx.out.print(output.fields(pairs, title), crop=False)


def volume_create(ctx, args) -> int:
    loc = parse_location(args.location, fill=True)
    params = {**loc, "preallocation": args.preallocation}
    if args.size is not None:
        params["size"] = output.parse_size(args.size)
    if args.format:
        params["format"] = args.format
    if args.parent:
        params["parentVolumeID"] = _uuid_arg(args.parent, "parentVolumeID", "--parent")
    info = ctx.calls.call("Volume.create", params)
    if ctx.json:
        output.emit_json(info)
    else:
        _print_volume(ctx, info, "volume created")
    return output.OK


def volume_delete(ctx, args) -> int:
    loc = parse_location(args.location)
    result = ctx.calls.call("Volume.delete", loc)
    if ctx.json:
        output.emit_json(result)
    else:
        ctx.out.print(f"deleted {show_location(loc)}")
    return output.OK


def volume_info(ctx, args) -> int:
    """Volume.getInfo, the copy or merge into it (Image.getStatus), and its image's chain
    as a tree (Image.getInfo)."""
    loc = parse_location(args.location)
    info = ctx.calls.call("Volume.getInfo", loc)
    status = ctx.calls.call("Image.getStatus", loc)
    info["copy"], info["merge"] = status.get("copy"), status.get("merge")
    image = ctx.calls.call("Image.getInfo", {"domainID": loc["domainID"],
                                             "imageID": loc["imageID"]})
    info["chains"] = [[v["volumeID"] for v in c] for c in image.get("chains") or []]
    if ctx.json:
        output.emit_json(info)
        return output.OK
    _print_volume(ctx, info, None)
    ctx.out.print(chain_tree(image, loc["volumeID"]), crop=False)
    return output.OK


def chain_tree(image: dict, mark: str | None = None):
    """The image's volumes as a tree, base at the root, each child under its parent."""
    from rich.tree import Tree
    by_id = {v["volumeID"]: v for c in image.get("chains") or [] for v in c}
    merging = {m["topVolumeID"]: m for m in image.get("merges") or []}

    def label(v: dict) -> str:
        text = (f"{v['volumeID']}  {v['format']}  {output.size(v['size'])}  "
                f"{output.size(v.get('allocated'))} allocated  "
                f"{output.styled(v['legality'])}")
        if v["volumeID"] in merging:
            m = merging[v["volumeID"]]
            text += f"  (merging into its parent: {m['step']}, {m['percent']}%)"
        return f"[bold]{text}[/] <" if v["volumeID"] == mark else text
    tree = Tree(f"image {image.get('imageID')}")
    nodes = {}
    pending = [v for v in by_id.values() if v["parent"] is None or v["parent"] not in by_id]
    while pending:
        v = pending.pop(0)
        parent = nodes.get(v["parent"], tree)
        nodes[v["volumeID"]] = parent.add(label(v))
        pending += [by_id[c] for c in v.get("children") or [] if c in by_id]
    return tree


def volume_extend(ctx, args) -> int:
    loc = parse_location(args.location)
    params = {**loc, "size": output.parse_size(args.size)}
    if args.preallocation:
        params["preallocation"] = args.preallocation
    result = ctx.calls.call("Volume.extend", params)
    if ctx.json:
        output.emit_json(result)
    elif result.get("extended"):
        ctx.out.print(f"{show_location(loc)} is now {output.size(result['size'])} "
                      f"(generation {result['generation']})", soft_wrap=True)
    else:
        ctx.out.print(f"{show_location(loc)} is {output.size(result['size'])} already",
                      soft_wrap=True)
    return output.OK


def volume_measure(ctx, args) -> int:
    loc = parse_location(args.location)
    params = {**loc, **({"format": args.format} if args.format else {})}
    result = ctx.calls.call("Volume.measure", params)
    if ctx.json:
        output.emit_json(result)
    else:
        ctx.out.print(output.fields([
            ("volume", show_location(loc)), ("as", result.get("format")),
            ("size", output.size(result.get("size"))),
            ("a copy needs", output.size(result.get("required"))),
            ("preallocated", output.size(result.get("fully_allocated")))], None), crop=False)
    return output.OK


def _print_domain(ctx, info: dict, title: str | None) -> None:
    ctx.out.print(output.fields([
        ("domain", info.get("domainID")), ("path", info.get("path")),
        ("capacity", output.size(info.get("capacity"))), ("free", output.size(info.get("free"))),
        ("volumes", info.get("volumes")), ("copies in progress", info.get("copies"))], title),
        crop=False)


def domain_create(ctx, args) -> int:
    domain_id = _uuid_arg(args.id or str(uuid.uuid4()), "domainID", f"--id {args.id!r}")
    return _show_domain(ctx, ctx.calls.call("StorageDomain.create", {
        "domainID": domain_id, "path": os.path.abspath(args.path)}), "domain created")


def domain_attach(ctx, args) -> int:
    domain_id = _uuid_arg(args.domain, "domainID", repr(args.domain))
    return _show_domain(ctx, ctx.calls.call("StorageDomain.attach", {
        "domainID": domain_id, "path": os.path.abspath(args.path)}), "domain attached")


def domain_info(ctx, args) -> int:
    domain_id = _uuid_arg(args.domain, "domainID", repr(args.domain))
    return _show_domain(ctx, ctx.calls.call("StorageDomain.getInfo", {"domainID": domain_id}),
                        None)


def _show_domain(ctx, info: dict, title: str | None) -> int:
    if ctx.json:
        output.emit_json(info)
    else:
        _print_domain(ctx, info, title)
    return output.OK


def domain_list(ctx, args) -> int:
    domains = ctx.calls.call("StorageDomain.list")
    if ctx.json:
        output.emit_json(domains)
        return output.OK
    t = output.table("DOMAIN", "PATH", "ATTACHED BY", "LOCKSPACE")
    for d in domains:
        t.add_row(d.get("domainID"), d.get("path"), d.get("attached_by"),
                  output.styled(d.get("lockspace") or "-"))
    ctx.out.print(t if domains else "no domain attached")
    return output.OK


def add_parsers(sub, common) -> None:
    p = sub.add_parser("volume", help="create, delete or inspect a volume")
    vsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = vsub.add_parser("create", parents=[common],
                        help="create a volume (raw or cow), or a snapshot of an image's leaf")
    q.add_argument("location", metavar="DOMAIN[/IMAGE[/VOLUME]]",
                   help="where; left-out or `new` parts get fresh UUIDs")
    q.add_argument("size", nargs="?", help="bytes, or with a binary unit: 512M, 1G "
                                           "(a snapshot: its parent's by default)")
    q.add_argument("--format", choices=("raw", "cow"), help="raw (default) or cow (qcow2)")
    q.add_argument("--preallocation", choices=("sparse", "preallocated"), default="sparse")
    q.add_argument("--parent", metavar="VOLUME",
                   help="make a snapshot layered on this volume (the image's leaf)")
    q.set_defaults(func=volume_create)
    q = vsub.add_parser("delete", parents=[common], help="delete a volume")
    q.add_argument("location", metavar="DOMAIN/IMAGE/VOLUME")
    q.set_defaults(func=volume_delete)
    q = vsub.add_parser("info", parents=[common],
                        help="a volume's size, legality, lease, any copy or merge into it, "
                             "and its image's chain as a tree")
    q.add_argument("location", metavar="DOMAIN/IMAGE/VOLUME")
    q.set_defaults(func=volume_info)
    q = vsub.add_parser("extend", parents=[common],
                        help="grow a volume with no snapshots on it (a leaf)")
    q.add_argument("location", metavar="DOMAIN/IMAGE/VOLUME")
    q.add_argument("size", help="the new size: bytes, or with a binary unit: 512M, 1G")
    q.add_argument("--preallocation", choices=("sparse", "preallocated"),
                   help="of the new range (default: as the volume is)")
    q.set_defaults(func=volume_extend)
    q = vsub.add_parser("measure", parents=[common],
                        help="what a copy of a volume's guest view needs in a format")
    q.add_argument("location", metavar="DOMAIN/IMAGE/VOLUME")
    q.add_argument("--format", choices=("raw", "cow"), help="default: the volume's")
    q.set_defaults(func=volume_measure)

    p = sub.add_parser("domain", help="create, attach, inspect or list storage domains")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = dsub.add_parser("create", parents=[common],
                        help="format an empty directory as a domain and attach it")
    q.add_argument("path")
    q.add_argument("--id", help="the domain's UUID (default: a new one)")
    q.set_defaults(func=domain_create)
    q = dsub.add_parser("attach", parents=[common], help="attach an existing domain")
    q.add_argument("domain", metavar="DOMAIN_ID")
    q.add_argument("path")
    q.set_defaults(func=domain_attach)
    q = dsub.add_parser("info", parents=[common], help="capacity, free space, volumes")
    q.add_argument("domain", metavar="DOMAIN_ID")
    q.set_defaults(func=domain_info)
    q = dsub.add_parser("list", parents=[common], help="the domains this agent attached")
    q.set_defaults(func=domain_list)
