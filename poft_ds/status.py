"""What a run is doing: a heartbeat file per rank, read back together with the run's other files.

Every rank keeps `RUN_DIR/heartbeats/rank<global_rank>.json` fresh: a daemon thread rewrites it every
`interval_s` seconds, and every state change rewrites it at once. A rank that ends normally writes a
final state ("finished", "failed", "preempted"); a rank that dies without a word (SIGKILL, the OOM
killer, a lost node) simply stops rewriting its file, which `run_status` then calls stale. The status
combines the heartbeats with `metrics.jsonl`, `checkpoints/latest` and the `PREEMPTED` marker;
`format_status` turns it into a few lines for people.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import re
import socket
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

STATES = ("starting", "running", "finished", "failed", "preempted")
LIVE_STATES = ("starting", "running")
FINAL_STATES = ("finished", "failed", "preempted")
ROLES = ("trainer", "reference")
HEARTBEAT_DIR = "heartbeats"
ETA_WINDOW = 20  # metric lines averaged for the ETA: recent enough to follow a changed speed
MIN_STALE_AFTER_S = 30.0  # a busy shared filesystem can delay a write by seconds; never call that a death

_UPDATABLE = ("state", "step", "total_steps", "epoch", "error")
_REQUIRED = {
    "global_rank": int,
    "world_size": int,
    "role": str,
    "state": str,
    "time": (int, float),
    "started": (int, float),
    "interval_s": (int, float),
}
_RANK_FILE = re.compile(r"rank(\d+)\.json")
# Shown first, in this order, by `format_status`; the rest of a metrics line is in `--json`.
_SHOWN_METRICS = (
    "loss",
    "cross_entropy",
    "s_target",
    "s_ref",
    "poft_weight",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
)


class Heartbeat:
    """One rank's liveness file, `RUN_DIR/heartbeats/rank<global_rank>.json`.

    Writes are atomic (a temporary file in the same folder, then `os.replace`) so a reader never
    sees half a file, and small (one short JSON object, no fsync: a heartbeat needs to be fresh, not
    durable). Writing never raises into the rank: a failed write warns once and the rank carries on.

    Args:
        run_dir: The run directory.
        global_rank: This process's rank in the whole job.
        world_size: Number of processes in the whole job.
        role: "trainer" or "reference".
        role_rank: This process's rank among the ranks of its role.
        model: The model this rank runs (an aligned model's name on reference ranks), or None.
        interval_s: Seconds between two periodic writes.
    """

    def __init__(
        self,
        run_dir: str | Path,
        global_rank: int,
        world_size: int,
        role: str,
        role_rank: int,
        model: str | None,
        interval_s: float = 10.0,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"Heartbeat role must be one of {ROLES}, got {role!r}")
        if not 0 <= global_rank < world_size:
            raise ValueError(f"Heartbeat global_rank {global_rank} is outside world_size {world_size}")
        if not interval_s > 0:
            raise ValueError(f"Heartbeat interval_s must be positive, got {interval_s}")
        self.path = Path(run_dir) / HEARTBEAT_DIR / f"rank{global_rank}.json"
        self.interval_s = float(interval_s)
        self._fields: dict[str, Any] = {
            "global_rank": global_rank,
            "world_size": world_size,
            "role": role,
            "role_rank": role_rank,
            "model": model,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": "starting",
            "step": None,
            "total_steps": None,
            "epoch": None,
            "time": None,
            "started": None,
            "interval_s": self.interval_s,
            "error": None,
        }
        # Serialises writes between the thread and state changes, and keeps the thread from writing
        # after the final write.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._warned = False

    def start(self) -> None:
        """Write the first heartbeat (state "starting") and start the thread that keeps it fresh."""
        if self._thread is not None or self._stopped:
            raise RuntimeError(f"heartbeat {self.path} was already started")
        self._fields["started"] = time.time()
        self._write()
        self._thread = threading.Thread(target=self._beat, name=self.path.stem + "-heartbeat", daemon=True)
        self._thread.start()

    def update(self, **fields: Any) -> None:
        """Record progress; only a change of `state` is written at once, the rest at the next beat.

        Args:
            **fields: Any of `state`, `step` (completed steps), `total_steps`, `epoch`, `error`.
                Updates after `stop()` are ignored: the final state stands.
        """
        clean = _checked_fields(fields, self.path)
        if self._stopped:
            return
        changed = "state" in clean and clean["state"] != self._fields["state"]
        # A plain dict update: the thread copies the dict under the GIL, so no lock (and no wait on a
        # write in progress) is needed on the training loop's path.
        self._fields.update(clean)
        if changed and self._fields["started"] is not None:
            self._write()

    def stop(self, state: str, error: str | None = None) -> None:
        """Write the final heartbeat and stop the thread; later calls do nothing.

        Args:
            state: "finished", "failed" or "preempted".
            error: What went wrong, for "failed".
        """
        if state not in FINAL_STATES:
            raise ValueError(f"Heartbeat.stop state must be one of {FINAL_STATES}, got {state!r} ({self.path})")
        with self._write_lock:
            if self._stopped:
                return
            self._fields.update(state=state, error=error)
            if self._fields["started"] is None:  # stopped before start(): still leave a complete record
                self._fields["started"] = time.time()
            self._write_locked()
            self._stopped = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # The thread only waits on `_wake` between beats and cannot write any more; a short
            # join is tidiness, not correctness (it may be stuck in a write on a hung filesystem).
            self._thread.join(timeout=1.0)

    def _beat(self) -> None:
        while not self._wake.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        with self._write_lock:
            if not self._stopped:
                self._write_locked()

    def _write_locked(self) -> None:
        record = dict(self._fields)
        record["time"] = time.time()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
        except Exception as e:  # a heartbeat must never take the rank down
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"cannot write heartbeat {self.path} ({type(e).__name__}: {e}); "
                    "`poft-ds status` will see this rank as stale. Training continues.",
                    stacklevel=1,
                )
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _checked_fields(fields: dict[str, Any], where: Path) -> dict[str, Any]:
    """`fields` for `Heartbeat.update`, validated so the thread can always serialise them."""
    unknown = sorted(set(fields) - set(_UPDATABLE))
    if unknown:
        raise ValueError(f"Heartbeat.update got unknown field(s) {unknown} ({where}); allowed: {_UPDATABLE}")
    clean = dict(fields)
    if "state" in clean and clean["state"] not in STATES:
        raise ValueError(f"Heartbeat.update state must be one of {STATES}, got {clean['state']!r} ({where})")
    for key in ("step", "total_steps", "epoch"):
        if clean.get(key) is not None:
            try:  # numpy and torch integers are welcome; floats and strings are mistakes
                clean[key] = operator.index(clean[key])
            except TypeError:
                raise ValueError(f"Heartbeat.update {key} must be an integer, got {clean[key]!r} ({where})") from None
    if clean.get("error") is not None:
        clean["error"] = str(clean["error"])
    return clean


def run_status(run_dir: str | Path, now: float | None = None, stale_after_s: float | None = None) -> dict[str, Any]:
    """What a run is doing, from its heartbeats, `metrics.jsonl`, `checkpoints/latest` and `PREEMPTED`.

    Args:
        run_dir: The run directory.
        now: The current unix time (default: the clock now).
        stale_after_s: Seconds without a write after which a "starting"/"running" rank counts as
            dead (default: 3 heartbeat intervals, at least 30 s).

    Returns:
        A dict with `run_dir`, `state` ("running", "finished", "failed", "preempted" or "unknown"),
        `reason`, `step`, `total_steps`, `epoch`, `eta_s`, `last_metrics`, `last_checkpoint` and
        `ranks` (one dict per rank of the newest launch).

    Raises:
        FileNotFoundError: `run_dir` is not a directory.
        ValueError: A heartbeat file or a complete metrics line is malformed (named in the message).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    now = time.time() if now is None else now
    beats = _read_heartbeats(run_dir / HEARTBEAT_DIR)
    ranks = _newest_launch(beats, now, stale_after_s)
    preempted_at = _read_text(run_dir / "PREEMPTED")
    state, reason = _judge(ranks, preempted_at, run_dir)

    recent = _metrics_tail(run_dir / "metrics.jsonl", ETA_WINDOW)
    last_metrics = recent[-1] if recent else None
    rank0 = beats.get(0) if ranks and ranks[0]["state"] != "missing" else None
    trainer = rank0 if rank0 is not None and rank0["role"] == "trainer" else None

    def progress(key: str) -> Any:
        if trainer is not None and trainer.get(key) is not None:
            return trainer[key]
        return last_metrics.get(key) if last_metrics else None

    step, epoch = progress("step"), progress("epoch")
    total_steps = trainer.get("total_steps") if trainer else None
    eta_s = None
    if state == "running" and isinstance(step, int) and isinstance(total_steps, int):
        times = [m["step_time_s"] for m in recent if _is_number(m.get("step_time_s"))]
        if times:
            eta_s = sum(times) / len(times) * max(total_steps - step, 0)
    return {
        "run_dir": str(run_dir),
        "state": state,
        "reason": reason,
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "eta_s": eta_s,
        "last_metrics": last_metrics,
        "last_checkpoint": _read_text(run_dir / "checkpoints" / "latest"),
        "ranks": ranks,
    }


def _read_heartbeats(folder: Path) -> dict[int, dict[str, Any]]:
    """Every `rank<N>.json` in `folder`, by global rank (temporary files and others are not heartbeats)."""
    if not folder.is_dir():
        return {}
    beats = {}
    for path in folder.iterdir():
        match = _RANK_FILE.fullmatch(path.name)
        if not match:
            continue
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:  # replaced or removed between listing and reading
            continue
        except (OSError, ValueError) as e:
            raise ValueError(f"heartbeat {path} is unreadable: {e}") from e
        if not isinstance(record, dict):
            raise ValueError(f"heartbeat {path} is not a JSON object")
        for field, kind in _REQUIRED.items():
            if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
                raise ValueError(f"heartbeat {path}: field '{field}' is missing or not {kind}: {record.get(field)!r}")
        if record["state"] not in STATES:
            raise ValueError(f"heartbeat {path}: field 'state' must be one of {STATES}, got {record['state']!r}")
        if not 0 <= record["global_rank"] < record["world_size"]:
            raise ValueError(f"heartbeat {path}: field 'global_rank' is outside world_size {record['world_size']}")
        if record["global_rank"] != int(match.group(1)):
            raise ValueError(f"heartbeat {path}: field 'global_rank' is {record['global_rank']}, not the file's rank")
        beats[record["global_rank"]] = record
    return beats


def _newest_launch(beats: dict[int, dict[str, Any]], now: float, stale_after_s: float | None) -> list[dict[str, Any]]:
    """One entry per rank of the newest launch, in rank order; ranks without a heartbeat of it are "missing".

    A launch's size is the `world_size` of the most recently started heartbeat, so the files of a
    larger earlier launch are ignored. A relaunch overwrites its ranks' files one by one, so a rank
    that has not started yet still shows the earlier launch's file: the earlier files are the
    ones written for the last time (plus one interval of slack) before every newer rank started.
    The latest such split is the newest launch's start. A rank that died early in the current
    launch is not mistaken for an earlier one as long as some rank that started before it is alive.
    """
    if not beats:
        return []
    world_size = max(beats.values(), key=lambda b: b["started"])["world_size"]
    ordered = sorted((b for r, b in beats.items() if r < world_size), key=lambda b: b["started"])
    first_current, last_seen = 0, -math.inf
    for i, b in enumerate(ordered):
        if i > 0 and last_seen < b["started"]:
            first_current = i
        last_seen = max(last_seen, b["time"] + b["interval_s"])
    current = {b["global_rank"]: b for b in ordered[first_current:]}

    ranks = []
    for r in range(world_size):
        b = current.get(r)
        if b is None:
            ranks.append(_missing_rank(r))
            continue
        age = now - b["time"]
        limit = stale_after_s if stale_after_s is not None else max(3 * b["interval_s"], MIN_STALE_AFTER_S)
        ranks.append(
            {
                "global_rank": r,
                "role": b["role"],
                "role_rank": b.get("role_rank"),
                "model": b.get("model"),
                "host": b.get("host"),
                "pid": b.get("pid"),
                "state": b["state"],
                "step": b.get("step"),
                "age_s": age,
                "stale": b["state"] in LIVE_STATES and age > limit,
                "error": b.get("error"),
            }
        )
    return ranks


def _missing_rank(r: int) -> dict[str, Any]:
    keys = ("role", "role_rank", "model", "host", "pid", "step", "age_s", "error")
    return {"global_rank": r, **dict.fromkeys(keys), "state": "missing", "stale": False}


def _judge(ranks: list[dict[str, Any]], preempted_at: str | None, run_dir: Path) -> tuple[str, str]:
    """The run's state and why, from its ranks (see `run_status`)."""
    if not ranks:
        marker = f"; PREEMPTED says step {preempted_at}" if preempted_at is not None else ""
        return (
            "unknown",
            f"no heartbeats in {run_dir / HEARTBEAT_DIR} (a run from before heartbeats, or not started yet){marker}",
        )
    problems = []
    for r in ranks:
        if r["state"] == "failed":
            problems.append(f"rank {r['global_rank']} ({r['role']}) failed: {r['error'] or 'no error recorded'}")
        elif r["stale"]:
            problems.append(f"rank {r['global_rank']} ({r['role']}) stopped beating {r['age_s']:.0f} s ago")
    if problems:
        return "failed", "; ".join(problems)

    states = {r["state"] for r in ranks}
    live = [r for r in ranks if r["state"] in LIVE_STATES]
    missing = _rank_list([r for r in ranks if r["state"] == "missing"])
    if states <= {"preempted", "finished"} and preempted_at is not None:
        return "preempted", f"stopped after the checkpoint at step {preempted_at} (PREEMPTED); launch again to resume"
    if "preempted" in states and not live:
        preempted = _rank_list([r for r in ranks if r["state"] == "preempted"])
        return "preempted", f"{preempted} preempted and no rank is running"
    if states == {"finished"}:
        return "finished", f"all {len(ranks)} ranks finished"
    if live:
        waiting = f"; no heartbeat yet from {missing}" if missing else ""
        return "running", f"{len(live)} of {len(ranks)} ranks beating{waiting}"
    return "unknown", f"no rank is running, not all finished, and {missing} wrote no heartbeat in this launch"


def _rank_list(ranks: list[dict[str, Any]]) -> str:
    ids = [str(r["global_rank"]) for r in ranks]
    return ("rank " if len(ids) == 1 else "ranks ") + ", ".join(ids) if ids else ""


def _metrics_tail(path: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` complete lines of `metrics.jsonl`, read from the end of the file (it can be large).

    A live run may be writing the last line: an unparsable last line is left out. Any other bad line
    is an error.
    """
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        window = 1 << 20
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read().split(b"\n")
            if start > 0:
                lines = lines[1:]  # begins mid-line
            lines = [line for line in lines if line.strip()]
            if start == 0 or len(lines) > n:
                break
            window *= 4
    records = []
    tail = lines[-(n + 1) :]
    for i, line in enumerate(tail):
        try:
            record = json.loads(line)
        except ValueError as e:
            if i == len(tail) - 1:
                continue
            raise ValueError(f"{path}: a line before the last is not JSON ({e}): {line[:80]!r}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}: a line is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records[-n:]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_status(status: dict[str, Any]) -> str:
    """A short report of `run_status(...)` for people: the state line first, problems by rank.

    Args:
        status: What `run_status` returned.

    Returns:
        A few lines of text, without a trailing newline.
    """
    head = f"run: {status['run_dir']}   state: {status['state']}"
    if status["step"] is not None:
        head += f"   step {status['step']}"
        if status["total_steps"] is not None:
            head += f"/{status['total_steps']}"
        if status["epoch"] is not None:
            head += f" (epoch {status['epoch']})"
    if status["eta_s"] is not None:
        head += f"   ETA {timedelta(seconds=round(status['eta_s']))}"
    lines = [head]
    # A failed run's reason is the problem ranks, listed with host and pid on the ranks line.
    if status["state"] in ("preempted", "unknown"):
        lines.append(f"reason: {status['reason']}")
    lines.append(f"last checkpoint: {status['last_checkpoint'] or 'none'}")
    metrics = status["last_metrics"]
    if metrics:
        shown = [f"{k}={_short(metrics[k])}" for k in _SHOWN_METRICS if k in metrics]
        lines.append(f"last metrics (step {metrics.get('step')}): " + " ".join(shown))
    else:
        lines.append("last metrics: none")
    lines.append(_ranks_line(status["ranks"]))
    return "\n".join(lines)


def _ranks_line(ranks: list[dict[str, Any]]) -> str:
    if not ranks:
        return "ranks: no heartbeats"
    roles = [r["role"] for r in ranks if r["role"] is not None]
    counts = ", ".join(f"{roles.count(role)} {role}" for role in ROLES if role in roles)
    line = f"ranks: {len(ranks)} ({counts})"
    problems = []
    for r in ranks:
        where = f"rank {r['global_rank']} ({r['role']}, host {r['host']}, pid {r['pid']})"
        if r["state"] == "failed":
            problems.append(f"failed: {where}: {r['error'] or 'no error recorded'}")
        elif r["stale"]:
            problems.append(f"stale: {where} last beat {r['age_s']:.0f} s ago")
        elif r["state"] == "missing":
            problems.append(f"no heartbeat: rank {r['global_rank']}")
    if problems:
        return line + "; " + "; ".join(problems)
    by_state = {s: sum(r["state"] == s for r in ranks) for s in STATES}
    return line + ": " + ", ".join(f"{n} {s}" for s, n in by_state.items() if n)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
