"""Where a rank's output goes: log file and console, progress bars only on an interactive console."""

from __future__ import annotations

import io
import re
import sys

import pytest

from poft_ds.rank_logs import Progress, _Tee


class Terminal(io.StringIO):
    """A console that says it is interactive, as a terminal does."""

    def isatty(self) -> bool:
        return True


def test_redraws_reach_an_interactive_console_and_elsewhere_a_plain_line_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("poft_ds.rank_logs.time.monotonic", lambda: clock[0])
    log, tty, captured = io.StringIO(), Terminal(), io.StringIO()
    for console in (tty, captured):
        tee = _Tee(log, console)
        tee.write("\rtokenizing  40%|####      | 4/10")
        clock[0] += 59.0
        tee.write("\rtokenizing  50%|#####     | 5/10")  # within the minute: redrawn on a terminal only
        tee.write("[poft-ds] step=4 loss=0.5\n")
        clock[0] += 1.0
        tee.write("\rtokenizing  60%|######    | 6/10")
    assert tty.getvalue() == (
        "\rtokenizing  40%|####      | 4/10\rtokenizing  50%|#####     | 5/10[poft-ds] step=4 loss=0.5\n"
        "\rtokenizing  60%|######    | 6/10"
    )
    plain = "tokenizing  40%|####      | 4/10\n[poft-ds] step=4 loss=0.5\ntokenizing  60%|######    | 6/10\n"
    assert captured.getvalue() == plain
    assert log.getvalue() == plain * 2


def test_a_rank_without_console_writes_its_log_only() -> None:
    log = io.StringIO()
    tee = _Tee(log, None)
    tee.write("hello\n")
    assert log.getvalue() == "hello\n" and not tee.isatty()


def test_plain_progress_lines_every_tenth_with_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", _Tee(log, None))
    progress = Progress("training", 20, "step", done=4, every=0.25, min_gap_s=0.0)
    for step in range(5, 21):
        progress.update(step)
    lines = log.getvalue().splitlines()
    # From step 4 (resumed), a line each 5 steps (a quarter of 20) and one at the end.
    assert [int(re.search(r"training: (\d+)/20 steps", line).group(1)) for line in lines] == [9, 14, 19, 20]
    assert lines[-1].startswith("[poft-ds] training: 20/20 steps (100%)") and lines[-1].endswith("ETA 0:00:00")
    assert "\r" not in log.getvalue()


def test_progress_lines_wait_for_the_minimum_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", _Tee(log, None))
    progress = Progress("training", 100, "step", min_gap_s=3600.0)
    for step in range(1, 101):
        progress.update(step)
    assert log.getvalue().count("\n") == 1  # a fast run: only the final line


def test_interactive_console_gets_a_bar_and_the_log_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    log, tty = io.StringIO(), Terminal()
    monkeypatch.setattr(sys, "stdout", _Tee(log, tty))
    progress = Progress("training", 4, "step", min_gap_s=0.0, every=0.5)
    for step in range(1, 5):
        progress.update(step)
        progress.write(f"[poft-ds] step={step}")
    progress.close()
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue()  # tqdm's bar, redrawn in place
    assert "\r" not in log.getvalue()
    assert [line for line in log.getvalue().splitlines() if "training:" in line] == [
        line for line in log.getvalue().splitlines() if line.startswith("[poft-ds] training: ")
    ]
    assert "[poft-ds] training: 4/4 steps (100%)" in log.getvalue()
    assert all(f"[poft-ds] step={s}" in log.getvalue() for s in range(1, 5))
