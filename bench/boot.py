"""Boot to ready: an agent with storage to recover against the same agent with empty domains.

The storage is built directly with the storage library (DomainDB.format, then bulk inserts in
one transaction per domain), not through the API: `volumes` volumes and `markers` copy
markers spread over `domains` domains. Each marker is an ILLEGAL destination copying from a
LEGAL 1 MiB source volume of its domain, written by this agent's host, with a free lease
file (a stale holder record, no lock), so start-up has to probe every one.

Ready is the first Host.ping answered true (until then the agent answers 99
RecoveryInProgress), timed from the agent's process start. Each sample is a fresh process.

  boot         copy_policy = "manual": start-up scans and decides, and re-issues nothing
  boot_resume  copy_policy = "resume": the same, and it re-issues every copy as a task; also
               reported: the time until every one of those tasks (recover:*) has ended, and
               how many ended done or failed (and why)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

from bench.common import Events, MiB, Row, Scratch, alternate, median

GOAL_SECONDS = 1.0
RECOVERY_WAIT = 600.0  # seconds a resume sample waits for its recovery tasks to end
SOURCE_SIZE = MiB


def build_domain(root: str, volumes: int, markers: int, host_id: str) -> tuple[str, str]:
    """A domain at `root` with `volumes` volumes, `markers` of them copies in progress.
    Returns its ID and the image ID of the source volume."""
    from agent.storage.metadata import DomainDB

    domain_id = str(uuid.uuid4())
    db = DomainDB.format(root, domain_id)
    try:
        now = time.time()
        src_image, src_volume = str(uuid.uuid4()), str(uuid.uuid4())
        db.layout.ensure_image_dir(src_image)
        with open(db.layout.volume_path(src_image, src_volume), "wb") as f:
            f.write(os.urandom(SOURCE_SIZE))
        rows = [{"volume_id": src_volume, "image_id": src_image, "size": SOURCE_SIZE,
                 "legality": "LEGAL", "generation": 0, "checksum": None, "created": now,
                 "updated": now}][:volumes]
        marks = []
        for i in range(1, volumes):
            copying = i <= markers
            vid, image = str(uuid.uuid4()), str(uuid.uuid4())
            rows.append({"volume_id": vid, "image_id": image,
                         "size": SOURCE_SIZE if copying else 10 * 1024 ** 3,
                         "legality": "ILLEGAL" if copying else "LEGAL", "generation": 0,
                         "checksum": None, "created": now, "updated": now})
            if copying:
                marks.append({"volume_id": vid, "image_id": image, "src_domain": domain_id,
                              "src_image": src_image, "src_volume": src_volume,
                              "size": SOURCE_SIZE, "copied": 0, "generation": 0,
                              "host_id": host_id, "task_id": f"old-{i}", "state": "copying",
                              "attempts": 1, "errors": "[]", "started": now + i * 1e-6,
                              "updated": now})
                with open(db.layout.lease_path(vid), "w") as f:  # free: nobody holds the lock
                    f.write('{"host_id": "%s", "pid": 1, "task_id": "old-%d"}' % (host_id, i))
        with db.tx("bench"):
            db.db["volumes"].insert_all(rows, batch_size=5000)
            db.db["copy_markers"].insert_all(marks, batch_size=5000)
    finally:
        db.close()
    return domain_id, src_image


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(opts) -> list[Row]:
    wanted = [k for k in ("boot", "boot_resume") if k in opts.only]
    if not wanted:
        return []
    rows = []
    data = tempfile.mkdtemp(prefix="hab-boot-", dir=opts.data_dir)
    with Scratch() as s:
        try:
            full, empty, sources = {}, {}, {}
            t = time.perf_counter()
            for d, (nv, nm) in enumerate(zip(_split(opts.volumes, opts.domains),
                                             _split(opts.markers, opts.domains))):
                root = os.path.join(data, f"full{d}")
                domain_id, sources[root] = build_domain(root, nv, nm, "bench-boot")
                full[domain_id] = root
                root = os.path.join(data, f"empty{d}")
                empty[build_domain(root, 0, 0, "bench-boot")[0]] = root
            build_seconds = time.perf_counter() - t
            pristine = {p: _save(p) for p in full.values()}
            for key in wanted:
                try:
                    rows.append(_row(opts, s, key, full, empty, sources, pristine,
                                     build_seconds))
                except Exception as exc:  # the other row still counts
                    rows.append(Row(key=key, title=f"boot to ready ({key}) FAILED", unit="s",
                                    project=[], goal=f"<= {GOAL_SECONDS:g} s more", met=False,
                                    extra={"error": f"{type(exc).__name__}: {exc}"[:1000]}))
        finally:
            shutil.rmtree(data, ignore_errors=True)
    return rows


def _row(opts, s, key, full, empty, sources, pristine, build_seconds) -> Row:
    policy = "manual" if key == "boot" else "resume"
    a = s.agent(f"{key}-full", host_id="bench-boot", storage={"domains": full},
                recovery={"copy_policy": policy})
    b = s.agent(f"{key}-empty", host_id="bench-boot", storage={"domains": empty},
                recovery={"copy_policy": policy})
    outcomes: list[dict] = []

    def full_boot():
        for p in full.values():
            _restore(p, pristine[p], sources[p])
        return _boot(a, opts.markers if policy == "resume" else 0, outcomes)

    repeats = opts.repeats if policy == "manual" else min(opts.repeats, 3)
    sa, sb = alternate(repeats, full_boot, lambda: _boot(b, 0, []))
    more = median(sa) - median(sb)
    extra = {"volumes": opts.volumes, "markers": opts.markers, "domains": opts.domains,
             "copy_policy": policy, "build_seconds": round(build_seconds, 2)}
    if outcomes:
        extra["recover_tasks_ended_seconds"] = [o["seconds"] for o in outcomes]
        extra["recover_tasks_done"] = [o["done"] for o in outcomes]
        extra["recover_tasks_failed"] = [o["failed"] for o in outcomes]
    return Row(key=key, title=f"boot to ready, {opts.volumes:,} volumes, {opts.markers:,} "
               f"markers, {opts.domains} domains, policy {policy}", unit="s", project=sa,
               baselines={"same agent, empty domains": sb}, ratio=more,
               ratio_of="seconds more than empty", goal=f"<= {GOAL_SECONDS:g} s more",
               met=more <= GOAL_SECONDS, extra=extra)


def _boot(agent, expect_recovered: int, outcomes: list) -> float:
    """Start `agent`, return seconds to ready; with `expect_recovered`, also wait (up to
    RECOVERY_WAIT) until that many recover:* tasks have ended, and append what they did."""
    events = Events(agent.events_endpoint, "Task.state") if expect_recovered else None
    try:
        agent.start(wait=False)
        ready = agent.wait_ready()
        if events is not None:
            done, failed = set(), {}
            deadline = time.monotonic() + RECOVERY_WAIT
            while len(done) + sum(len(v) for v in failed.values()) < expect_recovered:
                try:
                    ev = events.next(timeout=max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
                task = ev["params"]["task"]
                if not task["id"].startswith("recover:"):
                    continue
                if task["state"] == "done":
                    done.add(task["id"])
                elif task["state"] in ("failed", "aborted"):
                    why = (task["error"] or {}).get("message", "?")
                    failed.setdefault(why, set()).add(task["id"])
            outcomes.append({"seconds": round(time.perf_counter() - agent.started_at, 3),
                             "done": len(done),
                             "failed": {k: len(v) for k, v in failed.items()}})
        return ready
    finally:
        if events is not None:
            events.close()
        agent.stop()


def _save(root: str) -> bytes:
    with open(os.path.join(root, "metadata.db"), "rb") as f:
        return f.read()


def _restore(root: str, db: bytes, source_image: str) -> None:
    """Put the metadata back as built (a resume consumed the markers) and remove the copies'
    data files; the agent is not running."""
    with open(os.path.join(root, "metadata.db"), "wb") as f:
        f.write(db)
    images = os.path.join(root, "images")
    for image in os.listdir(images):
        if image != source_image:
            shutil.rmtree(os.path.join(images, image))
