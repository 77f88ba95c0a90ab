"""Progress for long work: a bar on a terminal, one line per step elsewhere (CI logs, `| tee`), always on stderr
so stdout carries only results."""

from __future__ import annotations

import sys
import time
from types import TracebackType


class StageProgress:
    """`with StageProgress("bench-speed", total=12) as p: ... p.advance("batch 16, model 2")`.

    On a terminal: a rich bar with the step count, elapsed and remaining time and the last note. Elsewhere: a line
    `bench-speed 3/12 (25%) 41 s: batch 16, model 2` per step, or at most one every `min_interval_s` seconds (and
    the last) for stages with many small steps. `enabled=False` prints nothing (tests, callers with their own
    display)."""

    def __init__(
        self, description: str, total: int, enabled: bool = True, completed: int = 0, min_interval_s: float = 0.0
    ) -> None:
        self.description = description
        self.min_interval_s = min_interval_s
        self._last_line = float("-inf")
        self.total = max(int(total), 0)
        self.enabled = enabled
        self.done = completed  # a resumed stage starts part-way
        self._bar = None
        self._task = None
        self._start = time.perf_counter()

    def __enter__(self) -> StageProgress:
        self._start = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=Console(stderr=True),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total or None, completed=self.done, note="")
        return self

    def advance(self, note: str = "", steps: int = 1) -> None:
        self.done += steps
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, note=note)
            return
        now = time.perf_counter()
        if now - self._last_line < self.min_interval_s and self.done != self.total:
            return
        self._last_line = now
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        elapsed = now - self._start
        line = f"{self.description} {self.done}/{self.total or '?'}{share} {elapsed:.0f} s"
        print(f"{line}: {note}" if note else line, file=sys.stderr, flush=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
