"""check_uuid is the gate between input and paths; Layout never leaves the domain."""

from __future__ import annotations

import os
import stat

import pytest
from storage_helpers import UUIDS

from agent.errors import InvalidParams
from agent.ids import check_uuid
from agent.storage.layout import Layout

IMG, VOL = UUIDS[0], UUIDS[1]


def test_canonical_uuid_is_returned_lowercase():
    assert check_uuid("ABCDEF01-2345-4678-9ABC-DEF012345678", "volumeID") == \
        "abcdef01-2345-4678-9abc-def012345678"


@pytest.mark.parametrize("bad", [
    "../x", "/etc", "a\x00b", None, 42, b"00000001-0000-4000-8000-000000000001",
    "", "../../../../../../../../../../../../../../etc/passwd",
    "00000001-0000-4000-8000-00000000000/",       # 36 chars, one not hex
    "{00000001-0000-4000-8000-0000000001}",        # braces: uuid.UUID accepts them
    "000000010000400080000000000000010000",        # 36 hex chars, no dashes
    "0000000-10000-4000-8000-000000000001",        # dashes in the wrong place
    "urn:uuid:00000001-0000-4000-8000-0001",
    "00000001-0000-4000-8000-000000000001\n",
])
def test_non_uuid_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidParams) as e:
        check_uuid(bad, "imageID")
    assert e.value.data == {"field": "imageID"}
    assert str(e.value) == "imageID must be a UUID"


def test_paths(tmp_path):
    lay = Layout(tmp_path)
    assert lay.db_path == str(tmp_path / "metadata.db")
    assert lay.image_dir(IMG.upper()) == str(tmp_path / "images" / IMG)
    assert lay.volume_path(IMG, VOL) == str(tmp_path / "images" / IMG / f"{VOL}.raw")
    assert lay.lease_path(VOL) == str(tmp_path / "leases" / f"{VOL}.lease")
    with pytest.raises(InvalidParams):
        lay.volume_path(IMG, "../../etc/passwd")
    with pytest.raises(InvalidParams):
        lay.lease_path("/etc/shadow")


def test_ensure_image_dir_is_0755_whatever_the_umask(tmp_path):
    (tmp_path / "images").mkdir()
    old = os.umask(0o077)
    try:
        path = Layout(tmp_path).ensure_image_dir(IMG)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert Layout(tmp_path).ensure_image_dir(IMG) == path  # existing: fine


def test_symlinked_image_dir_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "dom"
    (root / "images").mkdir(parents=True)
    (root / "images" / IMG).symlink_to(outside)
    lay = Layout(root)
    for call in (lambda: lay.image_dir(IMG), lambda: lay.volume_path(IMG, VOL),
                 lambda: lay.ensure_image_dir(IMG)):
        with pytest.raises(InvalidParams, match="symlink"):
            call()
    assert list(outside.iterdir()) == []


def test_symlink_inside_the_domain_is_refused_too(tmp_path):
    (tmp_path / "images" / UUIDS[5]).mkdir(parents=True)
    (tmp_path / "images" / IMG).symlink_to(tmp_path / "images" / UUIDS[5])
    with pytest.raises(InvalidParams):
        Layout(tmp_path).image_dir(IMG)


def test_images_dir_resolving_outside_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    (outside / IMG).mkdir(parents=True)
    root = tmp_path / "dom"
    root.mkdir()
    (root / "images").symlink_to(outside)
    with pytest.raises(InvalidParams, match="outside the domain"):
        Layout(root).image_dir(IMG)
    with pytest.raises(InvalidParams, match="outside the domain"):
        Layout(root).ensure_image_dir(UUIDS[7])
    assert sorted(p.name for p in outside.iterdir()) == [IMG]


def test_symlinked_volume_file_and_lease_are_refused(tmp_path):
    lay = Layout(tmp_path)
    (tmp_path / "leases").mkdir()
    (tmp_path / "images").mkdir()
    lay.ensure_image_dir(IMG)
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, lay.volume_path(IMG, VOL))
    os.symlink(target, lay.lease_path(VOL))
    with pytest.raises(InvalidParams):
        lay.volume_path(IMG, VOL)
    with pytest.raises(InvalidParams):
        lay.lease_path(VOL)
