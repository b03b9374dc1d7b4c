"""Transfers: a volume written through a writable export (an upload), in a domain's metadata
(DomainDB's part, beside the copy markers of agent/storage/markers.py).

From the answer of a writable export until its finish the volume is ILLEGAL with a transfer
row that any host reads: who serves it (host, task), the client's tag (what it is sending, so
that a second client's upload never passes for the first's resume), and how many bytes its
data file holds (`written`, looked at while the export serves). `begin_transfer` raises the
volume's generation (the fencing token, as a copy's take-over does), so a superseded writer's
metadata writes change nothing; `finish_transfer` makes the volume LEGAL with generation + 1
and its checksum, and drops the row, in one transaction, once the worker has checked what
was written. A transfer that is never finished stays ILLEGAL: exported again to go on, or
deleted. No partial upload ever becomes LEGAL.
"""

from __future__ import annotations

import time

from agent.errors import (
    CopyConflict,
    NoSuchVolume,
    TransferConflict,
    VolumeExists,
    VolumeHasChildren,
)
from agent.ids import check_uuid
from agent.storage.markers import size_checked


class Transfers:
    """DomainDB's transfer methods (it provides tx, db, get_volume, insert_volume, ...)."""

    def get_transfer(self, volume_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM transfers WHERE volume_id = ?",
                                  [check_uuid(volume_id, "volumeID")]))
        return rows[0] if rows else None

    def begin_transfer(self, image_id: str, volume_id: str, *, host_id: str | None,
                       task_id: str | None, tag: str | None = None,
                       create: dict | None = None) -> dict:
        """Make the caller the writer of ``volume_id``: ILLEGAL, generation + 1, a transfer
        row naming it. ``create`` ({size, format}): the volume is new (its data file made by
        the caller first, under the lease): recorded ILLEGAL at generation 0. An existing
        volume must be of ``image_id``, have no children (their guest view would change) and
        no copy in progress; one with a transfer whose tag is not ``tag`` is
        TransferConflict (another client's upload), and `create` of a volume that exists
        without a transfer is VolumeExists."""
        image_id = check_uuid(image_id, "imageID")
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("begin_transfer") as db:
            row = self.get_volume(volume_id)
            now = time.time()
            if row is None:
                if create is None:
                    raise NoSuchVolume("no such volume", imageID=image_id, volumeID=volume_id)
                self.insert_volume(db, image_id, volume_id, size_checked(create["size"]),
                                   "ILLEGAL", create["format"])
                gen, created, size = 0, True, create["size"]
            else:
                if row["image_id"] != image_id:
                    raise NoSuchVolume("no such volume in this image", imageID=image_id,
                                       volumeID=volume_id)
                _check_writable(self, row, tag, create)
                gen, created, size = row["generation"] + 1, False, row["size"]
                db.execute("UPDATE volumes SET legality = 'ILLEGAL', generation = ?,"
                           " checksum = NULL, updated = ? WHERE volume_id = ?",
                           [gen, now, volume_id])
            if self.get_transfer(volume_id) is None:
                db["transfers"].insert({
                    "volume_id": volume_id, "image_id": image_id, "generation": gen,
                    "host_id": host_id, "task_id": task_id, "tag": tag, "state": "open",
                    "size": size, "written": 0, "created_volume": int(created),
                    "attempts": 1, "started": now, "updated": now})
            else:
                db.execute("UPDATE transfers SET generation = ?, host_id = ?, task_id = ?,"
                           " tag = COALESCE(tag, ?), state = 'open', attempts = attempts + 1,"
                           " updated = ? WHERE volume_id = ?",
                           [gen, host_id, task_id, tag, now, volume_id])
            return self.get_transfer(volume_id)

    def touch_transfer(self, volume_id: str, generation: int, written: int,
                       state: str = "open") -> bool:
        """Record what the data file holds now (and the state); False if superseded."""
        with self.tx("touch_transfer") as db:
            cur = db.execute("UPDATE transfers SET written = ?, state = ?, updated = ?"
                             " WHERE volume_id = ? AND generation = ?",
                             [written, state, time.time(), check_uuid(volume_id, "volumeID"),
                              generation])
            return cur.rowcount == 1

    def finish_transfer(self, volume_id: str, generation: int, checksum: str | None) -> bool:
        """The volume LEGAL with generation + 1 and its checksum, the transfer gone, in one
        transaction; False (nothing written) if the transfer is not at ``generation``."""
        volume_id = check_uuid(volume_id, "volumeID")
        with self.tx("finish_transfer") as db:
            t = self.get_transfer(volume_id)
            if t is None or t["generation"] != generation:
                return False
            db.execute("UPDATE volumes SET legality = 'LEGAL', generation = ?, checksum = ?,"
                       " updated = ? WHERE volume_id = ?",
                       [generation + 1, checksum, time.time(), volume_id])
            db.execute("DELETE FROM transfers WHERE volume_id = ?", [volume_id])
            return True


def _check_writable(db, row: dict, tag: str | None, create: dict | None) -> None:
    volume_id = row["volume_id"]
    if db.get_marker(volume_id) is not None:
        raise CopyConflict("the volume has a copy in progress", volumeID=volume_id,
                           reason="copy")
    children = db.children(volume_id)
    if children:
        raise VolumeHasChildren("the volume has snapshots layered on it: only a leaf is "
                                "written", volumeID=volume_id, children=children)
    transfer = db.get_transfer(volume_id)
    if transfer is None:
        if create is not None:
            raise VolumeExists("the volume exists and has no transfer in progress",
                               volumeID=volume_id, legality=row["legality"])
        if row["legality"] != "LEGAL":
            raise CopyConflict("the volume is ILLEGAL", volumeID=volume_id, reason="illegal")
        return
    if create is not None and (create["size"], create["format"]) != (row["size"],
                                                                     row["format"]):
        raise TransferConflict("the volume's transfer in progress is of another size or "
                               "format", volumeID=volume_id, reason="shape", size=row["size"],
                               format=row["format"])
    if transfer["tag"] is not None and tag is not None and transfer["tag"] != tag:
        raise TransferConflict("the volume's transfer in progress is another client's "
                               "(its tag differs)", volumeID=volume_id, reason="tag",
                               tag=transfer["tag"])
