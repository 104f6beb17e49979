"""Progress of long jobs: one live line on a terminal, nothing extra anywhere else.

The plain `log(...)` lines of a job are its output in CI and log files. On a terminal one line is
drawn below them (rich redirects `print` above a live display): the job, a bar, step/total, the
latest stats and the ETA, fitted to the terminal's width by dropping the least useful fields
first (fit_line). A job started while another is on screen (validation during training) shows
as a field of that line, not as a second bar: rich shows one live display at a time.
"""

import atexit
import sys
from collections.abc import Iterable, Iterator
from datetime import timedelta

from rich.console import Console, ConsoleOptions, RenderResult
from rich.progress import Progress, Task
from rich.text import Text

_shown: list[Progress] = []  # the live display on screen, if any
MIN_BAR, MAX_BAR = 10, 40  # columns; a narrower bar says nothing, so fields go first
# The stats in the order shown; the later ones are dropped first when the line is too narrow.
STATS = (
    ("loss", "loss {:.3f}"),
    ("val_loss", "val {:.3f}"),
    ("tokens_per_second", "{:.0f} tok/s"),
    ("peak_memory_gb", "peak {:.2f} GB"),
)


def eprint(*values, **kwargs) -> None:
    """`print` to stderr: the log of a command whose stdout is its result (eval)."""
    print(*values, file=sys.stderr, **kwargs)


def _console(log, console: Console | None) -> Console | None:
    """Where the bar of a job logging through `log` is drawn: the stream its lines go to."""
    if console is not None or log not in (print, eprint):
        return console
    return Console(stderr=log is eprint)


def on_terminal(log=print, console: Console | None = None) -> bool:
    """Draw bars only when output goes to a terminal through print or eprint (tests and callers
    pass their own log)."""
    shown = _console(log, console)
    return shown is not None and shown.is_terminal


def format_stats(stats: dict[str, float | None]) -> dict[str, str]:
    """{'loss': 1.2345, 'tokens_per_second': 812.3} -> {'loss': 'loss 1.235', 'tokens_per_second': '812 tok/s'}."""
    return {k: f.format(stats[k]) for k, f in STATS if stats.get(k) is not None}


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))


def fit_line(head: str, fields: list[tuple[int, str]], width: int) -> tuple[str, int, str]:
    """(head, bar width, tail) that fit in `width` columns as 'head ━━━ tail'. Each field has a
    rank (0: always kept); the highest ranks go first, then the bar, then the line is cut."""
    keep = list(fields)
    while True:
        first, *rest = [text for _, text in keep]
        tail = " ".join([first, " · ".join(rest)]) if rest else first
        room = width - len(head) - len(tail) - 2  # a space either side of the bar
        if room >= MIN_BAR or not any(rank for rank, _ in keep):
            break
        keep.remove(max(keep, key=lambda field: field[0]))
    if room < MIN_BAR:  # too narrow even for a short bar: text only
        return f"{head} {tail}"[:width], 0, ""
    return head, min(room, MAX_BAR), tail


class _Line:
    """The live line of a Progress: its first task, with any later ones (validation) as fields."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.progress.tasks:
            return
        main, *subs = self.progress.tasks
        stats = main.fields.get("stats", {})
        fields = [(0, _count(main))]
        fields += [(1 if key == "loss" else 3 + i, text) for i, (key, text) in enumerate(stats.items())]
        fields += [(2, f"{task.description} {_count(task)}") for task in subs]
        fields.append((1, _time(main)))
        head, bar, tail = fit_line(main.description, fields, options.max_width)
        text = Text(head, style="bold")
        if bar:
            done = round(bar * main.percentage / 100) if main.total else 0
            text.append(" " + "━" * done, style="magenta")
            text.append("━" * (bar - done), style="grey37")
            text.append(" " + tail)
        yield text


def _count(task: Task) -> str:
    return f"{int(task.completed)}/{int(task.total)}" if task.total is not None else str(int(task.completed))


def _time(task: Task) -> str:
    if task.finished:
        return f"took {_clock(task.finished_time)}"
    return f"ETA {_clock(task.time_remaining)}"


class _OneLine(Progress):
    def get_renderables(self):
        yield _Line(self)


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
            self.progress = _OneLine(console=_console(log, console), transient=transient)
            self.progress.start()
            _shown.append(self.progress)
            self.owner = True
            atexit.register(self.close)  # restores the cursor if the job dies with an exception
        self.task = self.progress.add_task(description, total=total, stats={})

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


def track(items: Iterable, description: str, total: int | None = None, log=print) -> Iterator:
    """Yield `items`, with a bar that disappears when done (used by evaluation)."""
    bar = Bar(description, total if total is not None else len(items), log=log, transient=True)
    try:
        for item in items:
            yield item
            bar.advance()
    finally:
        bar.close()
