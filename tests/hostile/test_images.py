"""Hostile images: what an uploader, a guest or anyone who can write a volume's file can put
in a qcow2, run through every verb that opens a chain.

Each image is made with qemu-img and qemu-io and then poked byte by byte (never
`qemu-img create -o data_file=X` on a real X: it truncates X; the name is poked in
afterwards). The oracle that no qemu process opened what an image names is inotify: the file
it names is watched, and no process may open it. The verbs: copies (collapsed to raw and
to cow, and as a chain), a snapshot on top, a scrub, and the getInfos. Every refusal is 216
ImageInvalid with the reason of the check that failed, nothing is made at a destination, no
error echoes a host path the image named, and the agent goes on."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from agent.client import CallError
from tests.images.chains import make_chain, needs_qemu, qemu_io
from tests.support.opens import Opens
from tests.support.storage_flow import MiB, new_id, wait_legal

pytestmark = needs_qemu
SIZE = 64 * MiB


@pytest.fixture
def agent(domain_agent):
    return domain_agent


def ids(v: dict) -> dict:
    return {k: v[k] for k in ("domainID", "imageID", "volumeID")}


def _qemu_img(*args, cwd=None) -> None:
    done = subprocess.run(["qemu-img", *args], cwd=cwd, timeout=60, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def _plant(volume: dict, made: str) -> None:
    """Put the bytes of image `made` into the volume's data file (same inode, as a writer of
    the file would)."""
    with open(made, "rb") as src, open(volume["path"], "r+b") as dst:
        data = src.read()
        dst.truncate(0)
        dst.write(data)


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _replace_name(path: str, old: str, new: str) -> None:
    """Swap one name for another of the same length in the header's first cluster."""
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        head = f.read(65536)
        at = head.index(old.encode())
        f.seek(at)
        f.write(new.encode())


def _snapshot_like(volume: dict, parent: dict, scratch, *create_opts, name="made.qcow2"):
    """A qcow2 made by qemu-img as the agent makes a snapshot of `parent` (backing named, not
    opened), with `create_opts`, its bytes planted into `volume`."""
    made = str(scratch / name)
    backing = os.path.basename(parent["path"])
    fmt = {"raw": "raw", "cow": "qcow2"}[parent["format"]]
    _qemu_img("create", "-q", "-f", "qcow2", *create_opts, "-u", "-b", backing, "-F", fmt,
              made, str(SIZE), cwd=scratch)
    return made


# -- the hostile kinds: each plants itself into the chain's top, and says what it names ---

def data_file(target_kind: str, raw_flag: bool):
    def plant(volume, parent, scratch, targets):
        target = {"host": str(targets / "host-file"), "missing": str(targets / "no-such"),
                  "relative": "host-file", "volume": parent["path"]}[target_kind]
        placeholder = "m" * len(target)  # made beside the image, then renamed in the header
        if raw_flag:  # qemu makes no backing file beside a raw data file
            made = str(scratch / "made.qcow2")
            _qemu_img("create", "-q", "-f", "qcow2", "-o",
                      f"data_file={placeholder},data_file_raw=on", made, str(SIZE),
                      cwd=scratch)
        else:
            made = _snapshot_like(volume, parent, scratch, "-o", f"data_file={placeholder}")
        _replace_name(made, placeholder, target)
        _plant(volume, made)
        return [p for p in (str(targets / "host-file"), parent["path"]) if os.path.exists(p)]
    return plant


LUKS_ATTEMPTS = 50


def luks(volume, parent, scratch, targets):
    # qemu-img times PBKDF on the CPU, and its first round (a few ms) can read 0 ms of CPU
    # time, which this qemu takes for an error: "Unable to get accurate CPU usage" (a qemu
    # bug, fixed upstream: qemu-devel, "crypto: fix bogus error benchmarking pbkdf on fast
    # machines"). A failed attempt costs milliseconds, and a busy CI machine failed five in
    # a row: the image is made again, up to LUKS_ATTEMPTS times.
    for attempt in range(LUKS_ATTEMPTS):
        try:
            made = _snapshot_like(volume, parent, scratch, "--object", "secret,id=s0,data=pw",
                                  "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                                  "encrypt.iter-time=50", name=f"made-{attempt}.qcow2")
            break
        except AssertionError as exc:
            if "accurate CPU usage" not in str(exc) or attempt == LUKS_ATTEMPTS - 1:
                raise
    _plant(volume, made)
    return []


def header_field(offset: int, data: bytes):
    def plant(volume, parent, scratch, targets):
        _poke(volume["path"], offset, data)
        return []
    return plant


def incompatible_bit(bit: int):
    def plant(volume, parent, scratch, targets):
        with open(volume["path"], "r+b") as f:
            f.seek(72)
            value = struct.unpack(">Q", f.read(8))[0] | (1 << bit)
            f.seek(72)
            f.write(struct.pack(">Q", value))
        return []
    return plant


def backing_to(where: str):
    def plant(volume, parent, scratch, targets):
        target = {"host": str(targets / "host-file"), "json": "json:{\"file.filename\":\""
                  + str(targets / "host-file") + "\"}"}[where]
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", target,
                        volume["path"]], check=True, timeout=60)
        return [str(targets / "host-file")]
    return plant


def not_qcow2(fmt: str):
    def plant(volume, parent, scratch, targets):
        made = str(scratch / f"made.{fmt}")
        _qemu_img("create", "-q", "-f", fmt, made, str(SIZE))
        _plant(volume, made)
        return []
    return plant


def bitmaps_extension(count: int = 0, directory_offset: int | None = None):
    """A bitmap added by qemu, then its header extension made to claim `count` bitmaps, or
    a directory elsewhere: metadata qemu would load whole, or read past the file."""
    def plant(volume, parent, scratch, targets):
        _qemu_img("bitmap", "--add", volume["path"], "b0")
        with open(volume["path"], "rb") as f:
            head = f.read(65536)
        at = struct.unpack_from(">I", head, 100)[0]  # header_length
        while True:
            kind, length = struct.unpack_from(">II", head, at)
            assert kind, "no bitmaps extension"
            if kind == 0x23852875:
                break
            at += 8 + ((length + 7) & ~7)
        if count:
            _poke(volume["path"], at + 8, struct.pack(">I", count))
        if directory_offset is not None:
            _poke(volume["path"], at + 24, struct.pack(">Q", directory_offset))
        return []
    return plant


HEADER_KINDS = {  # refused from the header alone: before any qemu process opens the file
    "data-file-host": (data_file("host", False), "data-file"),
    "data-file-host-raw": (data_file("host", True), "data-file"),
    "data-file-missing": (data_file("missing", False), "data-file"),
    "data-file-relative": (data_file("relative", True), "data-file"),
    "data-file-other-volume": (data_file("volume", True), "data-file"),
    "luks": (luks, "encrypted"),
    "aes": (header_field(32, struct.pack(">I", 1)), "encrypted"),
    "marked-corrupt": (incompatible_bit(1), "corrupt"),
    "unknown-feature": (incompatible_bit(40), "unsupported"),
    "65536-snapshots": (header_field(60, struct.pack(">I", 65536)), "limits"),
    "65535-bitmaps": (bitmaps_extension(count=65535), "limits"),
    "virtual-size": (header_field(24, struct.pack(">Q", SIZE * 2)), "size"),
    "version-9": (header_field(4, struct.pack(">I", 9)), "unsupported"),
    "zeros": (header_field(0, b"\0" * 512), "not-qcow2"),
    "vmdk": (not_qcow2("vmdk"), "not-qcow2"),
    "vpc": (not_qcow2("vpc"), "not-qcow2"),
    "backing-host": (backing_to("host"), "backing-outside"),
    "backing-json": (backing_to("json"), "backing-outside"),
}


def _hostile_chain(agent, workdir, kind):
    """A chain copied by the agent (so its layers are LEGAL with recorded checksums, as a
    scrub wants them), whose top is then made hostile behind the agent's back."""
    made = make_chain(agent, agent.domain_id, size=SIZE, layers=2)
    image = new_id()
    dst = {"domainID": agent.domain_id, "imageID": image, "volumeID": new_id()}
    answer = agent.client().call("Image.copy", {"src": ids(made[1]), "dst": dst,
                                                "mode": "chain"}, id=new_id())
    wait_legal(agent, dst)
    chain = [{**loc, "path": info["path"], "format": info["format"]}
             for loc in ({**dst, "volumeID": v} for v in answer["chain"])
             for info in [agent.call("Volume.getInfo", loc)]]
    scratch, targets = workdir / f"scratch-{new_id()[:8]}", workdir / "targets"
    scratch.mkdir()
    targets.mkdir(exist_ok=True)
    (targets / "host-file").write_bytes(b"secret " * 1000)
    plant, reason = HEADER_KINDS[kind]
    watched = plant(chain[1], chain[0], scratch, targets)
    return chain, reason, Opens(*watched) if watched else None


def _refused(agent, call, params, reason, task_id=None) -> dict:
    with pytest.raises(CallError) as exc:
        agent.client().call(call, params, id=task_id or new_id())
    err = exc.value
    assert err.code == 216 and err.data["reason"] == reason, (call, err.data)
    text = json.dumps(err.data) + err.message
    assert "host-file" not in text and "no-such" not in text and "/etc" not in text, text
    return err.data


@pytest.mark.parametrize("kind", sorted(HEADER_KINDS))
def test_a_hostile_header_is_refused_by_every_verb_before_qemu_opens_anything(agent,
                                                                               workdir, kind):
    chain, reason, opens = _hostile_chain(agent, workdir, kind)
    top = ids(chain[1])
    for how in ({"format": "raw"}, {"format": "cow"}, {"mode": "chain"}):
        dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
        _refused(agent, "Image.copy", {"src": top, "dst": dst, **how}, reason)
        with pytest.raises(CallError) as gone:
            agent.call("Volume.getInfo", dst)
        assert gone.value.code == 201  # nothing made
    snap = {**top, "volumeID": new_id()}
    _refused(agent, "Volume.create", {**snap, "parentVolumeID": top["volumeID"]}, reason)
    _refused(agent, "Image.merge", {"domainID": agent.domain_id, "imageID": top["imageID"],
                                    "baseVolumeID": chain[0]["volumeID"],
                                    "topVolumeID": top["volumeID"]}, reason)
    _refused(agent, "Volume.measure", top, reason)
    for verb, extra in (("Bitmap.add", {"name": "b1"}), ("Bitmap.list", {}),
                        ("Bitmap.clear", {}), ("Export.start", {"checkpoint": "c1"})):
        _refused(agent, verb, {**top, **extra}, reason)
    if kind != "virtual-size":  # that one reads as a grow a crash cut short: mended
        _refused(agent, "Volume.extend", {**top, "size": 2 * SIZE}, reason)
    assert agent.call("Volume.getInfo", ids(chain[0]))["legality"] == "LEGAL"
    assert agent.call("Volume.getInfo", top)["legality"] == "LEGAL"  # it is only read
    assert [v["volumeID"] for v in agent.call("Image.getInfo", {
        "domainID": agent.domain_id, "imageID": top["imageID"]})["chain"]] == \
        [chain[0]["volumeID"], chain[1]["volumeID"]]
    if opens is not None:
        assert opens.seen() == [], "a file the image names was opened"
    from tests.e2e.test_scrub import start_scrub, wait_state
    op = start_scrub(agent, agent.domain_id)["operationID"]
    done = wait_state(agent, agent.domain_id, op, "COMPLETED", "FAILED")
    named = [m for m in done["result"]["mismatches"] if m["volumeID"] == top["volumeID"]]
    assert named and named[0]["reason"] == reason, done["result"]  # the scrub names it too
    if opens is not None:  # the scrub reads the base for its own checksum, and nothing else
        assert [p for p in opens.seen() if p != chain[0]["path"]] == [], \
            "a file the image names was opened"
        opens.close()
    assert agent.call("Host.getStats")["agent"]["callback_errors"] == 0


def _cut_in_half(volume: dict) -> None:
    size = os.path.getsize(volume["path"])
    os.truncate(volume["path"], size // 2)


def _l1_past_the_end(volume: dict) -> None:
    """The first L1 entry points at an L2 table far past the file's end."""
    with open(volume["path"], "rb") as f:
        head = f.read(64)
    l1_offset = struct.unpack_from(">Q", head, 40)[0]
    beyond = (os.path.getsize(volume["path"]) + (1 << 30)) & ~0xFFFF
    _poke(volume["path"], l1_offset, struct.pack(">Q", beyond | (1 << 63)))


@pytest.mark.parametrize("damage", [_cut_in_half, _l1_past_the_end],
                         ids=["cut-in-half", "l1-past-the-end"])
def test_a_damaged_qcow2_is_never_copied_into_a_legal_volume(agent, damage):
    """A partial upload (written full, cut to half) or an L1 entry past the end: qemu would
    read zeros there; `qemu-img check` finds it, so no copy of it (or of a snapshot on top
    of it) starts, and nothing is made."""
    chain = make_chain(agent, agent.domain_id, size=SIZE, layers=2)
    qemu_io(chain[1]["path"], "cow", f"write -P 3 0 {SIZE - MiB}")
    damage(chain[1])
    snap = {**ids(chain[1]), "volumeID": new_id()}
    agent.call("Volume.create", {**snap, "parentVolumeID": chain[1]["volumeID"]})
    for src in (ids(chain[1]), snap):
        for how in ({"format": "raw"}, {"format": "cow"}, {"mode": "chain"}):
            dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
            data = _refused(agent, "Image.copy", {"src": src, "dst": dst, **how}, "corrupt")
            assert data["corruptions"] + data["check_errors"] > 0
            with pytest.raises(CallError) as gone:
                agent.call("Volume.getInfo", dst)
            assert gone.value.code == 201
    merge = {"domainID": agent.domain_id, "imageID": chain[0]["imageID"]}
    for base, top in ((chain[0], chain[1]), (chain[1], snap)):  # as top, and under one
        _refused(agent, "Image.merge", {**merge, "baseVolumeID": base["volumeID"],
                                        "topVolumeID": top["volumeID"]}, "corrupt")
        assert agent.call("Volume.getInfo", ids(base))["legality"] == "LEGAL"


def test_a_truncated_raw_base_under_a_snapshot_is_never_copied(agent):
    chain = make_chain(agent, agent.domain_id, size=SIZE, layers=2)
    os.truncate(chain[0]["path"], SIZE // 2)
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    with pytest.raises(CallError) as exc:
        agent.call("Image.copy", {"src": ids(chain[1]), "dst": dst, "format": "raw"})
    assert exc.value.code == 213


def test_the_oracle_sees_every_open(tmp_path):
    """Not vacuous: the watch reports an open by another process, and only after it."""
    target = tmp_path / "watched"
    target.write_bytes(b"x")
    opens = Opens(str(target))
    assert opens.seen() == []
    subprocess.run(["cat", str(target)], check=True, stdout=subprocess.DEVNULL, timeout=30)
    assert opens.seen() == [str(target)]
    opens.close()
