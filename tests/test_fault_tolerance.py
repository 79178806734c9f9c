"""Fault tolerance: exact resume after a crash, damaged checkpoints, dead ranks, bad numbers, full disks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import base_spec, launch, read_metrics, run_job, start_cli, status_of, write_spec

pytestmark = pytest.mark.distributed

KEYS = ("loss", "cross_entropy", "s_target", "s_ref", "poft_weight", "lr", "grad_norm")


def job(assets: Path, run_dir: Path, **over) -> dict:
    """2 trainers + 1 reference rank, 8 steps, a checkpoint every 3 steps."""
    spec = base_spec(
        assets,
        run_dir,
        aligned_models=[{"name": "zephyr", "path": str(assets / "aligned_zephyr"), "max_length": 96}],
        training={
            "learning_rate": 1e-3,
            "warmup_ratio": 0.2,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "max_steps": 8,
        },
        topology={"procs_per_node": 3},
        checkpoint={"every_steps": 3, "keep_last": 2, "save_final_model": False},
    )
    spec.update(over)
    return spec


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k in KEYS:
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-9), (k, x["step"])


def _workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's worker processes by their launch-time global RANK."""
    out = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "poft_ds.cli" in " ".join(p.cmdline()):
            out[int(env["RANK"])] = p
    return out


def _start(spec_path: Path) -> subprocess.Popen[str]:
    return start_cli("launch", str(spec_path))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended early:\n" + proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `job` run uninterrupted, once for the tests that compare a disturbed run with it."""
    folder = tmp_path_factory.mktemp("straight")
    return run_job(job(assets, folder / "run"), folder)


def test_trainer_killed_mid_run_resumes_to_the_same_metrics(assets: Path, tmp_path: Path, straight: Path) -> None:
    reference = read_metrics(straight)

    spec = job(assets, tmp_path / "crash")
    path = write_spec(spec, tmp_path / "crash.yaml")
    proc = _start(path)
    latest = tmp_path / "crash" / "checkpoints" / "latest"
    metrics = tmp_path / "crash" / "metrics.jsonl"
    _wait_for(lambda: latest.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 4, proc)
    _workers(proc)[1].send_signal(signal.SIGKILL)  # trainer rank 1, mid-run, after the step-3 checkpoint
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert latest.read_text().strip() == "step_00000003"

    again = launch(path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resumed from" in again.stdout and "at step 3" in again.stdout
    assert_same_metrics(read_metrics(tmp_path / "crash"), reference)
    assert sorted(p.name for p in (tmp_path / "crash" / "checkpoints").glob("step_*")) == [
        "step_00000006",
        "step_00000008",
    ]
    del out


def test_truncated_newest_checkpoint_falls_back_and_a_changed_schedule_is_refused(
    assets: Path, tmp_path: Path, straight: Path
) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(assets / "data" / "train.jsonl", data)
    spec = job(assets, tmp_path / "run", data={"train_files": [str(data)]})
    # The uninterrupted run, moved here: its data is this copy's content, which is all a resume checks.
    run_dir = Path(shutil.copytree(straight, tmp_path / "run", symlinks=True))
    reference = read_metrics(run_dir)
    newest = run_dir / "checkpoints" / "step_00000008"
    shard = max(newest.glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    spec["training"]["max_steps"] = 8
    again = launch(write_spec(spec, tmp_path / "again.yaml"))
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "step_00000008 is damaged" in again.stdout + again.stderr
    assert "at step 6" in again.stdout
    assert_same_metrics(read_metrics(run_dir), reference)

    # One answer edited in the data file: resuming would silently follow another sample order.
    lines = data.read_text().splitlines()
    row = json.loads(lines[5])
    row["messages"][-1]["content"] += " Indeed."
    lines[5] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    refused = launch(write_spec(spec, tmp_path / "changed.yaml"))
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "refusing to resume from" in out and "step_00000008" in out
    assert re.search(r"data: '[0-9a-f]+' in the checkpoint, '[0-9a-f]+' now", out), out[-3000:]
    assert "seed" not in out.split("refusing to resume")[1].split("Restore")[0]  # only what changed is named
    assert_same_metrics(read_metrics(run_dir), reference)  # nothing was trained or logged


def test_killed_reference_rank_stops_every_process_with_a_message(assets: Path, tmp_path: Path) -> None:
    spec = job(assets, tmp_path / "run", reference={"prefetch_steps": 1}, timeouts={"step_s": 30})
    spec["training"]["max_steps"] = 40
    spec["logging"] = {"heartbeat_s": 0.5}
    proc = _start(write_spec(spec, tmp_path / "job.yaml"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    live = status_of(tmp_path / "run", expect_exit=0)  # `poft-ds status` on the live run
    assert live["state"] == "running" and live["total_steps"] == 40 and 2 <= live["step"] < 40
    assert live["eta_s"] > 0 and not any(r["stale"] for r in live["ranks"])
    workers = _workers(proc)
    killed = time.time()
    workers[2].send_signal(signal.SIGKILL)  # the reference rank
    time.sleep(2.5)  # five missed beats; the trainers still wait for its scores (timeouts.step_s)
    if proc.poll() is None:
        dead = status_of(tmp_path / "run", "--stale-after", "2", expect_exit=1)
        assert dead["state"] == "failed" and "rank 2" in dead["reason"], dead
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    after = status_of(tmp_path / "run", "--stale-after", "2", expect_exit=1)
    assert after["state"] == "failed" and "rank 2" in after["reason"], after
    assert time.time() - killed < 2 * 30
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers.values())
    # The dead rank and its role are named: by the trainers, with what they were waiting for, when
    # they were receiving its scores; else by the launcher's report and poft-ds's role map.
    named_by_trainers = "scores of aligned model 'zephyr' (reference rank 0) from global rank 2" in out
    named_by_launcher = re.search(r"rank\s*:\s*2 ", out) and "2: ref/zephyr" in out
    assert named_by_trainers or named_by_launcher, out[-3000:]
    # torchrun SIGTERMs the surviving ranks, which checkpoint as if preempted: still a failure.
    assert "[poft-ds] the job failed" in out and "rank 2 (reference) stopped beating" in out, out[-3000:]
    assert "preempted after a checkpoint" not in out, out[-3000:]


def test_sigterm_preempts_after_a_checkpoint_and_status_says_so(assets: Path, tmp_path: Path) -> None:
    spec = job(assets, tmp_path / "run", checkpoint={"every_steps": 100, "save_final_model": False})
    spec["training"]["max_steps"] = 40
    spec["logging"] = {"heartbeat_s": 0.5}
    proc = _start(write_spec(spec, tmp_path / "job.yaml"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)  # what Slurm or a cluster scheduler sends before it preempts
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]  # EX_TEMPFAIL: run again to resume
    step = int((tmp_path / "run" / "PREEMPTED").read_text())
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    status = status_of(tmp_path / "run", "--stale-after", "2", expect_exit=75)
    assert status["state"] == "preempted" and status["step"] == step, status
    assert status["last_checkpoint"] == f"step_{step:08d}"


def nonfinite_job(assets: Path, tmp_path: Path, **training) -> dict:
    """A 2-trainer job on precomputed scores whose loss is always infinite: with beta = 1e300 the
    float32 margin beta * (s_target - s_ref) overflows to -inf, and -log sigmoid(-inf) = inf."""
    rows = [json.loads(x) for x in (assets / "data" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r | {"s": -1.0}) for r in rows))
    spec = base_spec(
        assets,
        tmp_path / "run",
        aligned_models=[],
        data={"train_files": [str(tmp_path / "d.jsonl")], "reference_score_column": "s"},
        objective={"kind": "poft", "beta": 1e300},
        topology={"procs_per_node": 2},
    )
    spec["training"].update(training)
    return spec


def test_nonfinite_loss_stops_before_the_update(assets: Path, tmp_path: Path) -> None:
    spec = nonfinite_job(assets, tmp_path)
    proc = launch(write_spec(spec, tmp_path / "job.yaml"))
    assert proc.returncode != 0
    assert "step 1: non-finite loss in 4 micro-batch(es)" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(assets: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(run_dir)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        spec = job(
            assets,
            run_dir,
            checkpoint={"every_steps": 2, "keep_last": 2, "save_final_model": False},
            score_store={"dir": str(tmp_path / "store")},
        )
        proc = launch(write_spec(spec, tmp_path / "job.yaml"))
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "could not write checkpoint step_00000004" in out and "bytes free" in out
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        from poft_ds.checkpoint import verify

        assert verify(run_dir / "checkpoints" / "step_00000002") is None
    finally:
        subprocess.run(["umount", "-l", str(run_dir)])


def test_nonfinite_losses_can_be_skipped_and_counted(assets: Path, tmp_path: Path) -> None:
    spec = nonfinite_job(assets, tmp_path, max_steps=2, on_nonfinite="skip")
    run_dir = run_job(spec, tmp_path)
    metrics = read_metrics(run_dir)
    assert [m["skipped_micro_batches"] for m in metrics] == [4, 4]  # 2 trainers x 2 micro-batches per step
    from safetensors.torch import load_file

    start, end = (
        load_file(assets / "target" / "model.safetensors"),
        load_file(run_dir / "final_model" / "model.safetensors"),
    )
    assert all((start[k] == end[k]).all() for k in start)  # nothing reached the weights


def test_resume_flag_refuses_to_start_without_a_checkpoint(assets: Path, tmp_path: Path) -> None:
    spec = job(assets, tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "launch", str(write_spec(spec, tmp_path / "job.yaml")), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert "train" in proc.stdout and "--resume" in proc.stdout
    assert "checkpoint.resume: required" in proc.stdout + proc.stderr


def test_ranks_exit_when_their_launcher_is_killed(assets: Path, tmp_path: Path) -> None:
    spec = job(assets, tmp_path / "run")
    spec["training"]["max_steps"] = 40
    proc = _start(write_spec(spec, tmp_path / "job.yaml"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 1, proc)
    workers = _workers(proc)
    assert len(workers) == 3
    agent = next(p for p in psutil.Process(proc.pid).children() if p.pid in {w.ppid() for w in workers.values()})
    agent.send_signal(signal.SIGKILL)  # the torchrun agent dies; nothing tells the ranks
    _, alive = psutil.wait_procs(list(workers.values()), timeout=30)
    assert not alive, f"orphaned ranks still running: {[p.pid for p in alive]}"
    proc.kill()
    proc.wait()
