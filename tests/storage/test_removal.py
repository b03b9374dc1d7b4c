"""A data file removed by a worker (Volume.delete, a merge's top): its name gone at once and
durably, its blocks freed once the worker has answered (formats.raw.remove with
`after_answer`, system.unlink_pinned), and by nobody else."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from agent.storage import volumes
from agent.storage.formats import raw
from agent.storage.metadata import DomainDB

MiB = 1 << 20
WHO = {"host_id": "h", "task_id": "t", "op": "test"}


def _written(path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\1" * size)
        os.fsync(f.fileno())


def test_the_name_goes_at_once_and_the_blocks_when_the_answer_is_out(tmp_path):
    path = tmp_path / "v.raw"
    _written(path, 8 * MiB)
    later = []
    raw.remove(str(path), later.append)
    assert not path.exists()
    assert len(later) == 1
    (fd,) = later[0].args  # what the worker closes once its result is acked
    held = os.fstat(fd)
    assert stat.S_ISREG(held.st_mode) and held.st_nlink == 0
    assert held.st_blocks * 512 >= 8 * MiB  # unlinked, not freed yet
    later[0]()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_what_is_not_a_file_is_unlinked_without_being_opened(tmp_path):
    fifo = tmp_path / "v.raw"
    os.mkfifo(fifo)  # an open for reading would block for ever
    later = []
    raw.remove(str(fifo), later.append)
    assert not os.path.lexists(fifo)
    for fn in later:
        fn()
    link = tmp_path / "w.raw"
    target = tmp_path / "elsewhere"
    _written(target, MiB)
    link.symlink_to(target)
    raw.remove(str(link), later.append)
    assert not os.path.lexists(link) and target.stat().st_size == MiB  # the link, never its target
    missing = []
    raw.remove(str(tmp_path / "never.raw"), missing.append)
    assert missing == []  # gone already: nothing held


def test_a_delete_without_a_worker_frees_at_once(tmp_path):
    """volumes.delete called with no after_answer (a caller that is not a one-shot worker):
    nothing is held, so nothing can pile up in a process that lives on."""
    domain_id = str(uuid.uuid4())
    db = DomainDB.format(str(tmp_path / "dom"), domain_id)
    loc = {"domainID": domain_id, "path": str(tmp_path / "dom"), "imageID": str(uuid.uuid4()),
           "volumeID": str(uuid.uuid4())}
    made = volumes.create(db, {**loc, "size": 4 * MiB, "preallocation": "preallocated"}, WHO)
    before = len(os.listdir("/proc/self/fd"))
    assert volumes.delete(db, loc, WHO)["deleted"]
    assert not os.path.exists(made["path"])
    assert len(os.listdir("/proc/self/fd")) == before
