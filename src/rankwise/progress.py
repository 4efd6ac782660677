"""Progress of long jobs (``bench``, ``bench --suite multitask``, ``plan --compare``, ``analyze``, ``compress``):
work done / total, elapsed time and ETA.

On a terminal a rich bar shows it live; otherwise (a log file, a pipe, a test) a plain line goes to the stream
(stderr by default) when asked for (``say``), every ``PLAIN_EVERY`` seconds in between, and on ``close`` if the
last line is older than the last unit, so a redirected log stays short. The ETA is the mean time of the units done here (resumed units are not timed)
times the units left, over the units that run at a time.

    with Progress("compress", total=len(stages), unit="stages") as progress:
        for name in stages:
            with progress.stage(name):
                ...
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Any, Iterator

PLAIN_EVERY = 30.0


def duration(seconds: float) -> str:
    """``45s``, ``12m``, ``1h05m``: a wall time as a progress line shows it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m = round(s / 60)
    return f"{m}m" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Progress:
    """``total`` units of work, ``done`` of them finished before (a resumed job); ``parallel`` run at a time.

    ``bar``: show a rich bar (default: when ``stream`` is a terminal); ``plain``: write plain lines when there is
    no bar (default True; a caller that logs each unit itself passes False)."""

    def __init__(self, label: str, total: int, done: int = 0, parallel: int = 1, unit: str = "",
                 bar: bool | None = None, plain: bool = True, stream: IO[str] | None = None) -> None:
        self.label, self.total, self.done, self.parallel, self.unit = label, total, done, max(1, parallel), unit
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.mark = self.said = time.perf_counter()
        self.spent, self.timed, self.info, self.said_at = 0.0, 0, "", done
        show = self.stream.isatty() if bar is None else bar
        self.bar = self.task = None
        self.plain = plain and not show
        if show and done < total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self.bar = Bar(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                           TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                           TextColumn("{task.fields[info]}"), console=Console(file=self.stream))
            self.task = self.bar.add_task(label, total=total, completed=done, eta="?", info="")
            self.bar.start()

    def eta(self) -> str:
        left = self.total - self.done
        if left <= 0:
            return "0s"
        if not self.timed:
            return "?"
        return duration(self.spent / self.timed * left / min(self.parallel, left))

    def text(self) -> str:
        """``elapsed 3m, ETA 12m``."""
        return f"elapsed {duration(time.perf_counter() - self.start)}, ETA {self.eta()}"

    def finish(self, wall: float | None = None, n: int = 1, info: str | None = None, say: bool = False) -> str:
        """Count ``n`` units done; ``wall``: the seconds they took (default: since the previous call). Returns
        :meth:`text`."""
        now = time.perf_counter()
        self.spent += now - self.mark if wall is None else wall
        self.mark = now
        self.done += n
        self.timed += n
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, eta=self.eta(), info=self.info)
        if self.plain and (say or now - self.said >= PLAIN_EVERY):
            self.say()
        return self.text()

    def describe(self, info: str) -> None:
        """Show what runs now (e.g. the method being trained)."""
        self.info = info
        if self.bar is not None:
            self.bar.update(self.task, info=info)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """One unit of work named ``name``: shown while it runs, counted when it ends."""
        self.describe(name)
        yield
        self.finish(info=name)

    def say(self, note: str = "") -> None:
        """One plain line: ``label: 3/10 layers (info), elapsed 5s, ETA 12s`` (plus ``note``)."""
        self.said, self.said_at = time.perf_counter(), self.done
        if self.plain:
            info = f" ({self.info})" if self.info else ""
            unit = f" {self.unit}" if self.unit else ""
            print(f"{self.label}: {self.done}/{self.total}{unit}{info}, {self.text()}{note}", file=self.stream,
                  flush=True)

    def close(self, final_line: bool = True) -> None:
        if self.plain and final_line and self.said_at != self.done:
            self.say()
        self.plain = False
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.close(final_line=kind is None)  # a failed job says so itself
