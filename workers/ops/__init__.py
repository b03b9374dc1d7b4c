"""The ops a worker can run, by name: only the functions listed here can ever run.

Importing this module imports every op's module: the fork server does it once, so a forked
worker imports nothing (workers/forkserver.py).
"""

from __future__ import annotations

from workers.ops import bitmap, debug, domain, export, image, merge, operation, volume

OPS = {
    "debug.sleep": debug.sleep,
    "domain.create": domain.create,
    "domain.attach": domain.attach,
    "domain.info": domain.info,
    "domain.scan": domain.scan,
    "domain.join": domain.join,
    "volume.create": volume.create,
    "volume.delete": volume.delete,
    "volume.info": volume.info,
    "volume.fence": volume.fence,
    "volume.extend": volume.extend,
    "volume.measure": volume.measure,
    "bitmap.add": bitmap.add,
    "bitmap.remove": bitmap.remove,
    "bitmap.clear": bitmap.clear,
    "bitmap.list": bitmap.list_,
    "image.info": image.info,
    "image.copy": image.copy,
    "image.status": image.status,
    "image.abandon": image.abandon,
    "image.merge": merge.merge,
    "image.merge_abandon": merge.abandon,
    "image.checksum": export.image_checksum,
    "export.start": export.start,
    "export.finish": export.finish,
    "scrub.start": operation.start,
    "operation.statuses": operation.statuses,
    "operation.stop": operation.stop,
}


def get(name: str):
    return OPS[name]
