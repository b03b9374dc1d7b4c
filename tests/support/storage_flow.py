"""Helpers for storage tests against real agents: domains, volumes with data, checks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import uuid

import pytest

from agent.client import CallError
from tests.support.harness import wait_for

MiB = 1 << 20


def new_id() -> str:
    return str(uuid.uuid4())


def ids(v: dict) -> dict:
    """A volume's location (domainID, imageID, volumeID) out of a record that holds more."""
    return {k: v[k] for k in ("domainID", "imageID", "volumeID")}


def cached_bytes(path) -> int:
    """How much of a file is in the page cache (fincore, util-linux: mincore(2))."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def block_checksum(path, kind: str = "blake3-4m") -> str:
    """A block-structured checksum by its definition, reading every byte: the hash of the
    hash digests of the file's 4 MiB blocks (an oracle for agent/storage/checksum.py).
    "blake3-4m" (recorded now) with BLAKE3, "sha256-4m" (recorded before) with SHA-256."""
    import blake3
    hash_ = {"blake3-4m": blake3.blake3, "sha256-4m": hashlib.sha256}[kind]
    outer = hash_()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            outer.update(hash_(block).digest())
    return f"{kind}:" + outer.hexdigest()


def recorded_checksum(domain_path, volume_id):
    """The checksum column of a volume, read straight from the domain's SQLite file."""
    conn = sqlite3.connect(f"file:{domain_path}/metadata.db?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT checksum FROM volumes WHERE volume_id = ?",
                            [volume_id]).fetchone()[0]
    finally:
        conn.close()


def integrity(domain_path) -> str:
    conn = sqlite3.connect(f"file:{domain_path}/metadata.db?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def make_source(agent, domain_id: str, size: int, layout=None, seed: int = 1) -> dict:
    """A LEGAL volume filled with pseudo-random data; `layout` is a list of (offset, length)
    data islands (the rest stays a hole), default: dense."""
    loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
    info = agent.call("Volume.create", {**loc, "size": size})
    rnd = __import__("random").Random(seed)
    with open(info["path"], "r+b") as f:
        for offset, length in layout or [(0, size)]:
            f.seek(offset)
            left = length
            while left:
                n = min(left, 4 * MiB)
                f.write(rnd.randbytes(n))
                left -= n
    return loc


def dst_for(domain_id: str) -> dict:
    return {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}


def status(agent, loc) -> dict:
    return agent.call("Image.getStatus", loc)


def copied(agent, loc) -> int:
    """Bytes copied into `loc` so far; 0 until the copy has created it."""
    try:
        st = status(agent, loc)
    except CallError as exc:
        assert exc.name == "NoSuchVolume", exc
        return 0
    return st["copy"]["copied"] if st["copy"] else st["size"]


def wait_legal(agent, loc, timeout=60.0) -> dict:
    return wait_for(lambda: (s := status(agent, loc))["legality"] == "LEGAL" and s, timeout,
                    interval=0.05, what=f"{loc['volumeID']} LEGAL")


def volume_path(agent, loc) -> str:
    return agent.call("Volume.getInfo", loc)["path"]


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@contextlib.contextmanager
def tmpfs(path, size: str, *options: str):
    """A real small file system mounted at `path` for the block (skips where mounting is not
    allowed): real ENOSPC, EROFS and so on, for tests of what the agent does with them."""
    os.makedirs(path, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]),
                            "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def sparse_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of ``fd`` below ``size`` as (start, end) pairs (SEEK_DATA/SEEK_HOLE,
    as the copy engine sees them)."""
    from agent.storage.copy.kernel import next_extent

    extents, offset = [], 0
    while offset < size:
        start, end = next_extent(fd, offset, size)
        if start < end:
            extents.append((start, end))
        offset = end
    return extents
