"""Progress of long jobs: a live rich bar on a terminal, nothing extra anywhere else.

The plain `log(...)` lines of a job are its output in CI and log files. On a terminal the bar is
drawn below them (rich redirects `print` above a live display) with step/total, the latest
stats and the ETA. Bars opened while one is on screen join it as another row, because rich
shows one live display at a time.
"""

import atexit
from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_shown: list[Progress] = []  # the live display on screen, if any


def on_terminal(log=print, console: Console | None = None) -> bool:
    """Draw bars only when output goes to a terminal through print (tests and callers pass their own log)."""
    return log is print and (console or Console()).is_terminal


def format_stats(stats: dict[str, float | None]) -> str:
    """{'loss': 1.2345, 'tokens_per_second': 812.3} -> 'loss 1.235 · 812 tok/s'."""
    formats = {
        "loss": "loss {:.3f}",
        "val_loss": "val {:.3f}",
        "tokens_per_second": "{:.0f} tok/s",
        "peak_memory_gb": "peak {:.2f} GB",
    }
    return " · ".join(f.format(stats[k]) for k, f in formats.items() if stats.get(k) is not None)


class Bar:
    """One job of `total` steps; a no-op unless on a terminal."""

    def __init__(
        self, description: str, total: int | None, log=print, console: Console | None = None, transient: bool = False
    ):
        self.stats: dict[str, float | None] = {}
        self.progress, self.owner = None, False
        if not on_terminal(log, console):
            return
        if _shown:
            self.progress = _shown[-1]
        else:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=transient,
            )
            self.progress.start()
            _shown.append(self.progress)
            self.owner = True
            atexit.register(self.close)  # restores the cursor if the job dies with an exception
        self.task = self.progress.add_task(description, total=total, stats="")

    def advance(self, steps: int = 1, completed: int | None = None, **stats: float | None) -> None:
        """Move on `steps` (or to `completed`) and show any new stats (loss=..., val_loss=..., ...)."""
        if self.progress is None:
            return
        self.stats.update(stats)
        self.progress.update(self.task, advance=steps, completed=completed, stats=format_stats(self.stats))

    def close(self) -> None:
        if self.progress is None:
            return
        if self.owner:
            self.progress.stop()
            _shown.remove(self.progress)
        else:
            self.progress.remove_task(self.task)
        self.progress = None


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Yield `items`, with a bar that disappears when done (used by evaluation)."""
    bar = Bar(description, total if total is not None else len(items), transient=True)
    try:
        for item in items:
            yield item
            bar.advance()
    finally:
        bar.close()
