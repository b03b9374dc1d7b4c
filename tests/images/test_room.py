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
