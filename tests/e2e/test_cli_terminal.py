"""`hostagent copy --wait` in a real terminal: a pseudo-terminal, and tmux for Ctrl-C.

What a person sees: a live progress bar (percent, bytes, rate, eta) that reaches 100 %, and a
Ctrl-C that detaches without aborting the copy and says how to abort it.
"""

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.e2e.test_cli import HOSTAGENT, clean_env
from tests.support.harness import pane_exit_code, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, status

COPY = {"chunk_bytes": 4 * MiB, "checkpoint_bytes": 16 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 64 * MiB}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")


@pytest.fixture
def copying(make_agent, workdir, request):
    """An agent with a 160 MiB source to copy, at 64 MiB/s unless the test asks for another
    rate (indirect parametrization)."""
    domain_id = new_id()
    agent = make_agent(copy={**COPY, "max_bytes_per_second": getattr(request, "param",
                                                                     64 * MiB)})
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    agent.domain = domain_id
    agent.src = make_source(agent, domain_id, 160 * MiB)
    return agent


def loc(d: dict) -> str:
    return f"{d['domainID']}/{d['imageID']}/{d['volumeID']}"


def run_in_pty(argv, timeout: float = 90.0, columns: int = 120) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin, stdout and stderr; (exit code, output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    env = clean_env(TERM="xterm-256color", COLUMNS=str(columns), LINES="30")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"still running after {timeout} s: {b''.join(chunks)[-2000:]!r}"
            if select.select([master], [], [], min(left, 1.0))[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child side is closed
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(10), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_progress_bar_renders_live_and_reaches_100(copying):
    dst = dst_for(copying.domain)
    code, raw = run_in_pty([str(HOSTAGENT), "--config", str(copying.config_path), "copy",
                            loc(copying.src), loc(dst), "--wait"])
    screen = ANSI.sub("", raw)
    assert code == 0, screen[-3000:]
    assert "\x1b[" in raw, "no terminal control sequences: the bar was not live"
    frames = [line for line in re.split(r"[\r\n]+", screen) if "MiB" in line and "%" in line]
    percents = [int(m.group(1)) for line in frames if (m := re.search(r"(\d+)%", line))]
    assert any(0 < p < 100 for p in percents), frames[:5]  # seen while it moved
    assert 100 in percents, frames[-5:]
    final = [line for line in frames if "100%" in line][-1]
    assert "160.0/160.0 MiB" in final and "/s" in final and "eta" in final, final
    assert "━" in raw  # the bar itself
    assert "Traceback" not in screen
    assert "is LEGAL" in screen and status(copying, dst)["legality"] == "LEGAL"


# Slow enough (10 s) that the copy is still running when the bar has shown and Ctrl-C
# lands, however long the CLI takes to start on a loaded machine.
@pytest.mark.parametrize("copying", [16 * MiB], indirect=True)
def test_ctrl_c_detaches_without_aborting(copying, tmux):
    dst = dst_for(copying.domain)
    pid = tmux.start(f"{HOSTAGENT} --config {copying.config_path} copy {loc(copying.src)} "
                     f"{loc(dst)} --wait --id cc-1", width=120, height=30)
    wait_for(lambda: re.search(r"\b([1-9]\d?)%", tmux.screen()), 30,
             what="the bar on the tmux screen moving")
    tmux("send-keys", "-t", "t", "C-c")
    code = wait_for(lambda: (c := pane_exit_code(tmux, pid)) is not None and [c], 20,
                    what="hostagent to exit on Ctrl-C")[0]
    screen = tmux.screen()
    assert code == 130, (code, screen)
    assert "detached" in screen and "Task.abort" in screen and "cc-1" in screen, screen
    assert "Traceback" not in screen
    # Detached, not aborted: the copy goes on to its end.
    assert copying.call("Task.getStatus", {"taskID": "cc-1"})["state"] in ("running", "done")
    wait_for(lambda: status(copying, dst)["legality"] == "LEGAL", 60, what="the copy to end")
