"""The operations a worker can run, by name. Only names listed here can ever run."""

from __future__ import annotations

import importlib

OPS = {
    "debug.sleep": "workers.ops.debug:sleep",
    "domain.create": "workers.ops.domain:create",
    "domain.attach": "workers.ops.domain:attach",
    "domain.info": "workers.ops.domain:info",
    "domain.scan": "workers.ops.domain:scan",
    "domain.join": "workers.ops.domain:join",
    "volume.create": "workers.ops.volume:create",
    "volume.delete": "workers.ops.volume:delete",
    "volume.info": "workers.ops.volume:info",
    "volume.fence": "workers.ops.volume:fence",
    "image.info": "workers.ops.volume:image_info",
    "image.copy": "workers.ops.copy:copy",
    "image.status": "workers.ops.copy:status",
    "image.abandon": "workers.ops.copy:abandon",
    "scrub.start": "workers.ops.operation:start",
    "operation.statuses": "workers.ops.operation:statuses",
    "operation.stop": "workers.ops.operation:stop",
}


def get(name: str):
    module, func = OPS[name].split(":")
    return getattr(importlib.import_module(module), func)


def preload() -> None:
    """Import every operation's module (the fork server does this once)."""
    for name in OPS:
        get(name)
