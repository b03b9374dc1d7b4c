"""qemu's tools under limits (agent/storage/qemu_img.py): a tool past its address space,
CPU time, wall time or output is killed and named (ImageInvalid reason limits, data.limit),
with real processes and real rlimits; a message quoting host paths is redacted."""

from __future__ import annotations

import sys

import pytest

from agent import errors
from agent.storage import qemu_img
from agent.storage.qemu_img import Limits
from tests.images.chains import needs_qemu


def _limited(limit: str, call):
    with pytest.raises(errors.ImageInvalid) as exc:
        call()
    assert exc.value.data["reason"] == "limits" and exc.value.data["limit"] == limit, \
        exc.value.data
    return exc.value


@needs_qemu
def test_a_qemu_tool_past_its_address_space_is_named(tmp_path):
    path = str(tmp_path / "a.qcow2")
    qemu_img.create(path, "cow", 1 << 20)
    err = _limited("memory", lambda: qemu_img.run(
        ["info", "--output=json", "-f", "qcow2", path], limits=Limits(address_space=20 << 20),
        path=path))
    assert err.data["allowed"] == 20 << 20
    assert qemu_img.run(["info", "--output=json", "-f", "qcow2", path], path=path)  # 1 GiB: fine


def test_a_tool_past_its_cpu_time_is_killed_and_named():
    _limited("cpu", lambda: qemu_img.run(["-c", "while True: pass"], tool=sys.executable,
                                         limits=Limits(cpu_seconds=1, wall_seconds=60)))


def test_a_tool_past_its_wall_time_is_killed_and_named():
    beats = []
    _limited("wall", lambda: qemu_img.run(["30"], tool="sleep", beat=lambda: beats.append(1),
                                          limits=Limits(wall_seconds=0.5)))
    assert beats  # it heartbeat while it waited


def test_a_tool_whose_output_has_no_end_is_cut_off_and_named():
    """`yes` writes without end: the reader stops at OUTPUT_MAX, kills it, names it."""
    _limited("output", lambda: qemu_img.run([], tool="yes", limits=Limits(wall_seconds=60)))


def test_a_long_error_is_kept_to_its_tail():
    script = "import sys; sys.stderr.write('x' * 10_000_000 + '\\nlast line'); sys.exit(3)"
    with pytest.raises(errors.ImageInvalid) as exc:
        qemu_img.run(["-c", script], tool=sys.executable)
    assert exc.value.data["reason"] == "tool-failed" and exc.value.data["exit_code"] == 3
    assert len(exc.value.data["detail"]) <= qemu_img.DETAIL_MAX
    assert exc.value.data["detail"].endswith("last line")


def test_host_paths_in_a_tools_message_are_redacted_but_the_volumes_own():
    own = "/srv/dom/images/i/v.qcow2"
    text = f"Could not open '/etc/shadow': Permission denied; opening '{own}'"
    out = qemu_img.redact(text, (own,))
    assert "/etc/shadow" not in out and own in out


def test_limits_reach_the_child_for_real(tmp_path):
    """Not vacuous: the child runs with the rlimits asked for."""
    out = qemu_img.run(["-c", "import resource; print(resource.getrlimit("
                        "resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CPU)[0])"],
                       tool=sys.executable, limits=Limits(address_space=3 << 30, cpu_seconds=7))
    assert out.split() == [str(3 << 30), "7"]


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@needs_qemu
def test_a_qemu_nbd_reuses_its_request_buffers(tmp_path):
    """qemu allocates a buffer as large as each request; glibc's default maps a 4 MiB one
    afresh for every request and faults in its 1,024 pages (a third of a qcow2 copy's CPU
    went there). The agent's qemu tools keep them on the heap (agent/system.py, QEMU_MALLOC):
    a qemu-nbd serving 4 MiB reads faults in far fewer pages than it sends."""
    from agent.storage import qemu_nbd
    path = tmp_path / "data.raw"
    path.write_bytes(b"\x5a" * (64 << 20))
    piece = 4 << 20
    with qemu_nbd.export(f"driver=raw,file.driver=file,file.filename={path}") as exp:
        exp.h.pread(piece, 0)
        before = _minor_faults(exp.proc.pid)
        reads = 0
        for _ in range(3):
            for at in range(piece, 64 << 20, piece):
                assert exp.h.pread(piece, at)[:1] == b"\x5a"
                reads += 1
        faults = _minor_faults(exp.proc.pid) - before
    assert faults < reads * (piece // 4096) // 2, (faults, reads)
