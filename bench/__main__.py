"""python -m bench: this project side by side with the limits of the machine, in one run.

Each row runs this project (A) and its baseline (B) alternately (A B, B A, ...), `--repeats`
times each, and reports the medians and their ratio against its goal (docs/performance.md).
The table goes to stdout, the same data (with every sample) to --json (bench/results/latest.json).

    python -m bench --quick                  # a few minutes, smaller sizes
    python -m bench                          # the full sizes
    python -m bench --only rpc1,spawn --repeats 3
    python -m bench --sizes copy=1G,sparse=2G,volumes=20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from bench import common
from bench.common import GiB, MiB

ROWS = ("rpc1", "rpc64", "spawn", "copy_cold", "copy_warm", "sparse", "copy8", "qcow2_raw",
        "qcow2_cow", "qcow2_chain", "huge_empty_raw", "huge_empty_cow", "huge_data_raw",
        "huge_data_cow", "merge", "upload_qcow2", "upload_raw", "download_qcow2",
        "download_raw", "upload_resume", "backup_incremental", "queries", "boot",
        "boot_resume", "events", "memory")

PROFILES = {
    "full": {"repeats": 5, "copy": 2 * GiB, "sparse": 4 * GiB, "volumes": 100_000,
             "markers": 1000, "domains": 4, "tasks": 200, "spawn": 300, "rpc_seconds": 3.0,
             "events_seconds": 3.0, "qcow2": 2 * GiB, "concurrent": 512 * MiB,
             "query_samples": 100, "transfer": 2 * GiB},
    "quick": {"repeats": 3, "copy": 512 * MiB, "sparse": 1 * GiB, "volumes": 10_000,
              "markers": 1000, "domains": 4, "tasks": 200, "spawn": 100, "rpc_seconds": 1.0,
              "events_seconds": 1.0, "qcow2": 512 * MiB, "concurrent": 128 * MiB,
              "query_samples": 30, "transfer": 512 * MiB},
}
SIZE_KEYS = ("copy", "sparse", "volumes", "markers", "domains", "tasks", "spawn", "rpc_seconds",
             "events_seconds", "qcow2", "concurrent", "query_samples", "transfer")
UNITS = {"k": 1 << 10, "m": MiB, "g": GiB}


def _number(text: str) -> int:
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text.replace("_", ""))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes in all")
    p.add_argument("--repeats", type=int, help="samples of each side per row (default 5; 3 quick)")
    p.add_argument("--sizes", default="",
                   help="KEY=N[,KEY=N]: " + ", ".join(SIZE_KEYS) + " (bytes take K/M/G; "
                   "*_seconds: seconds per sample)")
    p.add_argument("--only", default=",".join(ROWS), help="ROW[,ROW]: " + ", ".join(ROWS))
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "latest.json"),
                   help="where the results go (default bench/results/latest.json)")
    p.add_argument("--data-dir", default="/var/tmp",
                   help="a disk-backed directory for the copy and boot rows (default /var/tmp)")
    p.add_argument("--agent-repo", default=None,
                   help="run the agent from this checkout instead (to compare two versions)")
    opts = p.parse_args(argv)
    profile = "quick" if opts.quick else "full"
    settings = dict(PROFILES[profile])
    for item in filter(None, opts.sizes.split(",")):
        key, _, value = item.partition("=")
        if key not in SIZE_KEYS:
            p.error(f"--sizes: unknown key {key!r}")
        settings[key] = float(value) if key.endswith("_seconds") else _number(value)
    opts.only = [r.strip() for r in opts.only.split(",") if r.strip()]
    unknown = sorted(set(opts.only) - set(ROWS))
    if unknown:
        p.error(f"--only: unknown rows {unknown}; rows are {', '.join(ROWS)}")
    if opts.repeats is None:
        opts.repeats = settings["repeats"]
    if opts.repeats < 1:
        p.error("--repeats must be at least 1")
    opts.profile = profile
    for k, v in settings.items():
        if k != "repeats":
            setattr(opts, k.replace("-", "_"), v)
    return opts


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


def table(rows) -> str:
    lines = ["| row | what | this project | baseline (median) | ratio | goal | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        j = r.to_json()
        base = "; ".join(f"{k}: {fmt(v['median'])}" for k, v in j["baselines"].items()) or "-"
        paired = (r.extra or {}).get("paired_ratio")
        paired = f"; paired {fmt(paired)}" if paired is not None else ""
        lines.append(f"| {r.key} | {r.title} | {fmt(j['project']['median'])} {r.unit} | {base} "
                     f"| {fmt(r.ratio)} ({r.ratio_of}{paired}) | {r.goal} | {fmt(r.met)} |")
    return "\n".join(lines)


def machine() -> dict:
    import psutil
    import zmq

    return {"nproc": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like an exception, so every agent and file the rows made is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if opts.agent_repo:
        common.AGENT_REPO = Path(opts.agent_repo).resolve()
    from bench import (
        backup,
        boot,
        concurrent,
        copy,
        events,
        huge,
        images,
        memory,
        merge,
        queries,
        rpc,
        spawn,
        transfers,
    )

    modules = [rpc, spawn, copy, concurrent, images, huge, merge, transfers, backup, queries,
               boot,
               events, memory]
    rows, began = [], time.time()
    print(f"bench: profile {opts.profile}, {opts.repeats} repeats, rows {','.join(opts.only)}",
          file=sys.stderr, flush=True)
    errors = {}
    for mod in modules:
        t = time.monotonic()
        try:
            got = mod.run(opts)
        except Exception as exc:  # one row failing must not cost the others
            import traceback

            traceback.print_exc()
            errors[mod.__name__] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"bench: {mod.__name__} FAILED: {errors[mod.__name__][:300]}", file=sys.stderr)
            continue
        for r in got:
            print(f"bench: {r.key}: {fmt(r.to_json()['project']['median'])} {r.unit}, "
                  f"ratio {fmt(r.ratio)} ({r.goal}) [{time.monotonic() - t:.0f} s]",
                  file=sys.stderr, flush=True)
        rows.extend(got)
    order = {k: i for i, k in enumerate(ROWS)}
    rows.sort(key=lambda r: order.get(r.key, len(ROWS)))
    print(table(rows))
    out = {"profile": opts.profile, "repeats": opts.repeats, "started": began,
           "seconds": round(time.time() - began, 1), "machine": machine(),
           "settings": {k: getattr(opts, k) for k in (*SIZE_KEYS, "data_dir")},
           "rows": [r.to_json() for r in rows], "errors": errors}
    path = Path(opts.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"bench: wrote {path}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
