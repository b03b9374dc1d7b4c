"""The invariants the chaos suite checks, each a function that raises Breach when broken.

tests/chaos/test_invariants.py breaks each one on purpose and shows its checker catches it.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import psutil

from tests.support.storage_flow import sha256

# A restarted agent answers Host.ping within this. Measured (docs/reliability.md): start to
# first answer is ~0.2-0.5 s on this 2-core VM, a few seconds under full CI load.
PING_BOUND_SECONDS = 15.0
WRITABLE = ("w", "a", "r+", "w+", "a+")


class Breach(AssertionError):
    pass


def check_destination(status: dict, src_path: str, dst_path: str) -> str:
    """LEGAL with the source's data, or ILLEGAL with a marker: never LEGAL with other data."""
    if status["legality"] == "LEGAL":
        if status["copy"] is not None:
            raise Breach(f"{status['volumeID']} is LEGAL and still has a copy marker")
        if sha256(dst_path) != sha256(src_path):
            raise Breach(f"{status['volumeID']} is LEGAL with data that differs from its source")
        return "legal"
    if status["copy"] is None:
        raise Breach(f"{status['volumeID']} is ILLEGAL without a copy marker")
    return "copying"


def check_integrity(domain_path: str) -> None:
    conn = sqlite3.connect(f"file:{domain_path}/metadata.db?mode=ro", uri=True, timeout=30)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        result = f"unreadable: {exc}"
    finally:
        conn.close()
    if result != "ok":
        raise Breach(f"integrity_check of {domain_path}: {result}")


def check_no_leftover(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    """Every process listed (the workers of a supervisor that died) is gone in time."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _alive(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise Breach(f"workers outlived their supervisor: {[p.pid for p in alive]}")
        time.sleep(0.02)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_no_zombies(parent_pid: int, timeout: float = 3.0) -> None:
    """No child of `parent_pid` stays a zombie: the parent reaps what ends."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            zombies = [c.pid for c in psutil.Process(parent_pid).children()
                       if c.status() == psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return
        if not zombies:
            return
        if time.monotonic() > deadline:
            raise Breach(f"zombies left unreaped by {parent_pid}: {zombies}")
        time.sleep(0.02)


def check_ping_bound(seconds: float, bound: float = PING_BOUND_SECONDS) -> None:
    if seconds > bound:
        raise Breach(f"a restarted agent took {seconds:.2f} s to answer Host.ping (> {bound})")


class WriterSampler(threading.Thread):
    """Samples, every few milliseconds, which processes have a watched volume file open for
    writing (from /proc, through psutil: what the kernel says, not what the agent says).
    Two at one moment is a breach: two processes writing one volume. Processes are found by
    their command line (`marker` in it), not as children of a supervisor, so a worker that
    outlived its supervisor is sampled too."""

    def __init__(self, marker: str, interval: float = 0.01):
        super().__init__(daemon=True)
        self.marker = marker
        self.interval = interval
        self.paths: set[str] = set()
        self.breaches: list[str] = []
        self.samples = 0
        # The record of who wrote when: path -> pid -> [first seen, last seen] (monotonic).
        self.history: dict[str, dict[int, list[float]]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        writers: dict[str, set[int]] = {}
        for p in psutil.process_iter(["cmdline"]):
            if self.marker not in " ".join(p.info["cmdline"] or ()):
                continue
            try:
                files = p.open_files()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for f in files:
                if f.path in self.paths and f.mode in WRITABLE:
                    writers.setdefault(f.path, set()).add(p.pid)
        self.samples += 1
        now = time.monotonic()
        for path, pids in writers.items():
            seen = self.history.setdefault(path, {})
            for pid in pids:
                seen.setdefault(pid, [now, now])[1] = now
            if len(pids) > 1:
                self.breaches.append(f"{path} open for writing by {sorted(pids)}")

    def overlaps(self) -> list[str]:
        """Writers of one volume whose recorded times overlap (the record, checked)."""
        found = []
        for path, seen in self.history.items():
            spans = sorted(seen.items(), key=lambda kv: kv[1][0])
            for (pid_a, (_, end_a)), (pid_b, (start_b, _)) in zip(spans, spans[1:]):
                if start_b <= end_a:
                    found.append(f"{path}: pid {pid_a} until {end_a:.3f}, pid {pid_b} "
                                 f"from {start_b:.3f}")
        return found

    def check(self) -> None:
        if self.breaches:
            raise Breach("two processes wrote one volume: " + "; ".join(self.breaches[:3]))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
