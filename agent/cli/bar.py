"""The progress bar of the commands that move bytes or wait on a copy (rich's, loaded only
by a command that draws one: agent/cli/output.py says why)."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from agent.cli import output


class RateColumn(ProgressColumn):
    """The rate, in the same binary units as the sizes (rich's own speed is decimal)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{output.size(speed)}/s",
                    style="progress.data.speed")


class Bar:
    """A rich progress bar (percent, bytes, rate, eta) updated from the client's thread."""

    def __init__(self, console, label: str, in_bytes: bool):
        columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
        if in_bytes:
            columns += [DownloadColumn(binary_units=True), RateColumn()]
        columns += [TextColumn("eta"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console, refresh_per_second=10)
        self.label = label
        self.task = self.progress.add_task(escape(label), total=None)
        self.fed = False

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, p) -> None:
        if p.total and p.copied is not None:
            total, done = p.total, p.copied
        else:
            total, done = 100.0, p.percent
        current = self.progress.tasks[0].completed
        if not self.fed or done < current:  # first news, or resumed from a checkpoint:
            self.progress.reset(self.task, total=total, completed=done)  # no false rate
            self.fed = True
        else:
            self.progress.update(self.task, total=total, completed=done)
        if done >= total:  # the data is there; a copy then reads it back for its checksum
            self.progress.update(self.task, description=escape(f"{self.label} (verifying)"))

    def finish(self) -> None:
        total = self.progress.tasks[0].total or 100.0
        self.progress.update(self.task, total=total, completed=total,
                             description=escape(self.label))
