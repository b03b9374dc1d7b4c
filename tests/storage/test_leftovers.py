"""volumes.sweep_leftovers on a real domain: exactly the data files no row names go, each
under its volume's lease; every named file, and a file whose lease is held, stays."""

from __future__ import annotations

import os
import uuid

from agent.storage import volumes
from agent.storage.leases import local
from agent.storage.metadata import DomainDB

WHO = {"host_id": "h", "task_id": "t", "op": "test"}


def _new() -> str:
    return str(uuid.uuid4())


def test_only_files_no_row_names_are_swept(tmp_path):
    domain_id = _new()
    db = DomainDB.format(str(tmp_path / "dom"), domain_id)
    args = {"domainID": domain_id, "path": str(tmp_path / "dom")}
    kept = volumes.create(db, {**args, "imageID": _new(), "volumeID": _new(), "size": 4096},
                          WHO)
    other_image = _new()
    lay = db.layout
    lay.ensure_image_dir(other_image)
    planted = {  # what killed creates leave, each a file and no row
        "same id, other format": lay.volume_path(kept["imageID"], kept["volumeID"], "cow"),
        "same id, other image": lay.volume_path(other_image, kept["volumeID"], "raw"),
        "no row at all": lay.volume_path(other_image, _new(), "cow"),
    }
    held_id = _new()
    held_path = lay.volume_path(other_image, held_id, "raw")
    for path in [*planted.values(), held_path]:
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
    not_ours = os.path.join(lay.image_dir(other_image), "notes.txt")
    open(not_ours, "w").close()
    held = local.acquire(lay.lease_path(held_id), {"host_id": "h", "op": "create"})
    try:
        removed = volumes.sweep_leftovers(db, WHO)
    finally:
        held.release()
    assert sorted(r["format"] for r in removed) == ["cow", "cow", "raw"]
    assert not any(os.path.exists(p) for p in planted.values())
    assert os.path.exists(kept["path"])  # the row's own file
    assert os.path.exists(held_path)  # its lease is held: a create in progress decides
    assert os.path.exists(not_ours)  # not a data file's name
    assert volumes.sweep_leftovers(db, WHO) == [
        {"imageID": other_image, "volumeID": held_id, "format": "raw"}]  # once free
