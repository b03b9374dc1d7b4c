"""Merges: a snapshot folded into its parent, in a domain's metadata (DomainDB's part, beside
the copy markers of agent/storage/markers.py and the transfers of agent/storage/transfers.py).

A merge of `top` into `base` (top's parent) is one row of `merges`, keyed by base: the volume
it writes, whose lease is the merge's and whose generation is its fencing token (as a copy
marker's is its destination's). Its steps, each recorded before the next begins:

    commit      base grown to top's size if smaller; top's own extents written into base,
                `copied` checkpointed after a flush (a resumed merge goes on from there)
    committed   base holds top's guest view; its checksum recorded in the row
    repointed   top's child (if any) backs onto base: its header first, then its row
    (gone)      one transaction: top's row deleted, base LEGAL with generation + 1 and the
                checksum, the row gone, a `merged` record left; then top's file is removed

A top with no child (the leaf) has nothing to re-point: its commit's end is that last
transaction, with the checksum, and no step between is recorded.

begin_merge makes base and top ILLEGAL (each generation + 1) with the row, in one
transaction: from then on neither is read, copied, snapshotted, written or deleted by
anyone but the merge, and top's child reads as it did (its chain's data is not changed by
any step, only moved). The `merged` records say what became of a merged top, so a merge
asked again after its answer was lost is answered done, not NoSuchVolume.
"""

from __future__ import annotations

import json
import time

from agent.errors import (
    GenerationMismatch,
    InvalidParams,
    NoSuchVolume,
    VolumeHasChildren,
    VolumeIllegal,
    VolumeInUse,
)
from agent.ids import check_uuid
from agent.storage.markers import count_errors, expected_generation, with_errors

RETAIN_MERGED = 1000  # merged records kept per domain (what a late retry is answered from)


def _decoded(row) -> dict | None:
    if row is None:
        return None
    row = dict(row)
    row["errors"] = json.loads(row["errors"])
    return row


class Merges:
    """DomainDB's merge methods (it provides tx, db, get_volume, get_marker, children, ...)."""

    def get_merge(self, base_id: str, generation: int | None = None) -> dict | None:
        """The merge into ``base_id`` (at that ``generation``, if given), or None."""
        sql, args = "SELECT * FROM merges WHERE volume_id = ?", [check_uuid(base_id, "volumeID")]
        if generation is not None:
            sql, args = sql + " AND generation = ?", args + [generation]
        rows = list(self.db.query(sql, args))
        return _decoded(rows[0]) if rows else None

    def merge_of(self, volume_id: str) -> dict | None:
        """The merge in progress that `volume_id` is the base, top or top's child of."""
        rows = list(self.db.query("SELECT * FROM merges WHERE volume_id = ? OR top_id = ?"
                                  " OR child_id = ?", [volume_id] * 3))
        return _decoded(rows[0]) if rows else None

    def list_merges(self, image_id: str | None = None) -> list[dict]:
        if image_id is None:
            return [_decoded(r) for r in self.db.query("SELECT * FROM merges ORDER BY started")]
        return [_decoded(r) for r in self.db.query(
            "SELECT * FROM merges WHERE image_id = ? ORDER BY started", [image_id])]

    def get_merged(self, top_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM merged WHERE top_id = ?",
                                  [check_uuid(top_id, "volumeID")]))
        return rows[0] if rows else None

    def begin_merge(self, image_id: str, base_id: str, top_id: str, host_id: str | None,
                    task_id: str | None) -> dict:
        """Record a merge of ``top_id`` into ``base_id``: both ILLEGAL with generation + 1
        and the row (step commit), in one transaction. Top must be base's child, both LEGAL,
        of ``image_id``, neither a copy's destination nor in a transfer or another merge."""
        with self.tx("begin_merge") as db:
            base, top = self.mergeable(image_id, base_id, top_id)
            children = self.children(top_id)
            if len(children) > 1:  # chains are linear; a fork is metadata damaged
                raise VolumeHasChildren("the top has more than one child", volumeID=top_id,
                                        children=children)
            now = time.time()
            for row in (base, top):
                db.execute("UPDATE volumes SET legality = 'ILLEGAL', generation = ?,"
                           " updated = ? WHERE volume_id = ?",
                           [row["generation"] + 1, now, row["volume_id"]])
            db["merges"].insert({
                "volume_id": base_id, "image_id": image_id, "top_id": top_id,
                "child_id": children[0] if children else None,
                "generation": base["generation"] + 1, "host_id": host_id, "task_id": task_id,
                "state": "merging", "step": "commit", "copied": 0, "size": top["size"],
                "base_size": base["size"], "checksum": None, "attempts": 1, "failures": 0,
                "errors": "[]", "started": now, "updated": now})
            return self.get_merge(base_id)

    def mergeable(self, image_id: str, base_id: str, top_id: str) -> tuple[dict, dict]:
        """(base, top) rows, or the named error that forbids merging them (inside a tx)."""
        base, top = self.get_volume(base_id), self.get_volume(top_id)
        for vid, row in ((base_id, base), (top_id, top)):
            if row is None or row["image_id"] != image_id:
                raise NoSuchVolume("no such volume in this image", imageID=image_id,
                                   volumeID=vid)
        if top["parent_id"] != base_id:
            raise InvalidParams("top is not base's child: a merge folds a snapshot into its "
                                "parent", param="topVolumeID", parent=top["parent_id"])
        for row in (base, top):
            vid = row["volume_id"]
            busy = self.merge_of(vid)
            if busy is not None:
                raise VolumeInUse("the volume is in another merge", volumeID=vid,
                                  reason="merge", base=busy["volume_id"], top=busy["top_id"])
            if self.get_marker(vid) is not None:
                raise VolumeInUse("the volume is a copy's destination", volumeID=vid,
                                  reason="copy-destination")
            if self.get_transfer(vid) is not None:
                raise VolumeInUse("the volume has a transfer in progress", volumeID=vid,
                                  reason="transfer")
            if row["legality"] != "LEGAL":
                raise VolumeIllegal("the volume is not LEGAL", volumeID=vid)
        return base, top

    def take_over_merge(self, base_id: str, host_id: str | None, task_id: str | None,
                        expect_generation: int | None = None, restart: bool = False,
                        failed_tasks: list | None = None,
                        previous_errors: list | None = None) -> dict:
        """Make the caller the merger (generation + 1 of base and row, attempts + 1);
        ``restart`` sets `copied` back to 0 if the commit is not done. As take_over of a copy:
        GenerationMismatch if there is no merge or it is not at ``expect_generation`` (nor one
        raised by ``failed_tasks`` since); ``previous_errors`` counted in the same transaction."""
        with self.tx("take_over_merge") as db:
            merge = self.get_merge(base_id)
            expected = None if merge is None else expected_generation(
                merge, expect_generation, host_id, failed_tasks)
            if merge is None or (expected is not None and merge["generation"] != expected):
                raise GenerationMismatch("the merge ended or changed hands", volumeID=base_id,
                                         expected=expect_generation,
                                         generation=merge and merge["generation"])
            gen, now = merge["generation"] + 1, time.time()
            added, kept = with_errors(merge, previous_errors if expect_generation is not None
                                      else None)
            db.execute("UPDATE volumes SET generation = ?, updated = ? WHERE volume_id = ?",
                       [gen, now, base_id])
            db.execute("UPDATE merges SET generation = ?, host_id = ?, task_id = ?,"
                       " state = 'merging', attempts = attempts + 1, updated = ?,"
                       " copied = CASE WHEN ? AND step = 'commit' THEN 0 ELSE copied END,"
                       " failures = CASE WHEN ? THEN 0 ELSE failures + ? END, errors = ?"
                       " WHERE volume_id = ?",
                       [gen, host_id, task_id, now, bool(restart), expect_generation is None,
                        added, kept, base_id])
            return self.get_merge(base_id)

    def _merge_update(self, op: str, base_id: str, generation: int, sets: str,
                      args: list) -> bool:
        with self.tx(op) as db:
            cur = db.execute(f"UPDATE merges SET {sets}, updated = ?"
                             " WHERE volume_id = ? AND generation = ?",
                             [*args, time.time(), base_id, generation])
            return cur.rowcount == 1

    def merge_checkpoint(self, base_id: str, generation: int, copied: int) -> bool:
        """``copied`` bytes of top's are durable in base; False if superseded."""
        return self._merge_update("merge_checkpoint", base_id, generation, "copied = ?",
                                  [copied])

    def merge_committed(self, base_id: str, generation: int, checksum: str | None) -> bool:
        return self._merge_update("merge_committed", base_id, generation,
                                  "step = 'committed', copied = size, checksum = ?",
                                  [checksum])

    def abandon_merge(self, base_id: str, generation: int, errors: list | None = None) -> bool:
        """As abandon of a copy: the ``errors`` no worker recorded counted in the same
        transaction."""
        return count_errors(self, "abandon_merge", "merges", base_id, generation,
                            errors, abandon=True)

    def record_merge_error(self, base_id: str, generation: int, error: dict) -> bool:
        return count_errors(self, "record_merge_error", "merges", base_id, generation,
                            [error])

    def grow_base(self, base_id: str, generation: int, size: int) -> bool:
        """Base's row takes top's size (its file was grown first); False if superseded."""
        with self.tx("merge_grow") as db:
            if self.get_merge(base_id, generation) is None:
                return False
            db.execute("UPDATE volumes SET size = ?, updated = ? WHERE volume_id = ?",
                       [size, time.time(), base_id])
            return True

    def repoint(self, base_id: str, generation: int) -> bool:
        """Top's child backs onto base (its header says so already): its row's parent and
        the merge's step, in one transaction; False if superseded."""
        with self.tx("merge_repoint") as db:
            merge = self.get_merge(base_id, generation)
            if merge is None:
                return False
            db.execute("UPDATE volumes SET parent_id = ?, updated = ?"
                       " WHERE parent_id = ?", [base_id, time.time(), merge["top_id"]])
            db.execute("UPDATE merges SET step = 'repointed' WHERE volume_id = ?", [base_id])
            return True

    def complete_merge(self, base_id: str, generation: int,
                       checksum: str | None = None) -> bool:
        """Top's row gone, base LEGAL with generation + 1 and the merged view's checksum,
        the merge's row replaced by a `merged` record, in one transaction (top's data file
        is the caller's to remove next). A top with a child must be repointed first; one
        without may end straight from its commit (``checksum``: the commit's). False if
        superseded or not yet repointed."""
        with self.tx("complete_merge") as db:
            merge = self.get_merge(base_id, generation)
            if merge is None or (merge["step"] != "repointed"
                                 and self.children(merge["top_id"])):
                return False
            if merge["step"] == "commit":
                merge["checksum"] = checksum
            now, top_id = time.time(), merge["top_id"]
            db.execute("DELETE FROM volumes WHERE volume_id = ?", [top_id])
            db.execute("UPDATE volumes SET legality = 'LEGAL', generation = ?, checksum = ?,"
                       " updated = ? WHERE volume_id = ?",
                       [generation + 1, merge["checksum"], now, base_id])
            db.execute("DELETE FROM merges WHERE volume_id = ?", [base_id])
            db.execute("INSERT OR REPLACE INTO merged (top_id, base_id, image_id, generation,"
                       " checksum, ended) VALUES (?, ?, ?, ?, ?, ?)",
                       [top_id, base_id, merge["image_id"], generation + 1,
                        merge["checksum"], now])
            db.execute("DELETE FROM merged WHERE top_id IN (SELECT top_id FROM merged"
                       " ORDER BY ended DESC LIMIT -1 OFFSET ?)", [RETAIN_MERGED])
            return True
