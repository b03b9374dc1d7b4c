"""The agent's numbers checked by an operator's own tools (Debian's prometheus package): its
scrape passes `promtool check metrics` while it works, the alerting rules pass `promtool
check rules` and their unit tests, and a real Prometheus server, started here on a free
port with its own config and data dir, scrapes a working agent and evaluates every query of
the Grafana dashboard and every alerting rule without an error, each query returning series."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_metrics import metrics_url
from tests.support.harness import kill_all, task_state, wait_for, worker_of
from tests.support.storage_flow import MiB, dst_for, make_source, new_id

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus"
DASHBOARD = REPO / "contrib" / "grafana" / "hostagent.json"
pytestmark = [pytest.mark.skipif(shutil.which("promtool") is None or
                                 shutil.which("prometheus") is None,
                                 reason="Debian's prometheus package is not installed"),
              pytest.mark.timeout(180)]


@pytest.fixture
def busy(make_agent, workdir):
    """An agent doing what its numbers describe: a domain, a copy running (rate-limited),
    tasks ended, a worker killed by someone else's signal."""
    agent = make_agent(copy={"max_bytes_per_second": 8 * MiB, "checkpoint_seconds": 0.2})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 256 * MiB)
    agent.client().call("Image.copy", {"src": src, "dst": dst_for(domain_id)}, id="copy-1")
    sleeper = agent.client()
    sleeper.send("Debug.sleep", {"seconds": 60}, id="sleep-1")  # answered when it ends
    worker_of(agent, "sleep-1").kill()
    wait_for(lambda: task_state(agent, "sleep-1") == "failed", what="the killed worker seen")
    return agent


def promtool(*args, data: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=data, capture_output=True, timeout=60,
                          cwd=cwd)


def test_a_busy_agents_scrape_passes_promtool(busy):
    url = metrics_url(busy)

    def working():  # the copy's progress reaches the loop's snapshot within a second
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read()
        return b"hostagent_copies_running 1.0" in text and b'reason="signal"' in text and text
    text = wait_for(working, timeout=30, interval=0.2, what="a scrape of the agent at work")
    out = promtool("check", "metrics", data=text)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_the_alerting_rules_pass_promtool_and_their_unit_tests():
    checked = promtool("check", "rules", "hostagent-rules.yml", cwd=RULES)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    tested = promtool("test", "rules", "hostagent-rules.test.yml", cwd=RULES)
    assert tested.returncode == 0 and b"SUCCESS" in tested.stdout, tested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, expr: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}), timeout=10) as resp:
        return json.load(resp)


@pytest.fixture
def prometheus(busy, workdir):
    """A Prometheus server of its own, scraping the busy agent every second and evaluating
    the alerting rules; killed by pid at the end."""
    target = urllib.parse.urlparse(metrics_url(busy)).netloc
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "hostagent-rules.yml")],
        "scrape_configs": [{"job_name": "hostagent",
                            "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False
    try:
        wait_for(ready, timeout=60, interval=0.2, what="prometheus ready")
        yield base
    finally:
        kill_all([psutil.Process(proc.pid)])
        proc.wait()
        log.close()


def test_a_real_prometheus_evaluates_the_dashboard_and_the_rules(busy, prometheus):
    def scraped_enough():  # rates over [5m] need two samples; three to be sure
        got = query(prometheus, 'count_over_time(hostagent_ready{job="hostagent"}[5m])')
        return got["data"]["result"] and float(got["data"]["result"][0]["value"][1]) >= 3
    wait_for(scraped_enough, timeout=60, interval=0.5, what="three scrapes of the agent")
    up = query(prometheus, 'up{job="hostagent"}')["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    empty = []
    for expr in exprs:
        got = query(prometheus, re.sub(r'=~"\$instance"', '=~".*"', expr))
        assert got["status"] == "success", (expr, got)
        if not got["data"]["result"]:
            empty.append(expr)
    assert not empty, empty

    def all_rules_evaluated():
        with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as resp:
            groups = json.load(resp)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 9 and all(r.get("lastEvaluation", "").startswith("2")
                                       and not r["lastEvaluation"].startswith("0001")
                                       for r in rules) and rules
    rules = wait_for(all_rules_evaluated, timeout=30, interval=0.5, what="every rule run")
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                      for r in rules if r["health"] != "ok"]
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], firing  # a healthy, working agent raises nothing
