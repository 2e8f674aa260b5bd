"""Progress bars and result tables (rich), shared by every command."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


@contextlib.contextmanager
def hide_on_error(bar: Progress):
    """A task on `bar` that disappears if the block fails, so the error stays the only line printed."""
    task = bar.add_task("", total=None, info="")
    try:
        yield task
    except BaseException:
        bar.update(task, visible=False)
        raise


def track(iterable, total: int, description: str):
    """Iterate with a progress bar (hidden again if the loop fails)."""
    with progress() as p, hide_on_error(p) as task:
        p.update(task, total=total, description=description)
        for item in iterable:
            yield item
            p.advance(task)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
