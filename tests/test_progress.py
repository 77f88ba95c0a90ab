"""Long work reports every step: lines on stderr where there is no terminal (logs, CI), nothing when disabled."""

from __future__ import annotations

import re

from open_nemotron.progress import StageProgress


def test_progress_prints_a_line_per_step_without_a_terminal(capsys):
    with StageProgress("bench", total=4) as bar:
        bar.advance("model a")
        bar.advance("model b", steps=3)
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout carries only results
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"bench 1/4 \(25%\) \d+ s: model a", lines[0])
    assert re.fullmatch(r"bench 4/4 \(100%\) \d+ s: model b", lines[1])


def test_disabled_progress_prints_nothing_and_still_counts(capsys):
    with StageProgress("bench", total=2, enabled=False) as bar:
        bar.advance("x")
    assert bar.done == 1
    assert capsys.readouterr().err == ""


def test_many_small_steps_print_at_most_one_line_per_interval_and_the_last(capsys):
    with StageProgress("eval", total=50, min_interval_s=3600) as bar:
        for _ in range(50):
            bar.advance("reply")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[1] for line in lines] == ["1/50", "50/50"]
