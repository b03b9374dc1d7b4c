"""Storage domain and volume operations, run in a worker: all storage I/O stays out of the
supervisor, so a hung shared file system can stall a worker but never the agent."""

from __future__ import annotations

import contextlib
import os

from agent import errors
from agent.storage import lease
from agent.storage.layout import fsync_dir
from agent.storage.metadata import DomainDB, ensure_reserve


def holder(ctx, op: str) -> dict:
    return {"host_id": ctx.host_id, "task_id": ctx.task_id, "pid": os.getpid(), "op": op}


def domain_info(db: DomainDB, path: str) -> dict:
    st = os.statvfs(path)
    return {"domainID": db.domain_id, "path": path, "capacity": st.f_blocks * st.f_frsize,
            "free": st.f_bavail * st.f_frsize, "volumes": db.volume_count(),
            "copies": len(db.list_markers())}


def open_domain(args: dict) -> DomainDB:
    return DomainDB.open(args["path"], args["domainID"])


def volume_row(db: DomainDB, args: dict) -> dict:
    """The volume's row, checked to belong to the image the caller named."""
    row = db.get_volume(args["volumeID"])
    if row is None or row["image_id"] != args["imageID"]:
        raise errors.NoSuchVolume("no such volume", domainID=args["domainID"],
                                  imageID=args["imageID"], volumeID=args["volumeID"])
    return row


@contextlib.contextmanager
def _the_path_given():
    """Errors about a domain's directory are about the `path` the client gave."""
    try:
        yield
    except OSError as exc:
        raise errors.from_os_error(exc, "cannot use the domain's directory", "path") from None
    except errors.InvalidParams as exc:
        if exc.data.get("field") == "root":
            del exc.data["field"]
            exc.data["param"] = "path"
        raise


def domain_create(ctx, args):
    with _the_path_given(), DomainDB.format(args["path"], args["domainID"]) as db:
        return domain_info(db, args["path"])


def domain_attach(ctx, args):
    with _the_path_given(), open_domain(args) as db:
        return domain_info(db, args["path"])


def domain_info_op(ctx, args):
    with open_domain(args) as db:
        return domain_info(db, args["path"])


def domain_scan(ctx, args):
    """Every copy marker of the domain with whether its lease is live (start-up recovery)."""
    with open_domain(args) as db:
        markers = db.list_markers()
        for m in markers:
            ctx.beat()
            probe = lease.probe(db.layout.lease_path(m["volume_id"])) or {}
            m["lease_live"] = bool(probe.get("live"))
        return {"domainID": db.domain_id, "markers": markers}


def volume_create(ctx, args):
    with open_domain(args) as db:
        with lease.acquire(db.layout.lease_path(args["volumeID"]), holder(ctx, "create")):
            _create_volume(db, args)
        return volume_info(db, args)


def _create_volume(db: DomainDB, args: dict) -> None:
    if db.get_volume(args["volumeID"]) is not None:
        raise errors.VolumeExists("volume exists", volumeID=args["volumeID"])
    # Data first, then the row: a crash in between leaves a file no row names, which the
    # next create of that ID reuses; never a row that names no file.
    db.layout.ensure_image_dir(args["imageID"])
    path = db.layout.volume_path(args["imageID"], args["volumeID"])
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, args["size"])
        os.fsync(fd)
    except OSError as exc:
        # EFBIG: larger than this file system allows: the size asked for, not a full disk.
        raise errors.from_os_error(exc, "cannot size the volume", "size") from None
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))
    db.create_volume(args["imageID"], args["volumeID"], args["size"])


def volume_delete(ctx, args):
    with open_domain(args) as db, \
            lease.acquire(db.layout.lease_path(args["volumeID"]), holder(ctx, "delete")):
        volume_row(db, args)
        # The row first: a crash before the unlink leaves an unnamed file, never a named
        # volume without data. The lease file stays: deleting a lock file that someone may
        # have open is how two processes end up "holding" one lease.
        db.delete_volume(args["volumeID"])
        path = db.layout.volume_path(args["imageID"], args["volumeID"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fsync_dir(os.path.dirname(path))
        ensure_reserve(db.layout.root)  # given back if this delete needed it: room again now
        return {"volumeID": args["volumeID"], "deleted": True}


def volume_info(db: DomainDB, args: dict) -> dict:
    row = volume_row(db, args)
    probe = lease.probe(db.layout.lease_path(args["volumeID"]))
    return {"domainID": db.domain_id, "imageID": row["image_id"], "volumeID": row["volume_id"],
            "size": row["size"], "legality": row["legality"], "generation": row["generation"],
            "path": db.layout.volume_path(row["image_id"], row["volume_id"]),
            "lease": probe if probe and probe.get("host_id") else None}


def volume_info_op(ctx, args):
    with open_domain(args) as db:
        return volume_info(db, args)
