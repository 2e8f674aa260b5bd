"""Progress bars and result tables (rich), shared by every command."""

from __future__ import annotations

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


def track(iterable, total: int, description: str):
    """Iterate with a progress bar; a failure hides the bar so the error stays the only line printed."""
    with progress() as p:
        task = p.add_task(description, total=total, info="")
        try:
            for item in iterable:
                yield item
                p.advance(task)
        except BaseException:
            p.update(task, visible=False)
            raise


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
