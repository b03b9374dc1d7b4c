"""Domains and volumes as a worker sees them: metadata, lease and data file together.

Every function here runs in a worker (storage I/O never runs in the supervisor, so a hung
shared file system can stall a worker, never the agent). The order of each change is what
keeps a crash harmless:
- create: data file first, then the row (a crash in between leaves a file no row names,
  which the next create of that ID reuses; never a row that names no file);
- delete: the row first, then the data file (a crash in between leaves an unnamed file,
  never a named volume without data); the lease file stays (deleting a lock file someone
  may have open is how two processes end up "holding" one lease).
Both under the volume's lease (agent/storage/leases.py); the data file is the format's
(agent/storage/raw.py).
"""

from __future__ import annotations

import os

from agent import errors
from agent.storage import leases, raw
from agent.storage.metadata import DomainDB
from agent.storage.reserve import ensure_reserve

FORMATS = {raw.NAME: raw}


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


def markers_with_leases(db: DomainDB, beat=lambda: None) -> list[dict]:
    """Every copy marker of the domain, with whether its lease is live (start-up recovery)."""
    markers = db.list_markers()
    manager = leases.for_domain(db)
    for m in markers:
        beat()
        m["lease_live"] = bool((manager.probe(m["volume_id"]) or {}).get("live"))
    return markers


def volume_row(db: DomainDB, args: dict) -> dict:
    """The volume's row, checked to belong to the image the caller named."""
    row = db.get_volume(args["volumeID"])
    if row is None or row["image_id"] != args["imageID"]:
        raise errors.NoSuchVolume("no such volume", domainID=args["domainID"],
                                  imageID=args["imageID"], volumeID=args["volumeID"])
    return row


def create(db: DomainDB, args: dict, who: dict) -> dict:
    with leases.for_domain(db).acquire(args["volumeID"], who):
        if db.get_volume(args["volumeID"]) is not None:
            raise errors.VolumeExists("volume exists", volumeID=args["volumeID"])
        db.layout.ensure_image_dir(args["imageID"])
        raw.create(db.layout.volume_path(args["imageID"], args["volumeID"]), args["size"])
        db.create_volume(args["imageID"], args["volumeID"], args["size"])
    return info(db, args)


def delete(db: DomainDB, args: dict, who: dict) -> dict:
    with leases.for_domain(db).acquire(args["volumeID"], who):
        volume_row(db, args)
        db.delete_volume(args["volumeID"])
        raw.remove(db.layout.volume_path(args["imageID"], args["volumeID"]))
        ensure_reserve(db.layout.root)  # given back if this delete needed it: room again now
        return {"volumeID": args["volumeID"], "deleted": True}


def info(db: DomainDB, args: dict) -> dict:
    row = volume_row(db, args)
    probe = leases.for_domain(db).probe(args["volumeID"])
    return {"domainID": db.domain_id, "imageID": row["image_id"], "volumeID": row["volume_id"],
            "size": row["size"], "legality": row["legality"], "generation": row["generation"],
            "path": db.layout.volume_path(row["image_id"], row["volume_id"]),
            "lease": probe if probe and probe.get("host_id") else None}
