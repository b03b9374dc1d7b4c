"""A merge's rows in a domain's metadata (agent/storage/merges.py), on real SQLite files:
each step one transaction, every write fenced by base's generation, what is refused named,
and nothing half done visible to a reader."""

import uuid

import pytest

from agent.errors import (
    GenerationMismatch,
    InvalidParams,
    VolumeIllegal,
    VolumeInUse,
)
from agent.storage.metadata import DomainDB


def ids():
    return str(uuid.uuid4())


@pytest.fixture
def chain(tmp_path):
    """A domain with base <- top <- child in one image (rows only: no data is read)."""
    db = DomainDB.format(tmp_path / "dom", ids())
    image, base, top, child = ids(), ids(), ids(), ids()
    db.create_volume(image, base, 1 << 20, "raw")
    db.create_volume(image, top, 1 << 20, "cow", base)
    db.create_volume(image, child, 1 << 20, "cow", top)
    yield db, image, base, top, child
    db.close()


def test_a_merge_begins_in_one_transaction_and_fences_its_volumes(chain):
    db, image, base, top, child = chain
    m = db.begin_merge(image, base, top, "h", "t")
    assert (m["step"], m["copied"], m["child_id"], m["generation"]) == ("commit", 0, child, 1)
    assert [db.get_volume(v)["legality"] for v in (base, top, child)] == \
        ["ILLEGAL", "ILLEGAL", "LEGAL"]
    for vid in (base, top, child):
        assert db.merge_of(vid)["volume_id"] == base
    assert db.merge_checkpoint(base, 1, 4096)
    fenced = db.fence(base, 1)  # a writer who lost track is fenced off
    assert fenced == 2 and db.get_merge(base)["generation"] == 2
    assert not db.merge_checkpoint(base, 1, 8192)  # the superseded merger writes nothing
    taken = db.take_over_merge(base, "h2", "t2", expect_generation=2)
    assert (taken["generation"], taken["attempts"], taken["copied"]) == (3, 2, 4096)
    with pytest.raises(GenerationMismatch):
        db.take_over_merge(base, "h3", "t3", expect_generation=2)


def test_what_cannot_be_merged_is_refused_by_name_and_nothing_changes(chain):
    db, image, base, top, child = chain
    with pytest.raises(InvalidParams):
        db.begin_merge(image, base, child, "h", "t")  # not adjacent
    db.begin_merge(image, top, child, "h", "t")
    for pair, error in (((base, top), VolumeInUse), ((top, child), VolumeInUse)):
        with pytest.raises(error):
            db.begin_merge(image, *pair, "h", "t")
    with pytest.raises(VolumeInUse):
        db.delete_volume(child)  # a merge's top (here the leaf) is never deleted under it
    assert db.get_volume(base)["legality"] == "LEGAL"  # each refusal rolled back whole
    assert db.get_volume(base)["generation"] == 0


def test_a_top_with_a_child_is_repointed_before_it_goes(chain):
    db, image, base, top, child = chain
    m = db.begin_merge(image, base, top, "h", "t")
    gen = m["generation"]
    assert not db.complete_merge(base, gen, checksum="blake3-4m:x")  # the child first
    assert db.merge_committed(base, gen, "blake3-4m:ab")
    assert db.repoint(base, gen)
    assert db.get_volume(child)["parent_id"] == base
    assert db.complete_merge(base, gen)
    assert db.get_volume(top) is None and db.get_merge(base) is None
    row = db.get_volume(base)
    assert (row["legality"], row["generation"], row["checksum"]) == \
        ("LEGAL", gen + 1, "blake3-4m:ab")
    assert db.get_merged(top)["base_id"] == base
    assert [r["volume_id"] for r in db.chain(child)] == [base, child]


def test_a_leaf_merge_ends_straight_from_its_commit_and_an_illegal_pair_is_refused(chain):
    db, image, base, top, child = chain
    m = db.begin_merge(image, top, child, "h", "t")
    assert db.complete_merge(top, m["generation"], checksum="blake3-4m:cd")
    assert db.get_volume(top)["checksum"] == "blake3-4m:cd" and db.children(top) == []
    db.begin_transfer(image, top, host_id="h", task_id="t")  # ILLEGAL, being written
    with pytest.raises(VolumeInUse):
        db.begin_merge(image, base, top, "h", "t")
    db.finish_transfer(top, db.get_transfer(top)["generation"], None)
    db.db.execute("UPDATE volumes SET legality = 'ILLEGAL' WHERE volume_id = ?", [base])
    with pytest.raises(VolumeIllegal):
        db.begin_merge(image, base, top, "h", "t")


def test_a_retried_merge_takes_what_its_dead_predecessor_took_and_counts_its_errors(chain):
    """As for a copy (tests/storage/test_metadata.py): a merger that died right after its
    take-over is named to the next, which takes the merge at the generation it raised and
    counts the errors nobody recorded, once, in its own take-over."""
    db, image, base, top, child = chain
    db.begin_merge(image, base, top, "h", "t0")
    e0 = {"message": "t0 died", "task_id": "t0", "time": 1.0}
    taken = db.take_over_merge(base, "h", "r1", expect_generation=1, previous_errors=[e0])
    assert (taken["generation"], taken["failures"]) == (2, 1)
    e1 = {**e0, "task_id": "r1", "time": 2.0}
    with pytest.raises(GenerationMismatch):  # not told of r1: r1's take-over fences it off
        db.take_over_merge(base, "h", "r2", expect_generation=1, previous_errors=[e0, e1])
    taken = db.take_over_merge(base, "h", "r2", expect_generation=1, failed_tasks=["r1"],
                               previous_errors=[e0, e1])
    assert (taken["generation"], taken["failures"], taken["errors"]) == (3, 2, [e0, e1])
    with pytest.raises(GenerationMismatch):  # another host's r2 is not ours
        db.take_over_merge(base, "h2", "r3", expect_generation=1, failed_tasks=["r1", "r2"])
