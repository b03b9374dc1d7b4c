"""A domain's space and its volumes by legality, read from its storage: what the metrics
endpoint shows per domain.

Read-only and lock-light: statvfs, and one read-only SQLite connection for a count (a shared
lock for the length of one query; it can delay a writer's commit by that much, never fail
it). Either can hang for as long as the storage does (a dead NFS server, a FUSE daemon that
never answers): callers run it where a hang costs only the reading
(agent/supervisor/metrics.py runs one reader per domain, never in the loop or a scrape).
"""

from __future__ import annotations

import os
import sqlite3

from agent.storage.layout import DB_NAME


def read(path: str) -> dict:
    """{capacity, free (for the agent: f_bavail), volumes: {legality: count}}; OSError or
    sqlite3.Error if the storage cannot be read."""
    st = os.statvfs(path)
    conn = sqlite3.connect(f"file:{os.path.join(path, DB_NAME)}?mode=ro", uri=True,
                           timeout=2.0, check_same_thread=False)
    try:
        counts = dict(conn.execute("SELECT legality, count(*) FROM volumes GROUP BY legality"))
    finally:
        conn.close()
    return {"capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
            "volumes": counts}
