"""Prometheus metrics on an optional HTTP endpoint (`[metrics] endpoint`), for a monitoring
system to scrape (prometheus_client's text format; a Grafana dashboard:
contrib/grafana/hostagent.json).

The loop is never stalled by a scrape, nor a scrape by the loop:

- What happens is counted as it happens, by the loop: prometheus_client's counters and
  histograms (each a lock and an add), for tasks that ended, their durations, bytes copied
  and workers started and killed.
- What the loop holds (active tasks by method and state, the backlog, workers alive, the
  bounds' counters) is copied into one plain dict once a second (`refresh`) and swapped in
  whole, so the server's thread reads a snapshot and never a structure the loop is changing.
- Per domain capacity, free space and volumes by legality are read by a reader thread of
  that domain's own (DomainReaders, agent/storage/usage.py), never by the loop or a scrape's
  thread. A scrape waits at most READ_WAIT for them all; a domain that cannot be read, or
  whose storage hangs, answers hostagent_domain_up 0 and the rest is served.

The server serves up to MAX_CONNECTIONS scrapes at once, each in its own thread and cut off
CONNECTION_TIMEOUT after it connected: a slow peer costs one slot for that long, and no peer
can make it hold more than the slots and the listen backlog.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from agent import __version__
from agent.config import parse_endpoint
from agent.storage import usage
from agent.supervisor import stats

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor

CONNECTION_TIMEOUT = 5.0  # seconds a scrape may take, from connecting to its last byte read
MAX_CONNECTIONS = 8  # scrapes served at once; more are closed
READ_WAIT = 1.0  # seconds a scrape waits for the domains' readings, all together
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
LEGALITIES = ("LEGAL", "ILLEGAL")


class Instruments:
    """What the loop counts as it happens (thread-safe: prometheus_client's own locks)."""

    def __init__(self, registry: CollectorRegistry):
        self.tasks_ended = Counter("hostagent_tasks_ended", "Tasks that ended, by method and "
                                   "final state", ["method", "state"], registry=registry)
        self.task_seconds = Histogram("hostagent_task_duration_seconds", "Seconds from a "
                                      "task's admission to its end, by method", ["method"],
                                      buckets=DURATION_BUCKETS, registry=registry)
        self.copy_bytes = Counter("hostagent_copy_bytes", "Bytes copied by copies, as their "
                                  "checkpoints report them", registry=registry)
        self.workers_started = Counter("hostagent_workers_started", "Worker processes asked "
                                       "for", registry=registry)
        self.workers_killed = Counter("hostagent_workers_killed", "Workers killed, by reason: "
                                      "abort, timeout, protocol, linger (ours), signal "
                                      "(someone else's)", ["reason"], registry=registry)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # a *_created series per counter: noise to a dashboard
        self.registry = CollectorRegistry(auto_describe=True)
        self.count = Instruments(self.registry)
        self._ended: dict[tuple[str, str], tuple] = {}
        self._next_refresh = 0.0
        self._snapshot: dict = {}
        self.readers = DomainReaders()
        self.registry.register(_Snapshot(self))
        # process_open_fds against process_max_fds, CPU seconds, memory: from /proc.
        ProcessCollector(namespace="hostagent", registry=self.registry)

    # -- the loop's side ---------------------------------------------------------------

    def start(self, agent: Supervisor) -> str | None:
        """Serve `[metrics] endpoint` in a thread of its own; its URL. One that cannot
        listen (its port taken) is logged and left off: metrics are never a reason for the
        agent not to serve."""
        endpoint = agent.config["metrics"]["endpoint"]
        try:
            server = _Server(parse_endpoint(endpoint), _handler(self.registry))
        except OSError as exc:
            agent.log.error("metrics_unavailable", endpoint=endpoint, error=str(exc))
            return None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self.tick(agent)
        host, port = server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def tick(self, agent: Supervisor) -> None:
        """Each turn of the loop: a new snapshot once a second (a bug in it costs the
        snapshot, never the loop)."""
        now = agent.system.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + 1.0
            agent.guarded("metrics", self.refresh, agent)

    def task_ended(self, task) -> None:
        # On the RPC path (every query is a task): the labelled children are looked up
        # once per (method, state), not per task (labels() costs more than inc()).
        key = (task.method, task.state)
        children = self._ended.get(key)
        if children is None:
            children = self._ended[key] = (self.count.tasks_ended.labels(*key),
                                           self.count.task_seconds.labels(task.method))
        children[0].inc()
        children[1].observe(max(0.0, task.ended - task.created))

    def refresh(self, agent: Supervisor) -> None:
        """A new snapshot from the loop's (agent/supervisor/stats.py, the one Host.getStats
        answers): cheap, no storage."""
        loop = stats.snapshot(agent)
        lim = loop["limits"]
        desc, rpc, events, workers = (lim["descriptors"], lim["rpc"], lim["events"],
                                      lim["workers"])
        self._snapshot = {
            "ready": loop["agent"]["ready"], "started": loop["agent"]["started"],
            "info": {"version": __version__, "host_id": str(agent.config.host_id),
                     "boot_id": loop["agent"]["boot_id"]},
            "tasks": stats.active_by_method(agent),
            "copies": len(loop["copies"]),
            "copy_rate": sum(c["rate"] or 0.0 for c in loop["copies"]),
            "backlog": loop["backlog"], "parked": loop["lockspace_waiting"],
            "workers": loop["workers_running"],
            "counters": {
                ("events_published", "Events published"): events["published"],
                ("events_dropped", "Events not delivered to a slow subscriber (its queue "
                                   "full)"): events["dropped"],
                ("events_oversized", "Events too large to send even trimmed"):
                    events["oversized"],
                ("rpc_messages_dropped", "RPC messages dropped for their routing frames"):
                    rpc["messages_dropped"],
                ("replies_refused", "Requests refused for their client's unread replies"):
                    rpc["replies_refused"],
                ("replies_dropped", "Replies libzmq could not queue to their client"):
                    rpc["replies_dropped"],
                ("listener_pauses", "Times new peers were refused while descriptors were "
                                    "short"): desc["pauses"],
                ("workers_refused", "Workers not started while descriptors were short"):
                    desc["refused_workers"],
                ("worker_strangers", "Messages on the worker socket from no worker of ours"):
                    workers["strangers"],
                ("workers_misbehaved", "Workers stopped for breaking the worker protocol"):
                    workers["misbehaved"],
                ("callback_errors", "Bugs the loop survived (each logged)"):
                    loop["agent"]["callback_errors"],
            },
            "gauges": {
                ("peers", "Connected peers (RPC clients, subscribers, workers)"): desc["peers"],
                ("listening", "1 while new peers are accepted, 0 while refused"):
                    int(desc["listening"]),
                ("unread_reply_bytes", "Bytes of replies their clients have not read"):
                    rpc["unread_reply_bytes"],
            },
            "domains": [(d["domainID"], d["path"], agent.lockspaces.state_of(d["domainID"]))
                        for d in agent.domains.listing()],
        }


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Up to MAX_CONNECTIONS scrapes at once, each in a thread of its own and cut off
    CONNECTION_TIMEOUT after it connected, however it trickles: a slow peer holds one slot
    for that long and no other scrape waits on it. Connections past the slots are closed."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address, handler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # all slots busy: this peer waits for nobody
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        cut = threading.Timer(CONNECTION_TIMEOUT, _cut, [request])
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        pass  # a scraper that hung up or timed out: nothing of ours to report


def _cut(request) -> None:
    """A connection's time is up: wake its thread out of any read or write."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _handler(registry):
    base = MetricsHandler.factory(registry)

    class Handler(base):
        timeout = CONNECTION_TIMEOUT  # socket timeout: a silent peer costs at most this

    return Handler


def _family(kind, name: str, doc: str, labels=()):
    return kind(f"hostagent_{name}", doc, labels=list(labels))


class _Snapshot:
    """The collector the registry asks at each scrape, in the server's thread."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []  # values appear with the first snapshot

    def collect(self):
        snap = self.metrics._snapshot  # one read: the loop swaps in a new dict, whole
        if not snap:
            return
        g = _family(GaugeMetricFamily, "info", "This agent: version, host and boot",
                    ["version", "host_id", "boot_id"])
        g.add_metric([snap["info"]["version"], snap["info"]["host_id"],
                      snap["info"]["boot_id"]], 1)
        yield g
        yield GaugeMetricFamily("hostagent_ready", "1 once start-up is done and the agent "
                                "serves every request", value=int(snap["ready"]))
        yield GaugeMetricFamily("hostagent_start_time_seconds", "When this agent started, "
                                "seconds since the epoch", value=snap["started"])
        g = _family(GaugeMetricFamily, "tasks", "Active tasks, by method and state",
                    ["method", "state"])
        for (method, state), n in sorted(snap["tasks"].items()):
            g.add_metric([method, state], n)
        yield g
        yield GaugeMetricFamily("hostagent_copies_running", "Copies reporting progress",
                                value=snap["copies"])
        yield GaugeMetricFamily("hostagent_copy_rate_bytes_per_second", "All running copies' "
                                "rates together", value=snap["copy_rate"])
        yield GaugeMetricFamily("hostagent_backlog_tasks", "The agent's own tasks (recovered "
                                "and retried copies) waiting for a free slot",
                                value=snap["backlog"])
        yield GaugeMetricFamily("hostagent_lockspace_waiting_tasks", "Tasks waiting for "
                                "their domain's lockspace to be joined", value=snap["parked"])
        yield GaugeMetricFamily("hostagent_workers_alive", "Worker processes alive",
                                value=snap["workers"])
        for (name, doc), value in snap["counters"].items():
            yield CounterMetricFamily(f"hostagent_{name}", doc, value=value)
        for (name, doc), value in snap["gauges"].items():
            yield GaugeMetricFamily(f"hostagent_{name}", doc, value=value)
        yield from _domains(self.metrics.readers, snap["domains"])


class DomainReaders:
    """Each domain's space and volumes, read by a thread of that domain's own
    (agent/storage/usage.py), never by the loop or a scrape's thread: a scrape waits at most
    READ_WAIT for every domain together, and a domain whose reading did not come in that
    time reads hostagent_domain_up 0, while its one reader goes on waiting on the storage
    (a hung domain holds one thread, never more; a new one starts once it returns)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Thread] = {}
        self._last: dict[str, tuple[float, object]] = {}  # domainID -> (when read, reading)

    def read(self, domains: list[tuple[str, str]]) -> dict[str, dict | None]:
        """{domainID: reading, or None if it failed or did not come within READ_WAIT}.
        Only a reading finished after this call began counts (a concurrent scrape's too)."""
        began = time.monotonic()
        with self._lock:
            waiting = []
            for domain_id, path in domains:
                t = self._reading.get(domain_id)
                if t is None or not t.is_alive():
                    t = threading.Thread(target=self._read_one, args=(domain_id, path),
                                         name=f"domain-reader-{domain_id[:8]}", daemon=True)
                    self._reading[domain_id] = t
                    t.start()
                waiting.append(t)
            for gone in set(self._reading) - {d for d, _ in domains}:  # detached since
                self._last.pop(gone, None)
                if not self._reading[gone].is_alive():
                    del self._reading[gone]
        deadline = began + READ_WAIT
        for t in waiting:
            t.join(max(0.0, deadline - time.monotonic()))
        out = {}
        with self._lock:
            for domain_id, _ in domains:
                when, value = self._last.get(domain_id, (0.0, None))
                out[domain_id] = value if when >= began and isinstance(value, dict) else None
        return out

    def _read_one(self, domain_id: str, path: str) -> None:
        try:
            value: object = usage.read(path)
        except (OSError, sqlite3.Error) as exc:
            value = exc
        with self._lock:
            self._last[domain_id] = (time.monotonic(), value)


def _domains(readers: DomainReaders, domains):
    """Each domain's space and volumes, as its reader found them for this scrape."""
    up = _family(GaugeMetricFamily, "domain_up", "1 if the domain's storage answered this "
                 "scrape", ["domain"])
    joined = _family(GaugeMetricFamily, "domain_lockspace_joined", "1 once this host has "
                     "joined the domain's lockspace (always 1 with the local lease manager)",
                     ["domain"])
    capacity = _family(GaugeMetricFamily, "domain_capacity_bytes", "Size of the domain's "
                       "file system", ["domain"])
    free = _family(GaugeMetricFamily, "domain_free_bytes", "Space free for the agent on the "
                   "domain's file system", ["domain"])
    volumes = _family(GaugeMetricFamily, "domain_volumes", "Volumes by legality", ["domain",
                                                                                  "legality"])
    readings = readers.read([(domain_id, path) for domain_id, path, _ in domains])
    for domain_id, path, lockspace in domains:
        joined.add_metric([domain_id], int(lockspace == "joined"))
        got = readings.get(domain_id)
        up.add_metric([domain_id], int(got is not None))
        if got is None:
            continue
        capacity.add_metric([domain_id], got["capacity"])
        free.add_metric([domain_id], got["free"])
        counts = got["volumes"]
        for legality in sorted(set(LEGALITIES) | set(counts)):
            volumes.add_metric([domain_id, legality], counts.get(legality, 0))
    yield from (up, joined, capacity, free, volumes)
