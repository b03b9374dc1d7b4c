"""`hostagent top`: a full-terminal live view of what the agent is doing, until Ctrl-C.

The view is refreshed from events as they come (Task.state, Task.progress, Image.copy) and
from polling (Host.getStats and the active tasks, every POLL_SECONDS, and at once after a
gap or a restart in the events): events keep it live between polls, polls keep it true when
events are lost, late or not arriving at all (a subscriber the agent cannot reach, a CURVE
key the events socket refuses). An agent that stops answering is said on the screen, and
the view goes on trying.
"""

from __future__ import annotations

import time

from agent.cli import output, views
from agent.cli.output import escape
from agent.client import CallError, Timeout
from agent.supervisor.copies import CopyMeter

POLL_SECONDS = 2.0
FRAME_SECONDS = 0.25
RECENT = 8  # ended tasks kept on the screen
NEWS_SECONDS = 1.0  # a task that succeeded is shown among the lately ended if it took this


class View:
    """What the screen shows, updated by polls and events (no I/O of its own)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.stats: dict = {}
        self.host = ""
        self.tasks: dict[str, dict] = {}  # active ones, by ID
        self.recent: list[dict] = []  # the last ended, newest first
        self.meter = CopyMeter(clock)  # rates from Image.copy events, between polls
        self.polled_copies: dict[str, dict] = {}
        self.last_poll = self.last_event = None
        self.trouble: str | None = None

    # -- what comes in -----------------------------------------------------------------

    def polled(self, stats: dict, tasks: list[dict]) -> None:
        self.stats, self.trouble = stats, None
        self.tasks = {str(t["id"]): t for t in tasks}
        self.polled_copies = {str(c["taskID"]): c for c in stats.get("copies") or []}
        self.meter.keep_only(self.tasks)
        self.last_poll = self.clock()

    def event(self, ev) -> None:
        self.last_event = self.clock()
        p = ev.params
        if ev.topic == "Task.state":
            record = p.get("task") or {}
            task_id = str(record.get("id"))
            if record.get("state") in ("pending", "running", "aborting"):
                self.tasks[task_id] = {**self.tasks.get(task_id, {}), **record}
            else:
                # Work that took a while, and every failure: queries (this view's own polls,
                # an engine's Image.getStatus in a worker) are done in milliseconds and are
                # no news.
                self.tasks.pop(task_id, None)
                self.polled_copies.pop(task_id, None)
                self.meter.forget(task_id)
                took = (record.get("ended") or 0) - (record.get("created") or 0)
                if took >= NEWS_SECONDS or record.get("state") != "done":
                    self.recent = [record, *[r for r in self.recent
                                             if str(r.get("id")) != task_id]][:RECENT]
        elif ev.topic == "Task.progress":
            task = self.tasks.get(str(p.get("taskID")))
            if task is not None:
                task["progress"] = p.get("progress")
        elif ev.topic == "Image.copy" and p.get("taskID") is not None:
            task_id = str(p["taskID"])
            if task_id in self.tasks:
                self.meter.report(task_id, p)

    def copies(self) -> list[dict]:
        """Each running copy as last heard of: events where they are newer than the poll."""
        merged = dict(self.polled_copies)
        for c in self.meter.running():
            old = merged.get(c["taskID"])
            if old is None or old.get("volumeID") != c["volumeID"] or \
                    (c["copied"] or 0) >= (old.get("copied") or 0):
                merged[c["taskID"]] = {**(old or {}), **{k: v for k, v in c.items()
                                                         if v is not None}}
        return [c for task_id, c in merged.items() if task_id in self.tasks]

    # -- what goes out -----------------------------------------------------------------

    def render(self):
        from rich.console import Group  # rich where it draws (agent/cli/output.py)
        from rich.progress_bar import ProgressBar
        from rich.text import Text
        now = self.clock()
        agent = self.stats.get("agent") or {}
        counts: dict[str, int] = {}
        for t in self.tasks.values():
            counts[t.get("state")] = counts.get(t.get("state"), 0) + 1
        copies = self.copies()
        source = "events" if self.last_event is not None and \
            now - self.last_event < 3 * POLL_SECONDS else "polling"
        head = Text.from_markup(
            f"[bold]hostagent top[/]  {escape(self.host)}  "
            + (views.readiness(agent) if agent else "[yellow]connecting[/]")
            + f"   up {output.duration(agent.get('uptime_seconds'))}"
            + f"   workers {self.stats.get('workers_running', '-')}"
            + f"   backlog {self.stats.get('backlog', '-')}"
            + f"   {time.strftime('%H:%M:%S')} ({source})")
        lines = [head]
        if self.trouble:
            lines.append(Text.from_markup(f"[bold red]{escape(self.trouble)}[/]  (retrying)"))
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no active task"
        lines.append(Text(f"tasks: {summary}; copies: {len(copies)}, "
                          f"{views.rate(sum(c.get('rate') or 0 for c in copies))}"))
        if copies:
            # The bar is the task's progress (reported many times a second); the bytes are
            # the last checkpoint's, what a crash now would keep.
            t = output.table("COPY TASK", "VOLUME", "", "PROGRESS", "DURABLE", "RATE", "ETA",
                             title="\ncopies")
            for c in copies:
                total, copied = c.get("total") or 0, c.get("copied") or 0
                progress = (self.tasks.get(c["taskID"]) or {}).get("progress")
                if not isinstance(progress, (int, float)):
                    progress = 100.0 * copied / total if total else 0.0
                t.add_row(escape(c["taskID"]), str(c.get("volumeID"))[:13],
                          ProgressBar(total=100.0, completed=progress, width=30),
                          f"{progress:5.1f}%",
                          f"{output.size(copied)} of {output.size(total)}",
                          views.rate(c.get("rate")), views.eta(c))
            lines.append(t)
        t = output.table("TASK", "METHOD", "STATE", "PROGRESS", "AGE", title="\nactive tasks")
        for task in sorted(self.tasks.values(), key=lambda r: r.get("created") or 0):
            progress = task.get("progress")
            t.add_row(escape(str(task.get("id"))), task.get("method"),
                      output.styled(task.get("state")),
                      "-" if progress is None else f"{progress:.1f}%",
                      output.ago(task.get("created")))
        lines.append(t if self.tasks else Text("\nno active task"))
        if self.recent:
            t = output.table("TASK", "METHOD", "STATE", "ENDED", "ERROR", title="\nlately ended")
            for r in self.recent:
                err = ((r.get("error") or {}).get("data") or {}).get("name") or ""
                t.add_row(escape(str(r.get("id"))), r.get("method"), output.styled(r.get("state")),
                          output.ago(r.get("ended")), escape(err))
            lines.append(t)
        lines.append(Text("\nCtrl-C to quit", style="dim"))
        return Group(*lines)


def poll(ctx, view: View) -> None:
    try:
        stats = ctx.client.call("Host.getStats")
        own = ctx.client.new_id()  # the query lists itself while it runs: left out
        tasks = [t for t in ctx.client.call("Task.getAll", {"states": views.ACTIVE}, own)
                 if str(t.get("id")) != own]
    except (CallError, Timeout) as exc:
        view.trouble = f"the agent did not answer: {exc}"
        view.last_poll = view.clock()
        return
    view.polled(stats, tasks)


def top(ctx, args) -> int:
    if ctx.json:
        raise output.UsageError("top is a view for people; for scripts: status --json, "
                                "tasks --json, watch --json")
    view = View()
    try:
        view.host = str(ctx.client.call("Host.getCapabilities").get("host_id"))
    except (CallError, Timeout):
        pass
    sub = ctx.client.subscribe(["Task.state", "Task.progress", "Image.copy", "Host.booted"])
    poll(ctx, view)
    drawn = 0.0
    from rich.live import Live
    try:
        with Live(view.render(), console=ctx.out, screen=True, auto_refresh=False,
                  transient=True) as live:
            while True:
                ev = sub.next(FRAME_SECONDS)
                stale = False
                while ev is not None:  # everything that is there, then one frame
                    stale = stale or bool(ev.gap or ev.restarted)
                    if ev.topic:
                        view.event(ev)
                    ev = sub.next(0)
                now = view.clock()
                if stale or now - (view.last_poll or 0) >= POLL_SECONDS:
                    poll(ctx, view)
                if now - drawn >= FRAME_SECONDS:
                    live.update(view.render(), refresh=True)
                    drawn = now
    except KeyboardInterrupt:
        return output.OK
    finally:
        sub.close()


def add_parsers(sub, common) -> None:
    p = sub.add_parser("top", parents=[common],
                       help="a live full-terminal view of tasks and copies (Ctrl-C quits)")
    p.set_defaults(func=top)
