"""The benchmark runs and writes its table as JSON. Never a speed assertion: only that every
row asked for is there with its figures and ratio, and that nothing it started is left."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def _ours(marker: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(marker in part for part in (p.info["cmdline"] or []))]


def test_bench_quick_rows_write_json_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # A private base (short: ipc paths), so another benchmark on the machine is not ours.
    base = Path(tempfile.mkdtemp(prefix="habt-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "rpc1,spawn", "--repeats", "1",
         "--sizes", "spawn=5,rpc_seconds=0.2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOSTAGENT_BENCH_TMP": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rpc1 |" in proc.stdout and "| spawn |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["profile"] == "quick" and result["machine"]["nproc"] >= 1
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"rpc1", "spawn"}
    for row in rows.values():
        assert row["project"]["median"] > 0
        assert all(b["median"] > 0 for b in row["baselines"].values())
        assert isinstance(row["ratio"], float) and row["ratio"] > 0
        assert isinstance(row["met"], bool) and row["goal"]
    assert {"p50_ms", "p99_ms", "tasks_per_s"} <= set(rows["spawn"]["extra"])
    try:
        assert not list(base.iterdir()), f"left behind: {list(base.iterdir())}"
        assert not _ours(str(base)), "processes left behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bench_refuses_unknown_rows(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nosuchrow"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown rows" in proc.stderr


def test_bench_concurrent_copies_and_query_growth_rows(tmp_path):
    out = tmp_path / "bench.json"
    base = Path(tempfile.mkdtemp(prefix="habt-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "copy8,queries", "--repeats", "1",
         "--sizes", "concurrent=4M,volumes=1000,query_samples=3", "--data-dir", str(base),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOSTAGENT_BENCH_TMP": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"copy8", "queries"}
    copy8 = rows["copy8"]
    assert copy8["project"]["median"] > 0 and copy8["baselines"]["8 x cp"]["median"] > 0
    assert copy8["extra"]["spread_slowest_over_fastest"] >= 1.0
    assert copy8["extra"]["supervisor_cpu_share_of_one_core"] >= 0
    queries = rows["queries"]
    assert queries["extra"]["retained_tasks"]["10000"] >= 10000
    for name in ("Task.getAll active", "Host.getStats", "Image.getStatus"):
        assert set(queries["extra"]["latency"][name]) == {"10", "1000", "10000"}
        assert queries["extra"]["growth"][name] > 0
    assert isinstance(queries["met"], bool)
    try:
        assert not list(base.iterdir()), f"left behind: {list(base.iterdir())}"
        assert not _ours(str(base)), "processes left behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bench_transfer_rows(tmp_path):
    """Upload and download against imageio's client (its real daemon) and nbdcopy, the
    resumed upload's share, and an incremental backup against a full one and imageio's
    incremental download, at a tiny size."""
    out = tmp_path / "bench.json"
    base = Path(tempfile.mkdtemp(prefix="habt-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only",
         "upload_qcow2,download_raw,upload_resume,backup_incremental", "--repeats", "1",
         "--sizes",
         "transfer=64M", "--data-dir", str(base), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOSTAGENT_BENCH_TMP": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"upload_qcow2", "download_raw", "upload_resume", "backup_incremental"}
    backup = rows["backup_incremental"]
    assert backup["project"]["median"] > 0 and backup["ratio"] > 0
    assert set(backup["baselines"]) == {"imageio download(incremental) via its daemon",
                                        "full hostagent backup"}
    assert backup["extra"]["changed_bytes"] == 3 << 20 and isinstance(backup["met"], bool)
    for key in ("upload_qcow2", "download_raw"):
        row = rows[key]
        assert row["project"]["median"] > 0
        assert set(row["baselines"]) == {"imageio client via its daemon", "nbdcopy"}
        assert all(b["median"] > 0 for b in row["baselines"].values())
        assert row["extra"]["ratio_to_nbdcopy"] > 0 and isinstance(row["met"], bool)
    assert 0 < rows["upload_resume"]["project"]["median"] <= 100
    try:
        assert not list(base.iterdir()), f"left behind: {list(base.iterdir())}"
        assert not _ours(str(base)), "processes left behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bench_merge_and_huge_disk_rows(tmp_path):
    """Image.merge against qemu-img commit of the same chain, at a tiny size; an empty 8 TiB
    disk copied against qemu-img convert."""
    out = tmp_path / "bench.json"
    base = Path(tempfile.mkdtemp(prefix="habt-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "merge,huge_empty_cow",
         "--repeats", "1",
         "--sizes", "qcow2=64M", "--data-dir", str(base), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOSTAGENT_BENCH_TMP": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"merge", "huge_empty_cow"}
    huge = rows["huge_empty_cow"]
    assert huge["project"]["median"] > 0 and huge["extra"]["virtual_bytes"] == 8 << 40
    assert isinstance(huge["met"], bool)
    row = rows["merge"]
    assert row["project"]["median"] > 0 and row["ratio"] > 0 and isinstance(row["met"], bool)
    assert row["baselines"]["qemu-img commit -t none"]["median"] > 0
    assert row["extra"]["data_bytes"] == 32 << 20
    try:
        assert not list(base.iterdir()), f"left behind: {list(base.iterdir())}"
        assert not _ours(str(base)), "processes left behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bench_copy_rows_time_the_cli_beside_the_request(tmp_path):
    """The copy rows time each copy from the request and, as an operator does, as a whole
    `hostagent copy --wait` run; both land in the row, with the holes kept."""
    out = tmp_path / "bench.json"
    base = Path(tempfile.mkdtemp(prefix="habt-", dir="/tmp"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "copy_warm,sparse",
         "--repeats", "1", "--sizes", "copy=8M,sparse=40M", "--data-dir", str(base),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOSTAGENT_BENCH_TMP": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"copy_warm", "sparse"}
    for row in rows.values():
        cli = next(v for k, v in row["baselines"].items() if k.startswith("hostagent copy"))
        assert cli["median"] > 0 and row["extra"]["ratio_cli_to_cp"] > 0
    assert rows["sparse"]["extra"]["holes_kept"] is True
    try:
        assert not list(base.iterdir()), f"left behind: {list(base.iterdir())}"
        assert not _ours(str(base)), "processes left behind"
    finally:
        shutil.rmtree(base, ignore_errors=True)
