"""The metrics endpoint (agent/supervisor/metrics.py), scraped over real HTTP from a running
agent."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, wait_legal


def metrics_url(agent) -> str | None:
    with open(agent.run_dir / "endpoints.json") as f:
        return json.load(f)["metrics"]


def scrape(url: str) -> dict:
    """{(name, ((label, value), ...)): value} of every sample."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_values_move_as_work_is_done(make_agent, workdir):
    agent = make_agent(copy={"max_bytes_per_second": 16 * MiB, "checkpoint_seconds": 0.2})
    url = metrics_url(agent)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    assert agent.call("Host.getStats")["agent"]["metrics"] == url
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 48 * MiB)

    before = wait_for(lambda: (s := scrape(url)) and
                      ("hostagent_domain_up", (("domain", domain_id),)) in s and s,
                      what="the domain in a snapshot")
    assert value(before, "hostagent_ready") == 1
    assert value(before, "hostagent_domain_up", domain=domain_id) == 1
    assert value(before, "hostagent_domain_volumes", domain=domain_id, legality="LEGAL") == 1
    assert value(before, "hostagent_domain_capacity_bytes", domain=domain_id) > \
        value(before, "hostagent_domain_free_bytes", domain=domain_id) > 0
    assert value(before, "hostagent_process_max_fds") >= \
        value(before, "hostagent_process_open_fds") > 0

    dst = dst_for(domain_id)
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="copy-1")
    during = wait_for(lambda: (s := scrape(url)) and
                      value(s, "hostagent_copy_rate_bytes_per_second") > 0 and s,
                      what="a copy's rate")
    assert value(during, "hostagent_tasks", method="Image.copy", state="running") == 1
    assert value(during, "hostagent_copies_running") == 1
    assert value(during, "hostagent_workers_alive") >= 1
    assert value(during, "hostagent_domain_volumes", domain=domain_id, legality="ILLEGAL") == 1
    assert 0 < value(during, "hostagent_copy_bytes_total") < 48 * MiB
    stats = agent.call("Host.getStats")
    [copy] = stats["copies"]
    assert copy["taskID"] == "copy-1" and copy["volumeID"] == dst["volumeID"]
    assert copy["total"] == 48 * MiB and copy["rate"] > 0

    wait_legal(agent, dst)
    # The counters move as a task ends, the gauges with the snapshot the loop refreshes
    # once a second: a scrape may fall between the two, so wait for both in one.
    after = wait_for(lambda: (s := scrape(url)) and
                     value(s, "hostagent_tasks_ended_total", method="Image.copy",
                           state="done") == 1 and
                     value(s, "hostagent_tasks", method="Image.copy", state="running") == 0
                     and value(s, "hostagent_domain_volumes", domain=domain_id,
                               legality="ILLEGAL") == 0 and s,
                     what="the copy counted, no longer running, its volume LEGAL")
    assert value(after, "hostagent_copy_bytes_total") == 48 * MiB
    assert value(after, "hostagent_task_duration_seconds_count", method="Image.copy") == 1
    assert value(after, "hostagent_task_duration_seconds_sum", method="Image.copy") > 1
    assert value(after, "hostagent_tasks", method="Image.copy", state="running") == 0
    assert value(after, "hostagent_domain_volumes", domain=domain_id, legality="LEGAL") == 2
    assert value(after, "hostagent_domain_volumes", domain=domain_id, legality="ILLEGAL") == 0
    assert value(after, "hostagent_events_published_total") > \
        value(before, "hostagent_events_published_total")
    assert value(after, "hostagent_workers_started_total") > \
        value(before, "hostagent_workers_started_total")
    assert agent.call("Host.getStats")["copies"] == []

    # An aborted worker is counted as killed, by its reason; a failed task by its state.
    agent.client().send("Debug.sleep", {"seconds": 60}, id="sleeper")
    wait_for(lambda: task_state(agent, "sleeper") == "running", what="the sleeper running")
    agent.call("Task.abort", {"taskID": "sleeper"})
    # Both are counted in one turn of the loop, which a scrape (a thread of its own) can
    # fall between: wait for both, then hold them.
    end = wait_for(lambda: (s := scrape(url)) and
                   value(s, "hostagent_workers_killed_total", reason="abort") == 1 and
                   value(s, "hostagent_tasks_ended_total", method="Debug.sleep",
                         state="aborted") == 1 and s, what="the abort counted")
    assert value(end, "hostagent_workers_killed_total", reason="abort") == 1
    assert value(end, "hostagent_callback_errors_total") == 0


def test_an_unreadable_domain_reads_down_and_the_rest_goes_on(make_agent, workdir):
    agent = make_agent()
    url = metrics_url(agent)
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    wait_for(lambda: value(scrape(url), "hostagent_domain_up", domain=domain_id) == 1,
             what="the domain up")
    os.rename(workdir / "d", workdir / "gone")  # its storage gone from under the agent
    samples = scrape(url)
    assert value(samples, "hostagent_domain_up", domain=domain_id) == 0
    assert ("hostagent_domain_free_bytes", (("domain", domain_id),)) not in samples
    assert value(samples, "hostagent_ready") == 1


def test_a_silent_or_garbage_peer_costs_neither_the_loop_nor_later_scrapes(make_agent):
    agent = make_agent()
    url = metrics_url(agent)
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    wait_for(lambda: value(scrape(url), "hostagent_ready") == 1, what="the agent ready")
    silent = socket.create_connection((host, int(port)))  # connects, says nothing
    try:
        assert value(scrape(url), "hostagent_ready") == 1  # served beside the silent peer
        for _ in range(20):  # the loop answers while the server waits on the silent peer
            assert agent.call("Host.ping") is True
        for junk in (b"\x00" * 70000 + b"\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                     b"POST /metrics HTTP/1.1\r\nContent-Length: 9999999999\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
    finally:
        silent.close()
    assert value(scrape(url), "hostagent_ready") == 1  # and after it left
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b"x"), timeout=10)
    assert exc.value.code == 501
    assert agent.call("Host.getStats")["agent"]["callback_errors"] == 0
    assert agent.proc.poll() is None


def test_off_when_empty_and_a_taken_port_is_logged_not_fatal(make_agent):
    off = make_agent("off", metrics={"endpoint": ""})
    assert metrics_url(off) is None and off.call("Host.getStats")["agent"]["metrics"] is None
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        busy = make_agent("busy", metrics={"endpoint": f"127.0.0.1:{port}"})
        assert busy.call("Host.ping") is True
        assert metrics_url(busy) is None
        assert "metrics_unavailable" in busy.log()
    finally:
        taken.close()


def test_the_dashboard_asks_only_for_metrics_the_agent_serves(make_agent, workdir):
    """contrib/grafana/hostagent.json: valid JSON, and every hostagent_* series its queries
    name is one a running agent exports (a renamed metric breaks this, not a dashboard)."""
    import re
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "contrib" / "grafana" /
                            "hostagent.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    agent = make_agent()
    agent.call("StorageDomain.create", {"domainID": new_id(), "path": str(workdir / "d")})
    agent.call("Debug.sleep", {"seconds": 0})
    url = metrics_url(agent)

    def names():  # every family the agent declares (# TYPE), samples or not yet
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return {f.name for f in text_string_to_metric_families(text)}
    served = wait_for(lambda: (s := names()) and "hostagent_domain_up" in s and s,
                      what="a full snapshot")
    asked = {re.sub(r"_(bucket|sum|count|total)$", "", n)
             for e in exprs for n in re.findall(r"\bhostagent_[a-z_]+", e)}
    assert not asked - served, asked - served


def test_a_hung_domain_reads_down_and_costs_the_scrape_nothing_else(make_agent, workdir):
    """A domain whose metadata read never returns (its metadata.db a FIFO nobody writes: an
    open that blocks, as on a storage that stopped answering) reads down in every scrape,
    while the healthy domain's gauges and the agent's own are served; the hung reader is one
    thread, never one per scrape."""
    agent = make_agent()
    url = metrics_url(agent)
    healthy, hung = new_id(), new_id()
    for domain_id, name in ((healthy, "ok"), (hung, "hung")):
        agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / name)})
    wait_for(lambda: value(scrape(url), "hostagent_domain_up", domain=hung) == 1,
             what="both domains up")
    db = workdir / "hung" / "metadata.db"
    os.rename(db, workdir / "hung-metadata.db")
    os.mkfifo(db)
    try:
        threads = []
        for _ in range(5):
            samples = scrape(url)
            assert value(samples, "hostagent_domain_up", domain=hung) == 0
            assert ("hostagent_domain_free_bytes", (("domain", hung),)) not in samples
            assert value(samples, "hostagent_domain_up", domain=healthy) == 1
            assert value(samples, "hostagent_domain_free_bytes", domain=healthy) > 0
            assert value(samples, "hostagent_ready") == 1
            threads.append(psutil.Process(agent.proc.pid).num_threads())
        # One reader waits on the hung domain; later scrapes start no other for it (the
        # healthy domain's reader may be finishing: at most one more).
        assert threads[-1] <= threads[0] + 1, threads
        assert agent.call("Host.ping") is True
    finally:
        fd = os.open(db, os.O_WRONLY | os.O_NONBLOCK)  # free the hung reader
        os.close(fd)


def test_a_trickling_client_costs_other_scrapes_nothing(make_agent):
    """A peer that sends its request a byte at a time (each within the socket timeout) holds
    one connection, and only until its time is up; scrapes meanwhile are served."""
    agent = make_agent()
    url = metrics_url(agent)
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    wait_for(lambda: value(scrape(url), "hostagent_ready") == 1, what="the agent ready")
    slow = socket.create_connection((host, int(port)))
    stop = threading.Event()

    def trickle():
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            if stop.wait(0.5):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:  # cut off: its time was up
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        for _ in range(3):
            assert value(scrape(url), "hostagent_ready") == 1
        wait_for(lambda: not t.is_alive(), timeout=30, what="the trickling peer cut off")
    finally:
        stop.set()
        slow.close()
        t.join(5)
