"""The chaos runner: rounds of copies on one or two agents sharing a domain, one fault per
round at a random moment, then restore, settle, and check every invariant.

Everything random comes from one seed, so a breach prints the seed and round to replay:
    pytest tests/chaos -m chaos --chaos-seed=S --chaos-iterations=N
The "random moment" is chosen by a fact, not a timer: the fault lands once the target copy
has passed a random fraction of its data. Fault durations (how long the supervisor stays
stopped) are random inputs, not synchronization.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import time

import psutil

from agent.client import CallError
from tests.chaos import invariants as inv
from tests.support.harness import wait_for
from tests.support.storage_flow import (
    MiB,
    dst_for,
    make_source,
    new_id,
    status,
    volume_path,
)

FAULTS = ("kill_supervisor", "kill_worker", "stop_worker", "stop_supervisor",
          "kill_during_startup")
CONFIG = {
    "copy": {"chunk_bytes": MiB, "checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.1,
             "max_bytes_per_second": 24 * MiB},
    "workers": {"deadline_seconds": 1.5, "kill_grace_seconds": 0.5, "heartbeat_seconds": 0.2},
    "recovery": {"copy_policy": "resume", "max_attempts": 1000, "backoff_seconds": 0.05},
}
SETTLE_SECONDS = 120.0


class Chaos:
    def __init__(self, make_agent, workdir, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.domain_id, self.path = new_id(), str(workdir / "shared")
        first = make_agent("a", **CONFIG)
        first.call("StorageDomain.create", {"domainID": self.domain_id, "path": self.path})
        first.kill()
        domains = {"storage": {"domains": {self.domain_id: self.path}}}
        # The same "a" again (one object a name: two would share a run dir, and closing one
        # would wait on the other's workers), and "b" beside it.
        self.agents = [first, make_agent("b", start=False, **CONFIG, **domains)]
        for ag in self.agents:
            ag.reconfigure(**domains)
            ag.start()
        self.sampler = inv.WriterSampler(marker=str(workdir))
        self.sampler.start()
        self.counts = collections.Counter()
        self.kills = 0
        self.ping_seconds: list[float] = []
        self.round_no = 0

    def close(self) -> None:
        self.sampler.stop()

    # -- one round -------------------------------------------------------------------

    def round(self) -> None:
        self.round_no += 1
        rng = self.rng
        used = self.agents[:rng.choice((1, 2))]
        copies = []
        for k in range(rng.randint(1, 3)):
            ag = rng.choice(used)
            size = rng.choice((8, 12, 16, 24)) * MiB
            src = make_source(ag, self.domain_id, size, self._layout(size),
                              seed=rng.randrange(1 << 30))
            dst = dst_for(self.domain_id)
            ag.call("Image.copy", {"src": src, "dst": dst}, id=f"r{self.round_no}c{k}")
            self.sampler.paths.add(volume_path(ag, src).replace(src["volumeID"],
                                                                dst["volumeID"]).replace(
                src["imageID"], dst["imageID"]))
            copies.append((ag, src, dst, size))
        fault = rng.choice(FAULTS)
        ag, _src, dst, size = rng.choice(copies)
        fraction = rng.uniform(0.05, 0.9)
        wait_for(lambda: self._copied(dst) >= fraction * size, 60, interval=0.005,
                 what="the fault's moment")
        landed = getattr(self, fault)(ag)
        self.counts[fault if landed is not False else f"{fault} (missed: no copy running)"] += 1
        self._settle(copies)

    def _layout(self, size: int):
        if self.rng.random() < 0.4:
            return None  # dense
        islands, offset = [], 0
        while offset < size:
            length = self.rng.choice((64 * 1024, MiB, 2 * MiB))
            if self.rng.random() < 0.5:
                islands.append((offset, min(length, size - offset)))
            offset += length + self.rng.choice((0, MiB, 3 * MiB))
        return islands or [(0, MiB)]

    def _live(self):
        return next(a for a in self.agents if a.proc and a.proc.poll() is None)

    def _copied(self, dst) -> int:
        st = status(self._live(), dst)
        return st["copy"]["copied"] if st["copy"] else st["size"]

    # -- faults ------------------------------------------------------------------------

    def kill_supervisor(self, ag) -> None:
        workers = ag.workers()
        ag.kill(signal.SIGKILL)
        self.kills += 1
        inv.check_no_leftover(workers)
        self._restart(ag)

    def kill_worker(self, ag) -> bool:
        pid = self._copy_worker(ag)
        if pid:
            self._signal(pid, signal.SIGKILL)
            self.kills += 1
        return bool(pid)

    def stop_worker(self, ag) -> bool:
        pid = self._copy_worker(ag)
        if pid:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return False
            self._signal(pid, signal.SIGSTOP)  # silent past its deadline: the agent kills it
            inv.check_no_leftover([proc], timeout=CONFIG["workers"]["deadline_seconds"] + 10)
            self.kills += 1
        return bool(pid)

    def stop_supervisor(self, ag) -> None:
        ag.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(self.rng.uniform(0.1, 3.0))  # how long it is frozen: the fault itself
        finally:
            ag.proc.send_signal(signal.SIGCONT)

    def kill_during_startup(self, ag) -> None:
        ag.kill(signal.SIGKILL)
        self.kills += 1
        endpoints = ag.run_dir / "endpoints.json"
        old = endpoints.stat().st_mtime_ns if endpoints.exists() else 0
        ag.start(wait=False)
        # Bound sockets (endpoints.json rewritten) means the start-up scan is under way.
        wait_for(lambda: endpoints.exists() and endpoints.stat().st_mtime_ns != old, 30,
                 interval=0.002)
        workers = ag.workers()
        ag.kill(signal.SIGKILL)
        self.kills += 1
        inv.check_no_leftover(workers)
        self._restart(ag)

    def _copy_worker(self, ag) -> int | None:
        try:
            workers = ag.call("Host.getStats")["workers"]
        except CallError:
            return None
        pids = [w["pid"] for w in workers if w["op"] == "image.copy" and w["pid"]]
        return self.rng.choice(pids) if pids else None

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _restart(self, ag) -> None:
        began = time.monotonic()
        ag.start()
        self.ping_seconds.append(time.monotonic() - began)
        inv.check_ping_bound(self.ping_seconds[-1])

    # -- settle and check --------------------------------------------------------------

    def _settle(self, copies) -> None:
        live = self._live()

        def all_legal():
            return all(status(live, dst)["legality"] == "LEGAL" for _, _, dst, _ in copies)
        # Under `resume`, every interrupted copy completes within this round's settle.
        wait_for(all_legal, SETTLE_SECONDS, interval=0.05, what="every copy to complete")
        for _, src, dst, _ in copies:
            inv.check_destination(status(live, dst), volume_path(live, src),
                                  volume_path(live, dst))
        inv.check_integrity(self.path)
        self.sampler.check()
        for ag in self.agents:
            inv.check_no_zombies(ag.pid)
