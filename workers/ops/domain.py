"""StorageDomain operations: format, attach, inspect, and scan for leftover copies."""

from __future__ import annotations

import contextlib

from agent import errors
from agent.storage import leases, volumes
from agent.storage.metadata import DomainDB


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


def create(ctx, args):
    with _the_path_given(), DomainDB.format(args["path"], args["domainID"]) as db:
        return volumes.domain_info(db, args["path"])


def attach(ctx, args):
    with _the_path_given(), volumes.open_domain(args) as db:
        return volumes.domain_info(db, args["path"])


def info(ctx, args):
    with volumes.open_domain(args) as db:
        return volumes.domain_info(db, args["path"])


def scan(ctx, args):
    """Every copy marker and merge of the domain with whether its lease is live (start-up
    recovery), and the data files no row names (a killed create's) removed."""
    with volumes.open_domain(args) as db:
        swept = volumes.sweep_leftovers(db, volumes.holder(ctx.host_id, ctx.task_id, "sweep"),
                                        ctx.beat)
        return {"domainID": db.domain_id, "markers": volumes.markers_with_leases(db, ctx.beat),
                "merges": volumes.merges_with_leases(db, ctx.beat),
                "leftovers_removed": swept}


def join(ctx, args):
    """Join the domain's lockspace with this host's ID (sanlock); at once if it is joined
    already (an agent restart does not restart sanlock) or the manager is local."""
    with volumes.open_domain(args) as db:
        manager = leases.for_domain(db)
        if manager.name != "sanlock":
            return {"domainID": db.domain_id, "manager": manager.name}
        return {"domainID": db.domain_id, "manager": manager.name,
                **manager.join(beat=ctx.check)}
