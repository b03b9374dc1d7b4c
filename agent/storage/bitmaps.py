"""Persistent dirty bitmaps in a domain's metadata (DomainDB's part, beside the markers,
transfers and merges).

A row of `bitmaps` says the agent made (or carried) a bitmap of that name in the volume's
qcow2: its granularity, whether it `continues` the parent's bitmap of the same name (a
snapshot started it where the parent's stopped, so a backup reads the union of the chain's
layers down to the one where it began), and `broken`: a reason the agent recorded itself
when it knows a bitmap cannot be right (a merge's writer killed while it was open, a broken
bitmap merged into it). The qcow2 says the rest (agent/storage/tracking.py compares them):
no row is ever trusted over a bitmap the image does not hold, and no bitmap the image holds
is used without a row.

Every change writes the image and the rows in an order that leaves a crash between them
named (a row the image lacks: broken "missing"; a bitmap no row names: "unknown", never
used), never wrong.
"""

from __future__ import annotations

import time


class Bitmaps:
    """DomainDB's bitmap methods (it provides tx, db, get_volume, ...)."""

    def bitmaps_of(self, volume_id: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM bitmaps WHERE volume_id = ? ORDER BY name",
                                  [volume_id]))

    def get_bitmap(self, volume_id: str, name: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM bitmaps WHERE volume_id = ? AND name = ?",
                                  [volume_id, name]))
        return rows[0] if rows else None

    def insert_bitmap(self, db, volume_id: str, name: str, granularity: int,
                      continues: bool = False, broken: str | None = None) -> None:
        """One row (inside a tx), replacing any of that name."""
        now = time.time()
        db.execute("INSERT OR REPLACE INTO bitmaps (volume_id, name, granularity, continues,"
                   " broken, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [volume_id, name, granularity, int(continues), broken, now, now])

    def record_bitmap(self, volume_id: str, name: str, granularity: int,
                      continues: bool = False, broken: str | None = None) -> None:
        with self.tx("record_bitmap") as db:
            self.insert_bitmap(db, volume_id, name, granularity, continues, broken)

    def set_bitmaps(self, volume_id: str, rows: list[dict]) -> None:
        """The volume's rows made exactly `rows` ({name, granularity, continues, broken}),
        in one transaction: what a copy carried, or a merge left."""
        with self.tx("set_bitmaps") as db:
            db.execute("DELETE FROM bitmaps WHERE volume_id = ?", [volume_id])
            for r in rows:
                self.insert_bitmap(db, volume_id, r["name"], r["granularity"],
                                   bool(r.get("continues")), r.get("broken"))

    def drop_bitmaps(self, volume_id: str, names: list[str] | None = None) -> int:
        """Forget the volume's bitmaps (`names`, else all); how many rows went."""
        with self.tx("drop_bitmaps") as db:
            if names is None:
                cur = db.execute("DELETE FROM bitmaps WHERE volume_id = ?", [volume_id])
            else:
                cur = db.execute(f"DELETE FROM bitmaps WHERE volume_id = ? AND name IN "
                                 f"({','.join('?' * len(names))})", [volume_id, *names])
            return cur.rowcount

    def break_bitmaps(self, volume_id: str, names: list[str], reason: str) -> None:
        """Record that these bitmaps of the volume cannot be right (a row each, kept)."""
        if not names:
            return
        with self.tx("break_bitmaps") as db:
            db.execute(f"UPDATE bitmaps SET broken = ?, updated = ? WHERE volume_id = ? AND "
                       f"name IN ({','.join('?' * len(names))}) AND broken IS NULL",
                       [reason, time.time(), volume_id, *names])
