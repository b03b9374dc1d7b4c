"""A copy's room check (workers/ops/copying/qemu.py, check_room): a bound from what the
source's qemu-img checks found allocated, and `qemu-img measure` only where the bound does
not fit. The bound must never be less than what a destination really holds, whatever the
source's layout (agent/storage/sizing.py)."""

import os
import subprocess

import pytest

from agent.storage import qcow2, sizing
from tests.images.chains import check, compare, make_chain, needs_qemu, qemu_io
from tests.images.test_copies import agent, ids, run_copy  # noqa: F401 (agent: a fixture)
from tests.support.storage_flow import MiB, new_id, wait_legal

pytestmark = [needs_qemu, pytest.mark.timeout(300)]


def _scattered(size, cluster):
    """4 KiB writes, one in each L2 table's reach: the most tables for the least data."""
    reach = max(min(cluster * (cluster // 16), size // 32), 64 * 1024)
    return [f"write -P 7 {off} 4k" for off in range(reach // 2, size - 4096, reach)][:512]


# (cluster size, extended L2, what the source's guest writes)
LAYOUTS = {
    "tiny-clusters-scattered": ("512", "off", lambda size: _scattered(size, 512)),
    "subclusters-scattered": ("16k", "on", lambda size: _scattered(size, 16384)),
    "compressed": ("64k", "off", lambda size: [f"write -c -P {i + 1} {i * MiB} 64k"
                                               for i in range(32)]),
    "large-clusters-scattered": ("2M", "on", lambda size: _scattered(size, 2 * MiB)),
    "zeros-and-data": ("64k", "off", lambda size: [
        f"write -P 3 0 {4 * MiB}", f"write -z {8 * MiB} {8 * MiB}",
        f"write -P 4 {size - MiB} {MiB}"]),
}


def _held(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_bound_is_never_less_than_what_a_copy_holds(agent, workdir, layout):
    """Sources whose layout makes a destination hold much for little (a table for every
    4 KiB, tiny clusters, compressed clusters that are small on disk and whole in a copy):
    copied to raw and to qcow2, each destination holds no more than the bound computed
    from its source's header and qemu-img check, and reads the same as its source."""
    cluster, extended_l2, writes = LAYOUTS[layout]
    size = 64 * MiB
    [top] = make_chain(agent, agent.domain_id, size=size, base_format="cow", layers=1)
    made = str(workdir / "made.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster},extended_l2={extended_l2}", made, str(size)],
                   check=True, timeout=60)
    with open(made, "rb") as src, open(top["path"], "r+b") as dst:
        dst.truncate(0)
        dst.write(src.read())
    qemu_io(top["path"], "cow", *writes(size))
    head = qcow2.read(top["path"], top["volumeID"])
    row = {"format": "cow", "size": size, "volume_id": top["volumeID"]}
    data = sizing.data_bound(None, row, head, check(top["path"]))
    assert data is not None and data > 0
    for fmt in ("raw", "cow"):
        dst, _ = run_copy(agent, top, f"room-{fmt}", format=fmt)
        info = agent.call("Volume.getInfo", dst)
        bound = sizing.sparse_bound(data, size, fmt, head.cluster_size)
        assert _held(info["path"]) <= bound, (fmt, _held(info["path"]), bound)
        assert compare(top["path"], "cow", info["path"], fmt).returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "cow"])
def test_a_bound_that_does_not_fit_is_measured_and_the_copy_fits(agent, workdir, fmt):
    """Three layers each writing the same 10 MiB (and their own data): what the checks
    found allocated adds up to more than a 40 MiB domain has free, but the guest view
    holds about 24 MiB. The bound does not fit, so qemu-img measure decides: the copy is
    made, and is whole."""
    from tests.support.storage_flow import tmpfs
    chain = make_chain(agent, agent.domain_id, size=64 * MiB, base_format="cow", layers=3)
    for i, layer in enumerate(chain):
        qemu_io(layer["path"], "cow", f"write -P {20 + i} {32 * MiB} {10 * MiB}")
    allocated = sum(check(layer["path"]).get("allocated-clusters", 0) * 65536
                    for layer in chain)
    with tmpfs(workdir / "small", "40M") as small:
        small_id = new_id()
        agent.call("StorageDomain.create", {"domainID": small_id, "path": str(small)})
        st = os.statvfs(small)
        assert allocated > st.f_bavail * st.f_frsize  # the bound alone would refuse
        dst = {"domainID": small_id, "imageID": new_id(), "volumeID": new_id()}
        agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst,
                                           "format": fmt}, id="fits")
        wait_legal(agent, dst)
        info = agent.call("Volume.getInfo", dst)
        assert compare(chain[-1]["path"], "cow", info["path"], fmt).returncode == 0


class _Path:
    """A layout that knows one file (sizing.data_bound asks it for a raw layer's path)."""

    def __init__(self, path):
        self.path = path

    def data_path(self, row):
        return self.path


def test_a_raw_base_is_bounded_by_its_data_extents(agent):
    """A raw base's bound is its data as qemu finds it (SEEK_DATA), not its allocated blocks
    (which a compressing file system counts compressed), each extent widened to the
    destination's clusters: scattered 4 KiB writes, copied to qcow2 (a 64 KiB cluster for
    each), hold no more than the bound, and read the same."""
    size = 64 * MiB
    [base] = make_chain(agent, agent.domain_id, size=size, base_format="raw", layers=1)
    qemu_io(base["path"], "raw", *_scattered(size, 512))
    row = {"format": "raw", "size": size, "volume_id": base["volumeID"]}
    data = sizing.data_bound(_Path(base["path"]), row, None, None)
    assert 12 * MiB <= data <= _held(base["path"])  # make_chain's 12 MiB, and the writes
    in_clusters = sizing.data_bound(_Path(base["path"]), row, None, None, grain=65536)
    assert in_clusters > data  # each 4 KiB write allocates a whole cluster of a qcow2
    dst, _ = run_copy(agent, base, "room-raw-base", format="cow")
    info = agent.call("Volume.getInfo", dst)
    assert _held(info["path"]) <= sizing.sparse_bound(in_clusters, size, "cow")
    assert compare(base["path"], "raw", info["path"], "cow").returncode == 0


def _relayout(path: str, size: int, cluster: str, backing: str | None = None) -> None:
    """Replace the qcow2 at `path` with an empty one of another cluster size (its backing
    file named as the chain's is)."""
    made = path + ".made"
    over = ["-b", os.path.basename(backing), "-F", "qcow2", "-u"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
                    *over, made, str(size)], check=True, timeout=60, cwd=os.path.dirname(path))
    os.replace(made, path)


def test_small_clusters_under_large_ones_are_bounded_in_the_large(agent):
    """A base of 512-byte clusters, a 4 KiB write in every 2 MiB, under a top of 2 MiB
    clusters: collapsed to qcow2 (laid out as the top), each write allocates a 2 MiB
    cluster. A bound counting each layer's clusters at their own size would be far too
    small; counted in the destination's, it holds what the copy holds."""
    size = 64 * MiB
    base, top = make_chain(agent, agent.domain_id, size=size, base_format="cow", layers=2)
    _relayout(base["path"], size, "512")
    _relayout(top["path"], size, "2M", backing=base["path"])
    qemu_io(base["path"], "cow", *[f"write -P 7 {k * 2 * MiB + 4096} 4k" for k in range(30)])
    qemu_io(top["path"], "cow", f"write -P 9 {61 * MiB} 64k")
    grain = 2 * MiB
    own = in_grains = 0
    for layer in (base, top):
        row = {"format": "cow", "size": size, "volume_id": layer["volumeID"]}
        head, found = qcow2.read(layer["path"], layer["volumeID"]), check(layer["path"])
        own += sizing.data_bound(None, row, head, found)
        in_grains += sizing.data_bound(None, row, head, found, grain)
    dst, _ = run_copy(agent, top, "room-mixed", format="cow")
    info = agent.call("Volume.getInfo", dst)
    assert _held(info["path"]) > sizing.sparse_bound(own, size, "cow", grain)
    assert _held(info["path"]) <= sizing.sparse_bound(min(in_grains, size), size, "cow", grain)
    assert compare(top["path"], "cow", info["path"], "cow").returncode == 0
