"""`hostagent tasks`, `hostagent status` and `hostagent watch`: what the agent is doing."""

from __future__ import annotations

import json
import sys
import time

from agent.cli import output
from agent.cli.output import escape
from agent.client import CallError

ACTIVE = ["pending", "running", "aborting"]


def tasks(ctx, args) -> int:
    states = args.state or (ACTIVE if args.active else None)
    records = ctx.calls.call("Task.getAll", {"states": states} if states else None)
    if ctx.json:
        output.emit_json(records)
        return output.OK
    if not records:
        ctx.out.print("no task" + (f" in state {', '.join(states)}" if states else ""))
        return output.OK
    t = output.table("TASK", "METHOD", "STATE", "PROGRESS", "CREATED", "ENDED", "ERROR")
    for r in records:
        err = (r.get("error") or {})
        progress = r.get("progress")
        t.add_row(escape(str(r.get("id"))), r.get("method"), output.styled(r.get("state")),
                  "-" if progress is None else f"{progress:.1f}%", output.ago(r.get("created")),
                  output.ago(r.get("ended")) if r.get("ended") else "-",
                  escape(f"{(err.get('data') or {}).get('name')}: {err.get('message')}") if err else "")
    ctx.out.print(t)
    return output.OK


FULL_FRACTION = 0.05  # a domain with less than this part of its capacity free is "full"


def domain_state(d: dict) -> str:
    """What an operator looks at first about a domain: ok, joining, failed (its lockspace),
    unreachable (its storage did not answer) or full."""
    lockspace = d.get("lockspace")
    if lockspace in ("joining", "failed"):
        return lockspace
    if d.get("error"):
        return "unreachable"
    info = d.get("info") or {}
    capacity, free = info.get("capacity"), info.get("free")
    if isinstance(capacity, int) and isinstance(free, int) and capacity and \
            free < capacity * FULL_FRACTION:
        return "full"
    return "ok"


def rate(n) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{output.size(n)}/s"


def eta(copy: dict) -> str:
    left = (copy.get("total") or 0) - (copy.get("copied") or 0)
    r = copy.get("rate")
    return output.duration(left / r) if r and left > 0 else "-"


def copies_table(copies: list[dict], title: str | None = None):
    t = output.table("TASK", "VOLUME", "COPIED", "PROGRESS", "RATE", "ETA", title=title)
    for c in copies:
        total, copied = c.get("total"), c.get("copied")
        percent = f"{100.0 * copied / total:.1f}%" if total and copied is not None else "-"
        volume = str(c.get("volumeID")) + (" (merge)" if c.get("kind") == "merge" else "")
        t.add_row(escape(str(c.get("taskID"))), volume,
                  f"{output.size(copied)} of {output.size(total)}", percent, rate(c.get("rate")),
                  eta(c))
    return t


def readiness(agent: dict) -> str:
    since = agent.get("ready_since")
    if agent.get("ready"):
        return f"[green]ready[/] since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" \
            f" ({output.ago(since)})" if since else "[green]ready[/]"
    return f"[yellow]starting[/]: start-up recovery still running (started " \
        f"{output.ago(agent.get('started'))})"


def status(ctx, args) -> int:
    caps = ctx.calls.call("Host.getCapabilities")
    stats = ctx.calls.call("Host.getStats")
    domains = ctx.calls.call("StorageDomain.list")
    for d in domains:
        try:
            d["info"] = ctx.calls.call("StorageDomain.getInfo", {"domainID": d["domainID"]})
        except CallError as exc:
            d["error"] = d.get("error") or exc.error
        d["state"] = domain_state(d)
    if ctx.json:
        output.emit_json({"host": {k: caps.get(k) for k in ("version", "host_id", "boot_id",
                                                            "kernel_boot_id")},
                          "stats": stats, "domains": domains})
        return output.OK
    agent = stats.get("agent") or {}
    mem = stats.get("memory") or {}
    counts = stats.get("tasks") or {}
    copies = stats.get("copies") or []
    waiting = []
    if stats.get("backlog"):
        waiting.append(f"{stats['backlog']} recovered or retried copies waiting for a slot")
    if stats.get("lockspace_waiting"):
        waiting.append(f"{stats['lockspace_waiting']} tasks waiting for a lockspace")
    ctx.out.print(output.fields([
        ("host", caps.get("host_id")),
        ("agent", f"hostagent {caps.get('version')}, pid {agent.get('pid')}, up "
                  f"{output.duration(agent.get('uptime_seconds'))}, boot "
                  f"{str(caps.get('boot_id'))[:8]}"),
        ("state", readiness(agent)),
        ("tasks", ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"),
        ("copies", f"{len(copies)} in progress, {rate(sum(c.get('rate') or 0 for c in copies))}"
                   if copies else "none in progress"),
        ("backlog", "; ".join(waiting) or "none"),
        ("workers", str(stats.get("workers_running"))),
        ("cpu", f"{stats.get('cpu_percent')}% of {stats.get('cpu_count')} cpus, load "
                + " ".join(f"{x:.2f}" for x in stats.get("load") or [])),
        ("memory", f"{output.size(mem.get('available'))} free of {output.size(mem.get('total'))}"
                   f" ({mem.get('percent')}% used); the agent {output.size(agent.get('rss_bytes'))}"),
        ("metrics", agent.get("metrics") or "off"),
    ], "host"), crop=False)
    if copies:
        ctx.out.print(copies_table(copies, title="\ncopies in progress"))
    ctx.out.print(domains_table(domains) if domains else "\nno domain attached")
    return output.OK


def domains_table(domains: list[dict]):
    t = output.table("DOMAIN", "STATE", "PATH", "BY", "CAPACITY", "FREE", "VOLUMES", "COPYING",
                     title="\ndomains")
    for d in domains:
        info = d.get("info") or {}
        state = output.styled(d["state"])
        if d.get("error") and not info:  # its info could not be read, or its lockspace failed
            err = d["error"]
            t.add_row(d["domainID"], state, d["path"], d.get("attached_by"),
                      f"[red]{escape(str((err.get('data') or {}).get('name')))}[/]", "", "", "")
            continue
        t.add_row(d["domainID"], state, d["path"], d.get("attached_by"),
                  output.size(info.get("capacity")), output.size(info.get("free")),
                  str(info.get("volumes")), str(info.get("copies")))
    return t


def describe(ev) -> str:
    """One event as a line for people."""
    p = ev.params
    if ev.topic == "Host.booted":
        return f"the agent on {p.get('host_id')} is up (boot {str(ev.boot_id)[:8]})"
    if ev.topic == "Task.state":
        r = p.get("task") or {}
        err = (r.get("error") or {}).get("data", {}).get("name")
        return f"{r.get('id')}  {r.get('method')}  {r.get('state')}" + (f"  {err}" if err else "")
    if ev.topic == "Task.progress":
        return f"{p.get('taskID')}  {p.get('progress', 0):.1f}%"
    if ev.topic == "Image.copy":
        line = f"{p.get('volumeID')}  {p.get('state')}"
        if p.get("total") is not None and p.get("copied") is not None:
            line += f"  {output.size(p['copied'])} of {output.size(p['total'])}"
        return line + f"  (task {p.get('taskID')})"
    if ev.topic == "Image.recovered":
        return (f"{p.get('volumeID')}  policy {p.get('policy')}: {p.get('action')}  "
                f"{output.size(p.get('copied'))} of {output.size(p.get('total'))}"
                + (f"  (task {p['taskID']})" if p.get("taskID") else ""))
    if ev.topic == "Operation.state":
        return f"{p.get('operationID')}  {p.get('type', 'operation')}  {p.get('state')}"
    rest = {k: v for k, v in p.items() if k not in ("seq", "boot_id")}
    return json.dumps(rest, separators=(",", ":"))


def watch(ctx, args) -> int:
    """Events until Ctrl-C (exit 0), as lines for people or JSON lines; lost events and
    restarts are said, since after either what was shown may be stale."""
    sub = ctx.client.subscribe(args.topics or None)
    try:
        while True:
            ev = sub.next(None)
            if ctx.json:
                body = dict(ev.raw) if ev.raw else {"method": None, "params": {}}
                if ev.gap:
                    body["gap"] = ev.gap
                if ev.restarted:
                    body["restarted"] = True
                sys.stdout.write(json.dumps(body) + "\n")
                sys.stdout.flush()
                continue
            if ev.restarted:
                ctx.out.print(f"[bold yellow]-- the agent restarted (boot {str(ev.boot_id)[:8]})"
                              f": its tasks are forgotten, re-read state --[/]")
            elif ev.gap:
                ctx.out.print(f"[bold yellow]-- {ev.gap} events lost: re-read state --[/]")
            if ev.topic:
                stamp = time.strftime("%H:%M:%S")
                ctx.out.print(f"{stamp}  [bold]{ev.topic:<15}[/]  {escape(describe(ev))}",
                              markup=True, highlight=False)
    finally:
        sub.close()


def add_parsers(sub, common) -> None:
    p = sub.add_parser("tasks", parents=[common], help="a table of this agent's tasks")
    p.add_argument("--state", action="append", choices=ACTIVE + ["done", "failed", "aborted"],
                   help="only tasks in this state (repeatable)")
    p.add_argument("--active", action="store_true", help="only active tasks")
    p.set_defaults(func=tasks)
    p = sub.add_parser("status", parents=[common], help="host statistics and domains")
    p.set_defaults(func=status)
    p = sub.add_parser("watch", parents=[common], help="events as lines for people")
    p.add_argument("topics", nargs="*", help="topic prefixes (default: all)")
    p.set_defaults(func=watch)
