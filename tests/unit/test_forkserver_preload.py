"""What the fork server loads before it forks workers (workers/forkserver.py, preload): all
a worker imports, and not rich, which no worker draws with and which every worker's
resident set carried. Run in a fresh interpreter, as the fork server is."""

import json
import subprocess
import sys

import pytest

PROBE = """
import sys
from workers import forkserver
forkserver.preload()
from agent import logs
try:
    1 / 0
except ZeroDivisionError:
    logs.get(component="probe").exception("probed")
print("LOADED", sorted(m for m in ("rich", "pygments", "workers.ops.image", "zmq")
                       if sys.modules.get(m) is not None), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_fork_server_loads_every_op_and_not_rich_and_still_logs_tracebacks(fmt):
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, env={"HOSTAGENT_LOG_FORMAT": fmt, "PATH": "/usr/bin"})
    assert run.returncode == 0, run.stderr
    loaded = [line for line in run.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded == ["LOADED ['workers.ops.image', 'zmq']"], run.stdout
    assert "ZeroDivisionError: division by zero" in run.stderr, run.stderr
    if fmt == "json":
        line = json.loads(run.stderr.strip().splitlines()[-1])
        assert line["event"] == "probed" and "Traceback" in line["exception"]
