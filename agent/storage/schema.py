"""A domain's metadata schema, and what each version added (for domains made before it).

Version 2 gave volumes a creation token and copy markers their source's identity and a count
of failures. Version 3 gave volumes a format (raw, or cow: qcow2) and a parent (the volume a
snapshot is layered on, in the same image), and copy markers the kind of copy (collapse: the
source's guest view into one volume; chain: one layer of a chain copied onto its parent's
copy). Version 4 added the transfers table (a volume written through an export:
agent/storage/transfers.py). Version 5 added the merges table (a snapshot being folded into
its parent), the merged records of those done (agent/storage/merges.py), and volumes'
preallocation (sparse or preallocated, as made; null when not known), which a grow and a
merge keep. Version 6 added the bitmaps table: the persistent dirty bitmaps the agent keeps
in its qcow2 volumes (agent/storage/bitmaps.py), and copy markers' `bitmaps` (a collapse
asked to carry the source's bitmaps). `PRAGMA user_version` holds a domain's version;
DomainDB.open migrates an older one in one transaction (agent/storage/metadata.py).
"""

DOMAIN_VERSION = 6

# The tables (not views) and columns this version reads and writes; a domain without them is
# damaged or not ours, whatever its version says.
REQUIRED = {
    "domain": {"id", "version", "created"},
    "volumes": {"volume_id", "image_id", "size", "legality", "generation", "checksum",
                "created", "updated", "token", "format", "parent_id", "preallocation"},
    "copy_markers": {"volume_id", "image_id", "src_domain", "src_image", "src_volume", "size",
                     "copied", "generation", "host_id", "task_id", "state", "attempts",
                     "errors", "started", "updated", "failures", "src_generation",
                     "src_token", "kind", "bitmaps"},
    "transfers": {"volume_id", "image_id", "generation", "host_id", "task_id", "tag",
                  "state", "size", "written", "created_volume", "attempts", "started",
                  "updated"},
    "merges": {"volume_id", "image_id", "top_id", "child_id", "generation", "host_id",
               "task_id", "state", "step", "copied", "size", "base_size", "checksum",
               "attempts", "failures", "errors", "started", "updated"},
    "merged": {"top_id", "base_id", "image_id", "generation", "checksum", "ended"},
    "bitmaps": {"volume_id", "name", "granularity", "continues", "broken", "created",
                "updated"},
}

# copy_markers is its own table so the boot scan for unfinished copies is one cheap query,
# however many volumes the domain holds.
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS domain (id TEXT PRIMARY KEY, version INTEGER, created REAL)",
    """CREATE TABLE IF NOT EXISTS volumes (
        volume_id TEXT PRIMARY KEY, image_id TEXT NOT NULL, size INTEGER NOT NULL,
        legality TEXT NOT NULL CHECK (legality IN ('LEGAL', 'ILLEGAL')),
        generation INTEGER NOT NULL, checksum TEXT, created REAL, updated REAL, token TEXT,
        format TEXT NOT NULL DEFAULT 'raw', parent_id TEXT, preallocation TEXT)""",
    "CREATE INDEX IF NOT EXISTS volumes_image_id ON volumes (image_id)",
    "CREATE INDEX IF NOT EXISTS volumes_parent_id ON volumes (parent_id)",
    """CREATE TABLE IF NOT EXISTS copy_markers (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, src_domain TEXT, src_image TEXT, src_volume TEXT,
        size INTEGER, copied INTEGER NOT NULL, generation INTEGER NOT NULL,
        host_id TEXT, task_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('copying', 'abandoned')),
        attempts INTEGER NOT NULL DEFAULT 1, errors TEXT NOT NULL DEFAULT '[]',
        started REAL, updated REAL, failures INTEGER NOT NULL DEFAULT 0,
        src_generation INTEGER, src_token TEXT, kind TEXT NOT NULL DEFAULT 'collapse',
        bitmaps INTEGER NOT NULL DEFAULT 0)""",
]

# A transfer: a volume being written through a writable export (an upload), ILLEGAL until
# its finish checks what was written; any host reads it (agent/storage/transfers.py).
TRANSFERS_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS transfers (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, generation INTEGER NOT NULL, host_id TEXT, task_id TEXT,
        tag TEXT, state TEXT NOT NULL CHECK (state IN ('open', 'stopped')),
        size INTEGER NOT NULL, written INTEGER NOT NULL DEFAULT 0,
        created_volume INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 1,
        started REAL, updated REAL)""",
]
SCHEMA += TRANSFERS_SCHEMA

# A merge of a snapshot (top) into its parent (base), keyed by base: the volume it writes and
# whose generation fences it; `merged` remembers what became of a merged top
# (agent/storage/merges.py).
MERGES_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS merges (
        volume_id TEXT PRIMARY KEY REFERENCES volumes (volume_id) ON DELETE CASCADE,
        image_id TEXT NOT NULL, top_id TEXT NOT NULL, child_id TEXT,
        generation INTEGER NOT NULL, host_id TEXT, task_id TEXT,
        state TEXT NOT NULL CHECK (state IN ('merging', 'abandoned')),
        step TEXT NOT NULL CHECK (step IN ('commit', 'committed', 'repointed')),
        copied INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL, base_size INTEGER NOT NULL,
        checksum TEXT, attempts INTEGER NOT NULL DEFAULT 1,
        failures INTEGER NOT NULL DEFAULT 0, errors TEXT NOT NULL DEFAULT '[]',
        started REAL, updated REAL)""",
    "CREATE INDEX IF NOT EXISTS merges_top_id ON merges (top_id)",
    """CREATE TABLE IF NOT EXISTS merged (
        top_id TEXT PRIMARY KEY, base_id TEXT NOT NULL, image_id TEXT NOT NULL,
        generation INTEGER NOT NULL, checksum TEXT, ended REAL)""",
]
SCHEMA += MERGES_SCHEMA

# A volume's persistent dirty bitmaps as the agent made them: each also lives in the qcow2,
# and the two are checked against each other before one is used (agent/storage/bitmaps.py).
BITMAPS_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS bitmaps (
        volume_id TEXT NOT NULL REFERENCES volumes (volume_id) ON DELETE CASCADE,
        name TEXT NOT NULL, granularity INTEGER NOT NULL,
        continues INTEGER NOT NULL DEFAULT 0, broken TEXT, created REAL, updated REAL,
        PRIMARY KEY (volume_id, name))""",
]
SCHEMA += BITMAPS_SCHEMA
# Tables a version added whole: a migration makes them (their absence is not damage).
NEW_TABLES = {"transfers": TRANSFERS_SCHEMA, "merges": MERGES_SCHEMA,
              "merged": MERGES_SCHEMA, "bitmaps": BITMAPS_SCHEMA}

# What versions 2, 3, 5 and 6 added to a table, for domains formatted before them (a migration adds
# whichever columns are missing, so a version 1 domain goes to 3 in one step).
MIGRATIONS = {
    "volumes": [("token", "TEXT"), ("format", "TEXT NOT NULL DEFAULT 'raw'"),
                ("parent_id", "TEXT"), ("preallocation", "TEXT")],
    "copy_markers": [("failures", "INTEGER NOT NULL DEFAULT 0"), ("src_generation", "INTEGER"),
                     ("src_token", "TEXT"), ("kind", "TEXT NOT NULL DEFAULT 'collapse'"),
                     ("bitmaps", "INTEGER NOT NULL DEFAULT 0")],
}
# Indexes (and whole tables) a migration makes once the columns exist.
MIGRATION_INDEXES = ["CREATE INDEX IF NOT EXISTS volumes_parent_id ON volumes (parent_id)",
                     *TRANSFERS_SCHEMA, *MERGES_SCHEMA, *BITMAPS_SCHEMA]

# Operations that outlive tasks (a scrub): one row each, written by the process that runs it
# (agent/storage/operations.py). UNKNOWN is never stored: it is what a NOT_STARTED or STARTED
# row reads as when its operation lease is free. Domains formatted before this table existed
# get it on their first operation (operations.ensure_schema).
OPERATIONS_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS operations (
        operation_id TEXT PRIMARY KEY, type TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('NOT_STARTED', 'STARTED', 'COMPLETED', 'FAILED', 'STOPPED')),
        progress REAL NOT NULL DEFAULT 0, host_id TEXT, task_id TEXT, pid INTEGER,
        started REAL, updated REAL, ended REAL, stop_requested REAL,
        result TEXT, error TEXT)""",
    "CREATE INDEX IF NOT EXISTS operations_started ON operations (started)",
]
SCHEMA += OPERATIONS_SCHEMA
