"""Where each rank's output goes: its own log file, and the console for one rank and for errors.

Every rank writes everything it prints, and every warning, to `<run_dir>/logs/rank<N>.log`. The
console (the launcher's terminal or the Slurm output file) gets global rank 0's output, which is
trainer rank 0's, plus what any rank writes to stderr (errors and tracebacks), so a failing
reference rank is still seen. Progress bars (`Progress`, and other libraries' bars) draw only on
an interactive console; log files and captured consoles get a plain line now and then instead of
a stream of carriage returns.

Only Python-level output is routed: text that native code (NCCL, gloo) writes straight to the
file descriptors still goes where the launcher sends it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from tqdm import tqdm


class _Tee(io.TextIOBase):
    """A text stream that writes to a log file and, optionally, to the console.

    Writes holding a carriage return are progress-bar redraws (another library's: tokenizing a
    large data set draws `datasets`' bar): they reach an interactive console as they are; the log
    file and a captured console (a Slurm output file) get the bar's state as a plain line at most
    every `REDRAW_LINE_EVERY_S`, so a long tokenization still shows its progress there.
    """

    REDRAW_LINE_EVERY_S = 60.0

    def __init__(self, log: TextIO, console: TextIO | None) -> None:
        self.log, self.console = log, console
        self.console_is_tty = bool(console is not None and console.isatty())
        self.last_redraw_line = -math.inf

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
            if self.console is not None:
                self.console.write(text)
            return len(text)
        if self.console is not None and self.console_is_tty:
            self.console.write(text)
        line = text.replace("\r", "").strip()
        now = time.monotonic()
        if line and now - self.last_redraw_line >= self.REDRAW_LINE_EVERY_S:
            self.last_redraw_line = now
            self.log.write(line + "\n")
            if self.console is not None and not self.console_is_tty:
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.console is not None:
            self.console.flush()

    def isatty(self) -> bool:
        return self.console_is_tty

    @property
    def encoding(self) -> str:
        return "utf-8"


def route_rank_output(run_dir: str | os.PathLike[str], global_rank: int) -> Path:
    """Send this rank's stdout and stderr to its log file; keep global rank 0's stdout and every
    rank's stderr on the console. Each warning is logged, and shown on the console once per run.

    Args:
        run_dir: The job's run directory.
        global_rank: This process's rank in the whole job.

    Returns:
        The log file.
    """
    path = Path(run_dir) / "logs" / f"rank{global_rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Open for the life of the process (never closed: it is the process's stdout and stderr).
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 -- line-buffered: a crash loses no line
    log.write(f"==== rank {global_rank}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
    console_out, console_err = sys.stdout, sys.stderr
    sys.stdout = _Tee(log, console_out if global_rank == 0 else None)
    sys.stderr = _Tee(log, console_err)
    # Loggers set up at import time (DeepSpeed's writes to stdout) hold the old streams.
    swap = {id(console_out): sys.stdout, id(console_err): sys.stderr}
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in swap:
                handler.setStream(swap[id(handler.stream)])
    if global_rank != 0:
        # Progress bars of `datasets` (tokenizing large data) draw on the console from one rank only;
        # the variable covers a later import (ranks that only read the cache never import it).
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    _show_each_warning_once(global_rank, log)
    return path


def _show_each_warning_once(global_rank: int, log: TextIO) -> None:
    """Log every warning; let each distinct one reach the console once per run, from global rank 0.

    Python shows a warning once per code location, but any library that enters
    `warnings.catch_warnings()` wipes that memory, so torch's deprecation warnings came back at
    every step from every rank. Each warning (category and text) is now shown on the console at
    most once per process, by global rank 0 only, except poft-ds's own, which every rank shows.
    All of them, repeats included, are in the rank's log file.
    """
    seen: set[tuple[type[Warning], str]] = set()
    show = warnings.showwarning

    def once(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        key = (category, str(message))
        first = key not in seen
        seen.add(key)
        if first and (global_rank == 0 or f"{os.sep}poft_ds{os.sep}" in filename):
            show(message, category, filename, lineno, file, line)  # stderr: the log and the console
        else:
            log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = once


class Progress:
    """Progress of a long loop with an ETA: a bar on an interactive console, else plain lines.

    Args:
        what: What progresses, e.g. "training".
        total: Units of work in all.
        unit: The unit's name, e.g. "step".
        done: Units already done (a resumed run).
        every: A plain line each time this fraction of the work more is done, or `max_gap_s`
            passed, but not within `min_gap_s` of the last line; and one at the end.
        min_gap_s: The least time between two plain lines.
        max_gap_s: The most time between two plain lines while work gets done.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        done: int = 0,
        every: float = 0.1,
        min_gap_s: float = 10.0,
        max_gap_s: float = 300.0,
    ) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.min_gap_s, self.max_gap_s = min_gap_s, max_gap_s
        self.start_done, self.done = done, done
        self.t0 = self.last_line = time.perf_counter()
        self.next_line = done + max(1, int(total * every))
        stdout = sys.stdout
        self.bar = None
        if stdout.isatty():
            # The bar draws on the console itself, never in the log file (see _Tee).
            console = stdout.console if isinstance(stdout, _Tee) else stdout
            self.bar = tqdm(total=total, initial=done, desc=what, unit=unit, file=console, dynamic_ncols=True)

    def eta_s(self) -> float | None:
        """Seconds left at the rate since this progress began, or None before any unit is done."""
        n = self.done - self.start_done
        return (self.total - self.done) * (time.perf_counter() - self.t0) / n if n > 0 else None

    def update(self, done: int) -> None:
        """Record that `done` units of `total` are finished."""
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        due = done >= self.next_line and now - self.last_line >= self.min_gap_s
        if due or now - self.last_line >= self.max_gap_s or done == self.total:
            self.next_line = done + max(1, int(self.total * self.every))
            self.last_line = now
            eta = self.eta_s()
            rate = (done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
            line = (
                f"[poft-ds] {self.what}: {done}/{self.total} {self.unit}s ({100 * done / max(self.total, 1):.0f}%), "
                f"{rate:.3g} {self.unit}s/s, ETA {_hms(eta)}"
            )
            if self.bar is not None:  # the bar is on the console; the log file still gets the line
                stdout = sys.stdout
                (stdout.log if isinstance(stdout, _Tee) else stdout).write(line + "\n")
            else:
                print(line, flush=True)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            with tqdm.external_write_mode(file=self.bar.fp):
                print(line, flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
