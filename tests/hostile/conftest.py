"""The hostile suite's record: with --hostile-summary FILE, each test appends one JSON line
{test, outcome, seconds, agents_peak_rss} (the largest RSS any agent of the test reached,
sampled every 20 ms), so a long run's figures come from the run itself."""

import json
import threading
import time

import psutil
import pytest


def pytest_addoption(parser):
    parser.addoption("--hostile-summary", default=None,
                     help="append one JSON line per hostile test to this file")


@pytest.fixture
def scale(request):
    return request.config.getoption("--hostile-scale")


def _agents_of(workdir) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "agent" in cmd and any(str(workdir) in a for a in cmd) and "serve" in cmd:
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def peak_rss(request, workdir):
    path = request.config.getoption("--hostile-summary")
    if not path:
        yield
        return
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.02):
            for p in _agents_of(workdir):
                try:
                    peak[0] = max(peak[0], p.memory_info().rss)
                except psutil.Error:
                    pass
    thread = threading.Thread(target=sample, daemon=True)
    began = time.monotonic()
    thread.start()
    yield
    stop.set()
    thread.join(5)
    outcome = getattr(request.node, "rep_call", None)
    with open(path, "a") as f:
        f.write(json.dumps({"test": request.node.nodeid,
                            "outcome": outcome.outcome if outcome else "error",
                            "seconds": round(time.monotonic() - began, 1),
                            "agents_peak_rss": peak[0]}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.when == "call":
        item.rep_call = rep
