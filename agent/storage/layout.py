"""Where a storage domain keeps its files.

A domain is one directory::

    <root>/metadata.db                        SQLite metadata (volumes, copy markers, domain row)
    <root>/metadata.reserve                   room kept for a delete's journal on a full disk
    <root>/.format.lock                       formatters take turns on it (never deleted)
    <root>/images/<imageID>/<volumeID>.raw    raw data file (sparse unless preallocated)
    <root>/images/<imageID>/<volumeID>.qcow2  qcow2 data file (format cow); a snapshot's
                                              backing file is its parent, named relative
    <root>/leases/<volumeID>.lease            one lease file per volume (local manager)
    <root>/leases/<volumeID>.sanlock          its sanlock resource (sanlock manager), and
    <root>/leases/<volumeID>.holder           who holds it, for people
    <root>/dom_md/ids                         the domain's sanlock lockspace (host IDs)

Ids go through check_uuid before they touch a path, and a path that is a symlink or resolves
outside the domain is refused, so a bad id or a planted link can never make the agent write
(or delete) anything outside the domain directory. The check is against hostile *input*, not
against someone racing us inside the domain directory: whoever can write there owns the data
anyway.
"""

from __future__ import annotations

import os
import stat

from agent.errors import InvalidParams
from agent.ids import check_uuid
from agent.system import fsync_dir

DB_NAME = "metadata.db"
IMAGES = "images"
LEASES = "leases"
DOM_MD = "dom_md"  # sanlock's areas: dom_md/ids, the domain's lockspace
SUFFIXES = {"raw": ".raw", "cow": ".qcow2"}  # a volume's data file, by its format


class Layout:
    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.db_path = os.path.join(self.root, DB_NAME)
        self.images_dir = os.path.join(self.root, IMAGES)
        self.leases_dir = os.path.join(self.root, LEASES)

    def _confined(self, path: str, field: str) -> str:
        # lstat, not stat: the link itself is the problem even if its target looks harmless.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise InvalidParams(f"{field} is a symlink", field=field)
        # realpath catches a link further up (images/ or leases/ pointing elsewhere).
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise InvalidParams(f"{field} is outside the domain", field=field)
        return path

    def image_dir(self, image_id: str) -> str:
        image_id = check_uuid(image_id, "imageID")
        return self._confined(os.path.join(self.images_dir, image_id), "imageID")

    def volume_path(self, image_id: str, volume_id: str, fmt: str = "raw") -> str:
        volume_id = check_uuid(volume_id, "volumeID")
        path = os.path.join(self.image_dir(image_id), volume_id + SUFFIXES[fmt])
        return self._confined(path, "volumeID")

    def data_path(self, row: dict) -> str:
        """The data file of a volume's metadata row (its format decides the name)."""
        return self.volume_path(row["image_id"], row["volume_id"], row.get("format", "raw"))

    def lease_path(self, volume_id: str) -> str:
        volume_id = check_uuid(volume_id, "volumeID")
        return self._confined(os.path.join(self.leases_dir, volume_id + ".lease"), "volumeID")

    def ensure_image_dir(self, image_id: str) -> str:
        """Create the image directory (0o755) if missing; durable once this returns."""
        path = self.image_dir(image_id)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            # Re-check: it may have appeared (as anything) since image_dir() looked.
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidParams("imageID is not a directory", field="imageID") from None
        else:
            # mkdir's mode is filtered by the umask; the layout promises 0o755.
            os.chmod(path, 0o755)
        fsync_dir(self.images_dir)
        return path
