"""A fleet on one machine: N hosts, each its own sanlock daemon, host ID, agent, run dir and
sockets, sharing two domains, and an engine that drives copies on them while hosts are
killed at random: an agent alone (SIGKILL), a worker alone, or a whole host (its sanlock
daemon, then its agent and workers).

Each round also removes a snapshot (Image.merge of a fresh chain's middle volume into its
base) while the copies run; the engine follows it on storage as it does a copy.

The engine tracks copies the way the README recommends for many hosts, at its last step:
storage. A copy is followed with Image.getStatus on any live host; LEGAL ends it; a marker
whose lease is held is left to its holder; a marker nobody holds is continued on a random
live host (Image.copy again), which takes it over from its checkpoint. Everything random
comes from one seed.

Checked every round: every copy LEGAL and equal to its source (its guest view, for qcow2);
every merged base LEGAL and the same on every host, its chain's leaf reading what it read;
never two processes writing one volume at once (tests/chaos/invariants.py WriterSampler:
what /proc says, sampled every few ms; each volume's writers recorded with when they were
first and last seen, and no two records overlap); every live host reports the
same status for every volume; nothing of a dead host's processes left once it is back;
PRAGMA integrity_check clean on both domains.
"""

from __future__ import annotations

import collections
import contextlib
import random
import signal
import subprocess
import time

import psutil

from agent.client import CallError
from tests.chaos import invariants as inv
from tests.images.chains import make_chain
from tests.sanlock.daemons import Daemon
from tests.support.harness import wait_for
from tests.support.storage_flow import MiB, make_source, new_id, sha256

KILLS = ("agent", "worker", "host")
IO_TIMEOUT = 1
CONFIG = {
    "copy": {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.1,
             "max_bytes_per_second": 16 * MiB},
    "recovery": {"copy_policy": "manual"},  # the engine decides, as an engine of many does
}
SETTLE = 3.0  # seconds a marker's lease must stay free before the engine continues it


class Host:
    def __init__(self, fleet: "Fleet", number: int):
        self.number, self.name = number, f"h{number}"
        self.daemon = Daemon(fleet.base / f"sl{number}")
        self.agent = fleet.make_agent(self.name, start=False, **CONFIG)
        self.up = False
        self.lives: list[list[psutil.Process]] = []  # processes of each dead life

    def storage(self, domains: dict) -> dict:
        return {"lease_manager": "sanlock", "host_id_number": self.number,
                "sanlock_io_timeout": IO_TIMEOUT, "sanlock_run_dir": str(self.daemon.run_dir),
                "domains": domains}

    def start(self, domains: dict) -> None:
        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            self.daemon.start()
        self.agent.reconfigure(storage=self.storage(domains))
        self.agent.start()
        self.up = True

    def processes(self) -> list[psutil.Process]:
        try:
            agent = psutil.Process(self.agent.pid)
            return [agent, *agent.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError, TypeError):
            return []


class Fleet:
    def __init__(self, make_agent, workdir, hosts: int, seed: int):
        self.make_agent, self.base = make_agent, workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.hosts = [Host(self, i + 1) for i in range(hosts)]
        self.domains = {new_id(): str(workdir / f"dom{i}") for i in range(2)}
        self.kills = collections.Counter()
        self.takeovers: list[float] = []  # seconds from a kill to its copies' continuation
        self.copies_done = 0
        self.merges_done = 0
        self.round_no = 0
        self.sampler = inv.WriterSampler(marker=str(workdir))
        first = self.hosts[0]
        first.start({})
        for domain_id, path in self.domains.items():
            first.agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
        for h in self.hosts[1:]:
            h.start(self.domains)
        first.agent.reconfigure(storage=first.storage(self.domains))
        for h in self.hosts:
            self.joined(h)
        self.sources = self._sources()
        self.sampler.start()

    # -- helpers -------------------------------------------------------------------------

    def live(self) -> list[Host]:
        return [h for h in self.hosts if h.up]

    def joined(self, h: Host, timeout: float = 240.0) -> None:
        def all_joined():
            got = {d["domainID"]: d["lockspace"] for d in h.agent.call("StorageDomain.list")}
            return all(got.get(d) == "joined" for d in self.domains)
        wait_for(all_joined, timeout, interval=0.1, what=f"{h.name} joined both domains")

    def _sources(self) -> list[dict]:
        h = self.hosts[0]
        out = []
        for i, domain_id in enumerate(self.domains):
            loc = make_source(h.agent, domain_id, 48 * MiB, seed=i + 1,
                              layout=[(0, 16 * MiB), (32 * MiB, 8 * MiB)])
            info = h.agent.call("Volume.getInfo", loc)
            out.append({"loc": loc, "path": info["path"], "format": "raw"})
            chain = make_chain(h.agent, domain_id, size=48 * MiB, layers=2, seed=10 + i)
            top = chain[-1]
            out.append({"loc": {k: top[k] for k in ("domainID", "imageID", "volumeID")},
                        "path": top["path"], "format": "cow"})
        return out

    def status(self, dst: dict) -> dict | None:
        for h in self.rng.sample(self.live(), len(self.live())):
            try:
                return h.agent.call("Image.getStatus", dst)
            except CallError as exc:
                if exc.name == "NoSuchVolume":
                    return None
            except Exception:  # a host dying under us: ask another
                continue
        return None

    # -- a round -------------------------------------------------------------------------

    def round(self, copies: int = 6, kill: str | None = None) -> None:
        self.round_no += 1
        jobs = []
        for i in range(copies):
            src = self.rng.choice(self.sources)
            domain_id = self.rng.choice(list(self.domains))
            dst = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
            h = self.rng.choice(self.live())
            params = {"src": src["loc"], "dst": dst}
            h.agent.client().call("Image.copy", params, id=f"r{self.round_no}c{i}")
            self.sampler.paths.add(self._dst_path(h, dst, src["format"]))
            jobs.append({"src": src, "dst": dst, "host": h})
        merges = [self._merge()]
        kill = kill or self.rng.choice(KILLS)
        victim = self._kill(kill, jobs)
        self._drive(jobs, victim, merges)
        self._check(jobs)
        self._check_merges(merges)

    def _merge(self) -> dict:
        """A snapshot removed while the copies run: a three-volume chain made for it, its
        leaf's guest view kept aside, then its middle volume merged into its base."""
        domain_id = self.rng.choice(list(self.domains))
        h = self.rng.choice(self.live())
        chain = make_chain(h.agent, domain_id, size=48 * MiB, layers=3,
                           seed=20 + self.round_no)
        ref = str(self.base / f"merge-ref-{self.round_no}.raw")
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", chain[-1]["path"],
                        ref], check=True, timeout=120)
        base, top = ({k: v[k] for k in ("domainID", "imageID", "volumeID")}
                     for v in chain[:2])
        params = {"domainID": domain_id, "imageID": base["imageID"],
                  "baseVolumeID": base["volumeID"], "topVolumeID": top["volumeID"]}
        h.agent.client().call("Image.merge", params, id=f"r{self.round_no}m")
        self.sampler.paths.add(chain[0]["path"])
        return {"params": params, "base": base, "leaf": chain[-1], "ref": ref}

    def _dst_path(self, h: Host, dst: dict, fmt: str) -> str:
        root = self.domains[dst["domainID"]]
        return f"{root}/images/{dst['imageID']}/{dst['volumeID']}" + (
            ".qcow2" if fmt == "cow" else ".raw")

    def _kill(self, kind: str, jobs: list[dict]) -> Host:
        """Kill, once a copy of the victim host has a checkpoint past a random fraction."""
        target = self.rng.choice(jobs)
        h = target["host"]
        fraction = self.rng.uniform(0.1, 0.6)

        def past():
            st = self.status(target["dst"])
            return st is not None and (st["copy"] is None or
                                       st["copy"]["copied"] >= fraction * st["size"])
        wait_for(past, timeout=60, interval=0.02, what="the copy to kill past its fraction")
        self.kills[kind] += 1
        h.killed_at = time.monotonic()
        if kind == "worker":
            for w in h.agent.call("Host.getStats")["workers"]:
                if w["pid"]:
                    # A worker may end between the listing and the kill (its copy done).
                    with contextlib.suppress(psutil.NoSuchProcess):
                        psutil.Process(w["pid"]).kill()
            return h
        h.lives.append(h.processes())
        if kind == "host":
            h.daemon.kill()  # first: its leases stay on the storage, held by a dead host
        h.agent.kill(signal.SIGKILL)
        h.up = False
        return h

    def _drive(self, jobs: list[dict], victim: Host, merges: list[dict],
               timeout: float = 400.0) -> None:
        """The engine: follow every copy and merge on storage until it ends, continuing
        the ones that nobody holds; the victim comes back meanwhile."""
        free_since: dict[str, float] = {}
        continued = set()
        if not victim.up:
            victim.start(self.domains)  # a whole host: a new daemon, rejoins its ID

        def all_legal() -> bool:  # one poll of the engine over everything not yet done
            for j in [j for j in jobs if not j.get("done")]:
                self._step(j, free_since, continued, victim)
            for m in [m for m in merges if not m.get("done")]:
                self._step_merge(m, free_since)
            return all(j.get("done") for j in jobs + merges)
        wait_for(all_legal, timeout, interval=0.05, what="every copy LEGAL")
        self.joined(victim)

    def _step(self, j: dict, free_since: dict, continued: set, victim: Host) -> None:
        vid = j["dst"]["volumeID"]
        st = self.status(j["dst"])
        if st is None:
            return
        if st["legality"] == "LEGAL" and st["copy"] is None:
            j["done"] = True
            self.copies_done += 1
            if vid in continued and getattr(victim, "killed_at", None):
                self.takeovers.append(time.monotonic() - victim.killed_at)
            return
        lease = (st["copy"] or {}).get("lease") or {}
        if lease.get("live"):
            free_since.pop(vid, None)
            return
        since = free_since.setdefault(vid, time.monotonic())
        if time.monotonic() - since < SETTLE:
            return
        h = self.rng.choice(self.live())
        try:
            h.agent.client().call("Image.copy", {"src": j["src"]["loc"], "dst": j["dst"]},
                                  id=f"cont-{vid[:8]}-{int(time.monotonic() * 1000)}")
            continued.add(vid)
        except CallError as exc:  # DomainUnusable: that host is (re)joining the lockspace,
            # or its daemon lost it and the agent has not followed yet: another host, later
            if exc.name not in ("LeaseHeld", "GenerationMismatch", "VolumeExists",
                                "DomainUnusable"):
                raise
        except Exception:
            pass  # the host is down or its answer slow: the next poll decides again
        free_since.pop(vid, None)

    def _step_merge(self, m: dict, free_since: dict) -> None:
        """A merge is followed as a copy is: ended once base is LEGAL with no merge; one
        nobody has held for SETTLE seconds is continued (Image.merge again) on a live host."""
        vid = m["base"]["volumeID"]
        st = self.status(m["base"])
        if st is None:
            return
        if st["legality"] == "LEGAL" and st["merge"] is None:
            m["done"] = True
            self.merges_done += 1
            return
        if ((st["merge"] or {}).get("lease") or {}).get("live"):
            free_since.pop(vid, None)
            return
        if time.monotonic() - free_since.setdefault(vid, time.monotonic()) < SETTLE:
            return
        h = self.rng.choice(self.live())
        try:
            h.agent.client().call("Image.merge", m["params"],
                                  id=f"cont-{vid[:8]}-{int(time.monotonic() * 1000)}")
        except CallError as exc:  # DomainUnusable: as for a copy (_step)
            if exc.name not in ("LeaseHeld", "GenerationMismatch", "DomainUnusable"):
                raise
        except Exception:
            pass  # the host is down or its answer slow: the next poll decides again
        free_since.pop(vid, None)

    # -- invariants ----------------------------------------------------------------------

    def _check_merges(self, merges: list[dict]) -> None:
        """Every host says the same of each merged base; the leaf reads what it read."""
        for m in merges:
            answers = {(st["legality"], st["generation"], st["merge"] is None)
                       for st in (h.agent.call("Image.getStatus", m["base"])
                                  for h in self.live())}
            assert len(answers) == 1 and next(iter(answers))[0] == "LEGAL", answers
            same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                                   m["leaf"]["path"], m["ref"]], capture_output=True)
            assert same.returncode == 0, (m["params"], same.stdout)
            check = subprocess.run(["qemu-img", "check", "-f", "qcow2", m["leaf"]["path"]],
                                   capture_output=True)
            assert check.returncode in (0, 3), check.stdout

    def _check(self, jobs: list[dict]) -> None:
        assert not self.sampler.breaches, self.sampler.breaches
        assert not self.sampler.overlaps(), self.sampler.overlaps()
        for j in jobs:
            answers = []
            for h in self.live():
                st = h.agent.call("Image.getStatus", j["dst"])
                answers.append((st["legality"], st["generation"], st["copy"] is None))
            assert len(set(answers)) == 1 and answers[0][0] == "LEGAL", answers
            path = self.live()[0].agent.call("Volume.getInfo", j["dst"])["path"]
            if j["src"]["format"] == "raw":
                assert sha256(path) == sha256(j["src"]["path"]), j
            else:
                same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                                       j["src"]["path"], path], capture_output=True)
                assert same.returncode == 0, (j, same.stdout)
        for h in self.hosts:
            for life in h.lives:
                inv.check_no_leftover(life, timeout=15)
        for path in self.domains.values():
            inv.check_integrity(path)

    def close(self) -> None:
        self.sampler.stop()
        for h in self.hosts:
            h.agent.close()
            h.daemon.stop()

    def summary(self) -> dict:
        return {"seed": self.seed, "hosts": len(self.hosts), "rounds": self.round_no,
                "copies": self.copies_done, "merges": self.merges_done,
                "kills": dict(self.kills),
                "takeovers": len(self.takeovers),
                "longest_takeover_seconds": round(max(self.takeovers, default=0), 1),
                "sampler_samples": self.sampler.samples,
                "writers_recorded": sum(len(v) for v in self.sampler.history.values()),
                "breaches": len(self.sampler.breaches)}
