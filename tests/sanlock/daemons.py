"""Real sanlock daemons for tests: one per simulated host, each with its own run dir (so a
client picks its daemon by SANLOCK_RUN_DIR), without a hardware watchdog (`-w 0`, as
sanlock's own tests run), stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.harness import wait_for

needs_sanlock = pytest.mark.skipif(
    shutil.which("sanlock") is None or subprocess.run(
        [sys.executable, "-c", "import sanlock"], capture_output=True).returncode != 0,
    reason="sanlock and python3-sanlock are not installed")


class Daemon:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SANLOCK_RUN_DIR": str(self.run_dir), "SANLOCK_PRIVILEGED": "0"}
        log = open(self.run_dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(["sanlock", "daemon", "-D", "-w", "0", "-l", "0", "-h", "0",
                                      "-U", "root", "-G", "root"], env=env, stdout=log,
                                     stderr=log, start_new_session=True)
        log.close()
        wait_for(lambda: (self.run_dir / "sanlock.sock").exists() or self.proc.poll() is not None,
                 what="the sanlock daemon's socket")
        assert self.proc.poll() is None, (self.run_dir / "daemon.log").read_text()[-2000:]
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as a host's death: its lockspaces lapse on the storage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def client(self, *args: str) -> str:
        env = {**os.environ, "SANLOCK_RUN_DIR": str(self.run_dir)}
        return subprocess.run(["sanlock", "client", *args], env=env, capture_output=True,
                              text=True, timeout=60).stdout

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:  # its children first (none expected), then itself
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        self.kill()
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
