"""A backup's export (Export.start with `bitmap` or `checkpoint`): what changed since a
bitmap began, served beside the guest view, and the next bitmap started in the same step.

Under the volume's lease (no transfer, merge or bitmap change of it runs meanwhile):
  1. the bitmap is checked in every layer it spans (tracking.layers): a broken or missing
     one is refused, never served;
  2. the checkpoint is added to the volume (a new bitmap; one that exists ok is kept);
  3. the bitmap's union over those layers is made in a private qcow2 overlay (in the
     export's own directory under the agent's run dir, removed with it; a killed worker's
     is swept at the next start-up), on top of the chain. A bitmap the leaf alone holds
     (it began in the leaf: no snapshot since) is served from the leaf itself, as qemu
     loaded it when it opened the chain: the overlay's three qemu-img runs cost 40 ms of a
     backup's start (docs/performance.md), for a copy of the same bits.
A guest write before step 2 is in the bitmap, and so in this backup; one after it is in
the checkpoint, and so in the next: none falls between two backups (one may be in both).
"""

from __future__ import annotations

import contextlib
import os
import shutil

from agent import errors
from agent.storage import chain, leases, qemu_img, qemu_nbd, tracking
from workers.ops.volume import holder


@contextlib.contextmanager
def prepared(ctx, db, args: dict, rows: list[dict]):
    """The image-opts of the backup's export (its overlay, if it serves a bitmap), built
    as the module says; the overlay removed when the export ends."""
    name, checkpoint = args.get("bitmap"), args.get("checkpoint")
    row = rows[-1]
    folder = None
    try:
        with leases.for_domain(db).acquire(row["volume_id"], holder(ctx, "backup")):
            parts = tracking.layers(db, rows, name) if name else []
            if checkpoint:
                _checkpoint(ctx, db, row, checkpoint)
            overlay = None
            if len(parts) > 1:
                folder = qemu_nbd.new_dir()
                overlay = os.path.join(folder, "bitmap.qcow2")
                qemu_img.create(overlay, "cow", row["size"], beat=ctx.beat)
                tracking.merge_chain(db.layout, parts, name, tracking.file_opts(overlay),
                                     overlay, name, ctx.beat)
        # Served without the lease, as every read export is.
        yield chain.image_opts(db.layout, rows, direct=False, overlay=overlay)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _checkpoint(ctx, db, row: dict, name: str) -> None:
    """The new bitmap, in the leaf, as Bitmap.add starts one (one that exists ok stands:
    this backup asked again)."""
    vid = row["volume_id"]
    if row["format"] != "cow":
        raise errors.BitmapsUnsupported("a raw volume has no dirty bitmaps", volumeID=vid,
                                        format=row["format"])
    if db.children(vid):
        raise errors.VolumeHasChildren("a checkpoint starts in the chain's leaf (the layer "
                                       "a guest writes)", volumeID=vid)
    tracking.start(db, row, name, tracking.GRANULARITY, ctx.beat)
