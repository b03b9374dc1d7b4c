"""Domains and volumes as a worker sees them: metadata, lease and data file together.

Every function here runs in a worker (storage I/O never runs in the supervisor, so a hung
shared file system can stall a worker, never the agent). The order of each change is what
keeps a crash harmless:
- create: data file first, then the row (a crash in between leaves a file no row names,
  which the next create of that ID reuses; never a row that names no file);
- delete: the row first, then the data file (a crash in between leaves an unnamed file,
  never a named volume without data); the lease file stays (deleting a lock file someone
  may have open is how two processes end up "holding" one lease).
Both under the volume's lease (agent/storage/leases/); the data file is the format's
(agent/storage/formats/). A snapshot (a cow volume with a parent) is layered on its image's
leaf; a volume with children cannot be deleted (VolumeHasChildren).
"""

from __future__ import annotations

import contextlib
import os

from agent import errors
from agent.ids import check_uuid
from agent.storage import chain, leases, tracking
from agent.storage.formats import cow, raw
from agent.storage.layout import SUFFIXES
from agent.storage.metadata import DomainDB
from agent.storage.reserve import ensure_reserve

FORMATS = {raw.NAME: raw, cow.NAME: cow}


def holder(host_id: str, task_id: str, op: str) -> dict:
    """Who holds a lease: written in it, so a probe from any host can say."""
    return {"host_id": host_id, "task_id": task_id, "pid": os.getpid(), "op": op}


def open_domain(args: dict) -> DomainDB:
    return DomainDB.open(args["path"], args["domainID"])


def domain_info(db: DomainDB, path: str) -> dict:
    st = os.statvfs(path)
    return {"domainID": db.domain_id, "path": path, "capacity": st.f_blocks * st.f_frsize,
            "free": st.f_bavail * st.f_frsize, "volumes": db.volume_count(),
            "copies": len(db.list_markers())}


def _with_leases(db: DomainDB, rows: list[dict], beat) -> list[dict]:
    """Each row (a copy marker, a merge) with whether the lease of its volume is live."""
    manager = leases.for_domain(db)
    for row in rows:
        beat()
        row["lease_live"] = bool((manager.probe(row["volume_id"]) or {}).get("live"))
    return rows


def markers_with_leases(db: DomainDB, beat=lambda: None) -> list[dict]:
    """Every copy marker of the domain, with whether its lease is live (start-up recovery)."""
    markers = _with_leases(db, db.list_markers(), beat)
    for m in markers:
        m["has_children"] = bool(db.children(m["volume_id"]))
    return markers


def merges_with_leases(db: DomainDB, beat=lambda: None) -> list[dict]:
    """Every merge of the domain, with whether its lease (its base's) is live."""
    return _with_leases(db, db.list_merges(), beat)


def volume_row(db: DomainDB, args: dict) -> dict:
    """The volume's row, checked to belong to the image the caller named."""
    row = db.get_volume(args["volumeID"])
    if row is None or row["image_id"] != args["imageID"]:
        raise errors.NoSuchVolume("no such volume", domainID=args["domainID"],
                                  imageID=args["imageID"], volumeID=args["volumeID"])
    return row


def create(db: DomainDB, args: dict, who: dict, beat=lambda: None) -> dict:
    fmt, parent_id = args.get("format", "raw"), args.get("parentVolumeID")
    with leases.for_domain(db).acquire(args["volumeID"], who):
        if db.get_volume(args["volumeID"]) is not None:
            raise errors.VolumeExists("volume exists", volumeID=args["volumeID"])
        parent, size = None, args.get("size")
        if parent_id is not None:  # checked again in the row's transaction, which decides
            if size is None:
                size = (db.get_volume(parent_id) or {}).get("size", 0)
            parent = db.check_new_parent(args["imageID"], parent_id, size)
            if size % chain.SECTOR:
                raise errors.InvalidParams(f"a snapshot's size is a multiple of "
                                           f"{chain.SECTOR} bytes (its parent's is not)",
                                           param="size", parent_size=parent["size"])
            chain.inspect(db.layout, db.chain(parent_id), beat)  # a child never hides a bad one
        db.layout.ensure_image_dir(args["imageID"])
        path = db.layout.volume_path(args["imageID"], args["volumeID"], fmt)
        remove_leftovers(db, args["imageID"], args["volumeID"], beat)
        try:
            FORMATS[fmt].create(path, size, args.get("preallocation", "sparse"),
                                parent=parent, beat=beat)
            child = {"image_id": args["imageID"], "volume_id": args["volumeID"], "format": fmt}
            carried = _continue_bitmaps(db, parent, child, beat) if parent else []
        except errors.AgentError:
            FORMATS[fmt].remove(path, beat)  # a preallocation cut short keeps no space
            raise
        try:
            db.create_volume(args["imageID"], args["volumeID"], size, fmt, parent_id,
                             args.get("preallocation", "sparse"), bitmaps=carried)
        except errors.AgentError:
            FORMATS[fmt].remove(path, beat)  # lost a race (a sibling snapshot, a parent gone)
            raise
    return info(db, args)


def _continue_bitmaps(db: DomainDB, parent: dict, child: dict, beat) -> list[dict]:
    """A snapshot's file gets the parent's usable dirty bitmaps, empty and enabled, so that
    tracking goes on in the new leaf (its rows are written with the volume's); a broken one
    is not continued (the chain then says so: agent/storage/tracking.py)."""
    if parent["format"] != "cow":
        return []
    rows = tracking.ok_rows(db, parent)
    for r in rows:
        tracking.add(tracking.layer_opts(db.layout, child), db.layout.data_path(child),
                     r["name"], r["granularity"], beat)
    return [{"name": r["name"], "granularity": r["granularity"], "continues": True}
            for r in rows]


def remove_leftovers(db: DomainDB, image_id: str, volume_id: str,
                     beat=lambda: None) -> list[str]:
    """Data files of `volume_id` that no row names (a create killed between its file and its
    row), in any format: removed (`beat`: formats.raw.remove's). Called under the volume's
    lease, with no row for it."""
    gone = []
    for fmt, module in FORMATS.items():
        path = db.layout.volume_path(image_id, volume_id, fmt)
        if os.path.lexists(path):
            module.remove(path, beat)
            gone.append(fmt)
    return gone


def sweep_leftovers(db: DomainDB, who: dict, beat=lambda: None) -> list[dict]:
    """Every data file no row names (a create killed between its file and its row, in any
    image, in either format), removed under its volume's lease: a create in progress holds
    that lease, so what is swept is never another's work. What was removed, as {imageID,
    volumeID, format}. One query for the whole domain, then one per leftover."""
    fmt_of = {suffix: fmt for fmt, suffix in SUFFIXES.items()}
    named = db.data_files()
    found = []
    with contextlib.suppress(FileNotFoundError):
        for image_id in sorted(os.listdir(db.layout.images_dir)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in sorted(os.listdir(os.path.join(db.layout.images_dir, image_id))):
                    stem, suffix = os.path.splitext(name)
                    key = (image_id, stem, fmt_of.get(suffix))
                    if key[2] and key not in named and _is_uuid(stem) and _is_uuid(image_id):
                        found.append(key)
    removed = []
    manager = leases.for_domain(db)
    for image_id, volume_id, fmt in found:
        beat()
        try:
            with manager.acquire(volume_id, who):
                row = db.get_volume(volume_id)  # under the lease: nobody creates it now
                if row and (row["image_id"], row["format"]) == (image_id, fmt):
                    continue  # made meanwhile: its file
                FORMATS[fmt].remove(db.layout.volume_path(image_id, volume_id, fmt), beat)
                removed.append({"imageID": image_id, "volumeID": volume_id, "format": fmt})
        except errors.LeaseHeld:
            continue  # being created or written right now: its holder decides
    return removed


def _is_uuid(text: str) -> bool:
    try:
        check_uuid(text, "id")
        return True
    except errors.InvalidParams:
        return False


def delete(db: DomainDB, args: dict, who: dict, beat=lambda: None) -> dict:
    with leases.for_domain(db).acquire(args["volumeID"], who):
        if db.get_volume(args["volumeID"]) is None:  # no such volume; what a killed create left
            removed = remove_leftovers(db, args["imageID"], args["volumeID"], beat)
            if removed:
                raise errors.NoSuchVolume("no such volume (a data file a killed create left "
                                          "was removed)", domainID=args["domainID"],
                                          imageID=args["imageID"], volumeID=args["volumeID"],
                                          removed_leftover=removed)
        row = volume_row(db, args)
        db.delete_volume(args["volumeID"])
        FORMATS[row["format"]].remove(db.layout.data_path(row), beat)
        ensure_reserve(db.layout.root)  # given back if this delete needed it: room again now
        return {"volumeID": args["volumeID"], "deleted": True}


def allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def describe(db: DomainDB, row: dict) -> dict:
    """A volume as Volume.getInfo and Image.getInfo show it."""
    children = db.children(row["volume_id"])
    path = db.layout.data_path(row)
    return {"domainID": db.domain_id, "imageID": row["image_id"], "volumeID": row["volume_id"],
            "format": row["format"], "size": row["size"], "allocated": allocated(path),
            "legality": row["legality"], "generation": row["generation"],
            "parent": row["parent_id"], "children": children, "leaf": not children,
            "path": path}


def info(db: DomainDB, args: dict) -> dict:
    out = describe(db, volume_row(db, args))
    probe = leases.for_domain(db).probe(args["volumeID"])
    out["lease"] = probe if probe and probe.get("host_id") else None
    out["transfer"] = transfer_status(db, args["volumeID"], probe)
    return out


def transfer_status(db: DomainDB, volume_id: str, probe: dict | None = None) -> dict | None:
    """A transfer into the volume as any host sees it, or None. state: serving (its
    export's lease is live), stopped (its export ended; export it again or finish it), or
    interrupted (recorded as serving, but nobody holds its lease: its writer died)."""
    t = db.get_transfer(volume_id)
    if t is None:
        return None
    if probe is None:
        probe = leases.for_domain(db).probe(volume_id)
    live = bool((probe or {}).get("live"))
    state = "serving" if live and t["state"] == "open" else (
        "stopped" if t["state"] == "stopped" else "interrupted")
    return {"state": state, "generation": t["generation"], "host_id": t["host_id"],
            "task_id": t["task_id"], "tag": t["tag"], "written": t["written"],
            "size": t["size"], "attempts": t["attempts"], "created_volume":
            bool(t["created_volume"]), "started": t["started"], "updated": t["updated"],
            "lease": probe if probe and probe.get("host_id") else None}


def image_info(db: DomainDB, args: dict) -> dict:
    """An image's volumes as chains, base first (a linear chain has one)."""
    rows = db.image_volumes(args["imageID"])
    if not rows:
        raise errors.NoSuchVolume("no volumes in this image", domainID=args["domainID"],
                                  imageID=args["imageID"])
    leaves = [r for r in rows if not db.children(r["volume_id"])]
    chains = [[describe(db, r) for r in db.chain(leaf["volume_id"])] for leaf in leaves]
    return {"domainID": db.domain_id, "imageID": args["imageID"],
            "chain": chains[0] if len(chains) == 1 else None, "chains": chains}
