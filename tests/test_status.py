"""Run status: heartbeat files written by hand for each state, and real heartbeats in live and killed processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from poft_ds.status import Heartbeat, format_status, run_status

NOW = 1_700_000_000.0
REPO = Path(__file__).resolve().parent.parent


def beat(run_dir: Path, rank: int, state: str, time: float, started: float = NOW - 600, **over) -> None:
    """A heartbeat file as a rank of a 4-rank launch (ranks 0-1 trainers, 2-3 references) would write it."""
    record = {
        "global_rank": rank,
        "world_size": 4,
        "role": "trainer" if rank < 2 else "reference",
        "role_rank": rank % 2,
        "model": None if rank < 2 else "zephyr",
        "host": f"n{rank // 2}",
        "pid": 1000 + rank,
        "state": state,
        "step": None,
        "total_steps": None,
        "epoch": None,
        "time": time,
        "started": started,
        "interval_s": 10.0,
        "error": None,
    } | over
    folder = run_dir / "heartbeats"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


def write_metrics(run_dir: Path, step_times: list[float], partial_tail: str = "") -> None:
    lines = [
        json.dumps({"step": i + 1, "epoch": 0, "loss": 1.0 / (i + 1), "cross_entropy": 2.5, "step_time_s": t})
        for i, t in enumerate(step_times)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + partial_tail)


def write_checkpoint(run_dir: Path, name: str) -> None:
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text(name)


def test_running_reports_progress_eta_and_ignores_a_half_written_metrics_line(tmp_path: Path) -> None:
    # 5 slow early steps (outside the 20-step ETA window), then 20 steps alternating 1.5 s and 2.5 s.
    write_metrics(tmp_path, [100.0] * 5 + [1.5, 2.5] * 10, partial_tail='{"step": 26, "epoch": 0, "lo')
    write_checkpoint(tmp_path, "step_00000020")
    beat(tmp_path, 0, "running", NOW - 3, step=25, total_steps=100, epoch=0)
    for rank in (1, 2, 3):
        beat(tmp_path, rank, "running", NOW - 4)

    status = run_status(tmp_path, now=NOW)

    assert status["state"] == "running"
    assert (status["step"], status["total_steps"], status["epoch"]) == (25, 100, 0)
    assert status["eta_s"] == pytest.approx(2.0 * 75)  # mean of the last 20 step times x remaining steps
    assert status["last_metrics"]["step"] == 25  # the half-written step 26 is left out
    assert status["last_checkpoint"] == "step_00000020"
    assert [r["global_rank"] for r in status["ranks"]] == [0, 1, 2, 3]
    assert not any(r["stale"] for r in status["ranks"])
    assert status["ranks"][2]["age_s"] == pytest.approx(4.0)

    text = format_status(status)
    first = text.splitlines()[0]
    assert "state: running" in first and "step 25/100 (epoch 0)" in first and "ETA 0:02:30" in first
    assert "last checkpoint: step_00000020" in text
    assert "loss=0.04" in text  # step 25's loss, 1/25
    assert "ranks: 4 (2 trainer, 2 reference): 4 running" in text


def test_step_comes_from_metrics_when_rank_0_has_not_reported_one(tmp_path: Path) -> None:
    write_metrics(tmp_path, [1.0] * 7)
    for rank in range(4):
        beat(tmp_path, rank, "starting", NOW - 1)
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "running"
    assert status["step"] == 7
    assert status["eta_s"] is None  # no total_steps yet


def test_finished(tmp_path: Path) -> None:
    write_metrics(tmp_path, [1.0] * 10)
    beat(tmp_path, 0, "finished", NOW - 500, step=10, total_steps=10, epoch=1)
    for rank in (1, 2, 3):
        beat(tmp_path, rank, "finished", NOW - 500)
    status = run_status(tmp_path, now=NOW)
    # An hour-old final heartbeat is not stale: only starting/running ranks can be.
    assert status["state"] == "finished"
    assert status["step"] == 10
    assert status["eta_s"] is None
    assert not any(r["stale"] for r in status["ranks"])


def test_failed_rank_is_named_with_its_error(tmp_path: Path) -> None:
    for rank in (0, 2, 3):
        beat(tmp_path, rank, "running", NOW - 2)
    beat(tmp_path, 1, "failed", NOW - 2, error="CUDA out of memory")
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "failed"
    assert status["reason"] == "rank 1 (trainer) failed: CUDA out of memory"
    assert status["eta_s"] is None
    assert "failed: rank 1 (trainer, host n0, pid 1001): CUDA out of memory" in format_status(status)


def test_a_stale_rank_fails_the_run_while_the_others_are_fresh(tmp_path: Path) -> None:
    for rank in (0, 1, 3):
        beat(tmp_path, rank, "running", NOW - 2)
    beat(tmp_path, 2, "running", NOW - 95)
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "failed"
    assert status["reason"] == "rank 2 (reference) stopped beating 95 s ago"
    assert [r["stale"] for r in status["ranks"]] == [False, False, True, False]
    assert "stale: rank 2 (reference, host n1, pid 1002) last beat 95 s ago" in format_status(status)
    # The default window is 3 intervals, at least 30 s; a wider explicit one keeps the rank alive.
    assert run_status(tmp_path, now=NOW, stale_after_s=100)["state"] == "running"


def test_preempted(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, "step_00000040")
    (tmp_path / "PREEMPTED").write_text("40")
    beat(tmp_path, 0, "preempted", NOW - 60, step=40, total_steps=100)
    beat(tmp_path, 1, "preempted", NOW - 60)
    beat(tmp_path, 2, "finished", NOW - 58)
    beat(tmp_path, 3, "finished", NOW - 58)
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "preempted"
    assert "step 40" in status["reason"]
    assert status["step"] == 40 and status["last_checkpoint"] == "step_00000040"

    # Without the marker, a preempted rank with nothing left running is still a preemption...
    (tmp_path / "PREEMPTED").unlink()
    assert run_status(tmp_path, now=NOW)["state"] == "preempted"
    # ...but not while a rank is still running.
    beat(tmp_path, 3, "running", NOW - 1)
    assert run_status(tmp_path, now=NOW)["state"] == "running"


def test_unknown_without_heartbeats_still_reports_metrics_and_checkpoint(tmp_path: Path) -> None:
    write_metrics(tmp_path, [1.0] * 12)
    write_checkpoint(tmp_path, "step_00000012")
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "unknown"
    assert "no heartbeats" in status["reason"]
    assert status["step"] == 12 and status["last_checkpoint"] == "step_00000012"
    assert status["ranks"] == []
    assert "reason: no heartbeats" in format_status(status)


def test_heartbeats_of_an_earlier_bigger_launch_are_ignored(tmp_path: Path) -> None:
    # An earlier 4-rank launch that was killed (its files say "running" and are hours old)...
    for rank in range(4):
        beat(tmp_path, rank, "running", NOW - 4000, started=NOW - 9000)
    # ...then a 2-rank launch that overwrote ranks 0 and 1.
    for rank in (0, 1):
        beat(tmp_path, rank, "running", NOW - 1, started=NOW - 300, world_size=2, role="trainer")
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "running"
    assert [r["global_rank"] for r in status["ranks"]] == [0, 1]


def test_a_rank_not_yet_restarted_shows_missing_not_its_earlier_failure(tmp_path: Path) -> None:
    beat(tmp_path, 2, "failed", NOW - 4000, started=NOW - 9000, error="old launch")
    for rank in (0, 1, 3):
        beat(tmp_path, rank, "running", NOW - 1, started=NOW - 20)
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "running"
    assert status["ranks"][2]["state"] == "missing"
    assert "no heartbeat yet from rank 2" in status["reason"]


def test_a_rank_that_died_before_the_others_started_is_still_a_failure(tmp_path: Path) -> None:
    # Rank 0 started first and died 2 s later; the others started after it and are alive, so its
    # file cannot be from an earlier launch.
    beat(tmp_path, 0, "starting", NOW - 98, started=NOW - 100)
    for rank in (1, 2, 3):
        beat(tmp_path, rank, "running", NOW - 1, started=NOW - 99 + rank)
    status = run_status(tmp_path, now=NOW)
    assert status["state"] == "failed"
    assert status["reason"] == "rank 0 (trainer) stopped beating 98 s ago"


def test_malformed_inputs_are_named(tmp_path: Path) -> None:
    beat(tmp_path, 0, "running", NOW)
    record = json.loads((tmp_path / "heartbeats" / "rank0.json").read_text())
    del record["started"]
    (tmp_path / "heartbeats" / "rank0.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"rank0\.json: field 'started'"):
        run_status(tmp_path, now=NOW)

    beat(tmp_path, 0, "running", NOW)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: a line before the last is not JSON"):
        run_status(tmp_path, now=NOW)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_status(tmp_path / "nowhere")


def start_rank(run_dir: Path, rank: int, role: str) -> subprocess.Popen:
    """A process that keeps a real heartbeat (interval 0.2 s) running until it is killed."""
    script = (
        "import sys, time\n"
        "from poft_ds.status import Heartbeat\n"
        f"hb = Heartbeat(sys.argv[1], {rank}, 2, {role!r}, 0, None, interval_s=0.2)\n"
        "hb.start()\n"
        "hb.update(state='running', step=3, total_steps=9)\n"
        "time.sleep(120)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script, str(run_dir)], cwd=REPO)


def test_a_killed_rank_turns_the_run_failed(tmp_path: Path) -> None:
    procs = [start_rank(tmp_path, 0, "trainer"), start_rank(tmp_path, 1, "reference")]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            states = [r["state"] for r in run_status(tmp_path, stale_after_s=2.0)["ranks"]]
            if states == ["running", "running"]:
                break
            time.sleep(0.1)
        status = run_status(tmp_path, stale_after_s=2.0)
        assert status["state"] == "running", status
        assert status["step"] == 3 and status["total_steps"] == 9

        first = json.loads((tmp_path / "heartbeats" / "rank1.json").read_text())["time"]
        time.sleep(1.0)
        assert json.loads((tmp_path / "heartbeats" / "rank1.json").read_text())["time"] > first  # it beats

        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait(timeout=10)
        time.sleep(3.0)  # past the 2 s stale window
        status = run_status(tmp_path, stale_after_s=2.0)
        assert status["state"] == "failed"
        assert status["reason"].startswith("rank 1 (reference) stopped beating")
        assert [r["stale"] for r in status["ranks"]] == [False, True]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_stop_writes_the_final_state_once_and_ends_the_thread(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, 0, 1, "trainer", 0, "target", interval_s=0.1)
    path = tmp_path / "heartbeats" / "rank0.json"
    hb.start()
    assert json.loads(path.read_text())["state"] == "starting"
    hb.update(state="running")
    assert json.loads(path.read_text())["state"] == "running"  # a state change is written at once
    hb.update(step=5, total_steps=8, epoch=0)
    time.sleep(0.5)
    assert json.loads(path.read_text())["step"] == 5  # the thread wrote it

    hb.stop("finished")
    final = path.read_text()
    record = json.loads(final)
    assert record["state"] == "finished" and record["step"] == 5 and record["pid"] == os.getpid()
    mtime = path.stat().st_mtime_ns
    hb.stop("failed", error="too late")  # idempotent
    hb.update(state="running", step=6)  # ignored after stop
    time.sleep(0.5)  # five intervals
    assert path.read_text() == final
    assert path.stat().st_mtime_ns == mtime
    assert run_status(tmp_path)["state"] == "finished"


def test_an_unwritable_heartbeat_folder_warns_once_and_never_raises(tmp_path: Path) -> None:
    (tmp_path / "heartbeats").write_text("a file where the folder should be")
    hb = Heartbeat(tmp_path, 0, 1, "trainer", 0, None, interval_s=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hb.start()
        hb.update(state="running")
        time.sleep(0.4)
        hb.stop("finished")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "cannot write heartbeat" in messages[0] and "rank0.json" in messages[0]


def test_bad_updates_are_refused_by_the_caller(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, 0, 1, "trainer", 0, None)
    with pytest.raises(ValueError, match="unknown field"):
        hb.update(loss=0.5)
    with pytest.raises(ValueError, match="step must be an integer"):
        hb.update(step=1.5)
    with pytest.raises(ValueError, match="state must be one of"):
        hb.update(state="sleeping")
    with pytest.raises(ValueError, match="role"):
        Heartbeat(tmp_path, 0, 1, "critic", 0, None)
