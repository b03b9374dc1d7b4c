"""Helpers for the storage tests: child Python processes that are always reaped, and waiting on
facts (a line from a child, a predicate) under a deadline instead of sleeping."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UUIDS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 200)]


from tests.support.harness import wait_for  # noqa: E402,F401  (one definition for all tests)


class Child:
    """A ``python -c code`` process talking one line at a time over stdin/stdout."""

    def __init__(self, code: str, *args: str):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.pid = self.proc.pid

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")

    def expect(self, timeout: float = 30.0) -> str:
        """The next line the child prints; fails (with its stderr) on timeout or exit."""
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = self.proc.stdout.read(1) if ready else None
            if not chunk:
                self.proc.kill()
                err = self.proc.communicate()[1].decode(errors="replace")
                raise AssertionError(f"child {self.pid} gave no line (got {line!r}): {err}")
            line += chunk
        return line.decode().rstrip("\n")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        return self.proc.returncode
