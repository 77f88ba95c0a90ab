"""Step lines for Puzzle's long stages (phases and notes, beside their `StageProgress` bars); silent with ``progress=False``."""

from __future__ import annotations

import time
from collections.abc import Callable


def step_printer(progress: bool) -> Callable[[str], None]:
    """``say("BLD: ...")`` prints a timestamped line on stderr when `progress` is on, nothing otherwise."""
    if not progress:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    return lambda message: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", markup=True)
