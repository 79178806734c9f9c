"""Launchers: rendered commands, and real launches under the deepspeed launcher, OpenMPI and Slurm."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poft_ds.launchers import plan_launch
from poft_ds.spec import load_spec
from tests.conftest import base_spec, launch, read_metrics, write_spec

HERE = Path(__file__).parent


def small_job(assets: Path, run_dir: Path, **over) -> dict:
    """2 trainer ranks + 1 reference rank, 3 steps: the smallest job that exercises every role."""
    spec = base_spec(
        assets,
        run_dir,
        aligned_models=[{"name": "zephyr", "path": str(assets / "aligned_zephyr"), "max_length": 96}],
        training={"learning_rate": 1e-3, "micro_batch_size": 2, "global_batch_size": 8, "max_steps": 3},
        topology={"procs_per_node": 3},
        checkpoint={"every_steps": 2},
    )
    spec.update(over)
    return spec


def assert_complete(run_dir: Path, steps: int = 3) -> None:
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "job.resolved.yaml").is_file()


def test_deepspeed_two_node_hostfile_and_command_are_rendered(assets: Path, tmp_path: Path) -> None:
    spec_dict = small_job(assets, tmp_path / "run")
    spec_dict["topology"] = {"nodes": 2, "procs_per_node": 3}
    spec_dict["training"]["global_batch_size"] = 10  # 5 trainer ranks x micro-batch 2
    spec_dict["launcher"] = {
        "kind": "deepspeed",
        "master_port": 29999,
        "deepspeed": {"hosts": ["gpu-a", "gpu-b"], "backend": "pdsh", "ssh_port": 2222},
    }
    path = write_spec(spec_dict, tmp_path / "job.yaml")
    plan = plan_launch(load_spec(path), path)
    hostfile = tmp_path / "run" / "launch" / "hostfile"
    assert plan.files == {hostfile: "gpu-a slots=3\ngpu-b slots=3\n"}
    assert plan.command[:9] == [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--master_addr=gpu-a",
        "--launcher=pdsh",
        "--ssh_port=2222",
        "--master_port=29999",
        "--no_local_rank",
    ]
    assert plan.command[9:] == ["--module", "poft_ds.cli", "train", str(path.resolve())]
    # --dry-run prints the same, and starts nothing.
    out = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "launch", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "gpu-b slots=3" in out.stdout and "--master_addr=gpu-a" in out.stdout
    assert not hostfile.exists()


def test_a_local_launch_without_a_port_gets_a_free_one_and_multi_node_launchers_the_customary_one(
    assets: Path, tmp_path: Path
) -> None:
    spec_dict = small_job(assets, tmp_path / "run")
    del spec_dict["launcher"]["master_port"]
    path = write_spec(spec_dict, tmp_path / "job.yaml")
    spec = load_spec(path)
    assert spec.launcher.master_port is None

    def port_of(command: list[str], flag: str) -> int:
        return int(next(a for a in command if a.startswith(flag)).split("=")[1])

    # Two jobs started side by side on one machine (the old fixed default made the second fail
    # with "address already in use"): a port that is free now, and not the same one twice in a row.
    ports = [port_of(plan_launch(spec, path).command, "--master-port=") for _ in range(2)]
    assert ports[0] != ports[1] and 29500 not in ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free after the plan: nothing holds it
    # A port the spec names is used as it is.
    spec_dict["launcher"]["master_port"] = 29987
    pinned = write_spec(spec_dict, tmp_path / "pinned.yaml")
    assert port_of(plan_launch(load_spec(pinned), pinned).command, "--master-port=") == 29987
    # Launchers spanning nodes need a port every node agrees on before any of them runs.
    spec_dict["launcher"] = {"kind": "deepspeed", "deepspeed": {"hosts": ["gpu-a", "gpu-b"]}}
    spec_dict["topology"] = {"nodes": 2, "procs_per_node": 3}
    spec_dict["training"]["global_batch_size"] = 10
    multi = write_spec(spec_dict, tmp_path / "multi.yaml")
    assert port_of(plan_launch(load_spec(multi), multi).command, "--master_port=") == 29500
    spec_dict["launcher"] = {"kind": "slurm"}
    slurm = write_spec(spec_dict, tmp_path / "slurm.yaml")
    assert "export MASTER_PORT=29500\n" in next(iter(plan_launch(load_spec(slurm), slurm).files.values()))


def test_deepspeed_launcher_real_run_on_localhost_keeps_secrets_out_of_the_run_dir(
    assets: Path, tmp_path: Path
) -> None:
    secret = "hf_SECRETtoken_7f3a9c"
    spec = small_job(assets, tmp_path / "run", env={"HF_TOKEN": "${POFT_TEST_SECRET}", "POFT_MARK": "ok"})
    spec["launcher"] = {"kind": "deepspeed", "master_port": base_spec(assets, tmp_path)["launcher"]["master_port"]}
    path = write_spec(spec, tmp_path / "job.yaml")
    os.environ["POFT_TEST_SECRET"] = secret
    try:
        proc = launch(path)
    finally:
        del os.environ["POFT_TEST_SECRET"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "deepspeed.launcher.runner --num_nodes=1 --num_gpus=3" in proc.stdout
    run_dir = tmp_path / "run"
    assert_complete(run_dir)
    assert "${POFT_TEST_SECRET}" in (run_dir / "job.resolved.yaml").read_text()
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI is installed by scripts/setup.sh")
def test_openmpi_run_discovers_ranks_through_mpi4py(assets: Path, tmp_path: Path) -> None:
    spec = small_job(assets, tmp_path / "run")
    spec["launcher"] |= {"kind": "mpi", "mpi": {"args": ["--allow-run-as-root", "--oversubscribe"]}}
    proc = launch(write_spec(spec, tmp_path / "job.yaml"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "mpirun -np 3" in proc.stdout
    for rank, role in ((0, "trainer"), (1, "trainer"), (2, "ref/zephyr")):
        # Each rank says who it is in its own log; the console carries trainer rank 0's lines.
        assert f"global_rank={rank}/3 role={role}" in (tmp_path / "run" / "logs" / f"rank{rank}.log").read_text()
    assert "global_rank=0/3 role=trainer" in proc.stdout and "global_rank=2/3" not in proc.stdout
    assert_complete(tmp_path / "run")


def test_sbatch_script_renders_the_slurm_options(assets: Path, tmp_path: Path) -> None:
    spec = small_job(assets, tmp_path / "run")
    spec["launcher"] |= {
        "kind": "slurm",
        "slurm": {
            "partition": "gpu",
            "account": "ml",
            "time": "1-00:00:00",
            "gres": "gpu:8",
            "extra_sbatch": ["--qos=high"],
            "job_name": "poft",
        },
    }
    path = write_spec(spec, tmp_path / "job.yaml")
    plan = plan_launch(load_spec(path), path)
    (script,) = plan.files.values()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=ml",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --qos=high",
        "#SBATCH --ntasks=3",
        "#SBATCH --ntasks-per-node=3",
        "#SBATCH --job-name=poft",
        f"-m poft_ds.cli train {path.resolve()}",
    ):
        assert line in script
    assert "--overcommit" not in script
    assert plan.command[:2] == ["sbatch", "--parsable"]


SLURM_DAEMONS = ("slurmd", "slurmctld", "munged")


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """A one-node Slurm cluster for this module's tests; the daemons it started are stopped after."""
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's slurm-wlm and munge (scripts/setup.sh) and root")
    already = {d for d in SLURM_DAEMONS if subprocess.run(["pgrep", "-x", d], capture_output=True).returncode == 0}
    try:
        subprocess.run(["bash", str(HERE / "slurm_cluster.sh")], check=True, timeout=180)
        yield
    finally:
        for daemon in SLURM_DAEMONS:  # the node daemon first, munge last (the others authenticate with it)
            if daemon not in already:
                subprocess.run(["pkill", "-TERM", "-x", daemon], capture_output=True)
                deadline = time.time() + 30
                while subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 0:
                    if time.time() > deadline:
                        subprocess.run(["pkill", "-KILL", "-x", daemon], capture_output=True)
                        break
                    time.sleep(0.2)


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "UNKNOWN"


def test_slurm_submission_completes_with_a_complete_run_dir(slurm_cluster, assets: Path, tmp_path: Path) -> None:
    spec = small_job(assets, tmp_path / "run")
    spec["launcher"] |= {"kind": "slurm", "slurm": {"overcommit": True}}
    proc = launch(write_spec(spec, tmp_path / "job.yaml"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.isdigit() and f"submitted Slurm job {job_id}" in proc.stdout
    deadline = time.time() + 600
    while (state := _job_state(job_id)) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
        assert time.time() < deadline, f"Slurm job {job_id} still {state}"
        time.sleep(2)
    log = next((tmp_path / "run" / "slurm").glob(f"*-{job_id}.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "global_rank=0/3 role=trainer" in log
    assert "global_rank=2/3 role=ref/zephyr" in (tmp_path / "run" / "logs" / "rank2.log").read_text()
    assert_complete(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "data_report" / "trainer.json").read_text())["rows"] == 96


def test_slurm_sigterm_checkpoints_requeues_and_completes(slurm_cluster, assets: Path, tmp_path: Path) -> None:
    spec = small_job(assets, tmp_path / "run")
    spec["training"]["max_steps"] = 10
    spec["checkpoint"] = {"every_steps": 100, "save_final_model": False}
    spec["launcher"] |= {"kind": "slurm", "slurm": {"overcommit": True}}
    proc = launch(write_spec(spec, tmp_path / "job.yaml"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and _job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    pending_since = None
    while (state := _job_state(job_id)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
        assert time.time() < deadline, f"Slurm job {job_id} still {state}"
        pending_since = (pending_since or time.time()) if state == "PENDING" else None
        # Slurm delays a requeued job's start by default; not worth waiting for here. But not at once:
        # slurmd refuses a credential made in the same second as the old one's revocation
        # ("Job credential revoked"), so the requeued job must start a few seconds later.
        if pending_since and time.time() - pending_since > 3:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    log = next((tmp_path / "run" / "slurm").glob(f"*-{job_id}.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "preempted: checkpoint at step" in log and "requeueing job" in log and "resumed from" in log
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in info
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 11))
    assert not (tmp_path / "run" / "PREEMPTED").exists()


def test_role_map_names_the_ranks_a_launch_starts(assets: Path, tmp_path: Path) -> None:
    from poft_ds.launchers import role_map

    spec = load_spec(write_spec(base_spec(assets, tmp_path / "r"), tmp_path / "job.yaml"))
    assert role_map(spec) == "global ranks 0-1: trainer, 2: ref/chatml, 3: ref/zephyr"
    # A store-only launch starts the trainers alone: a failure message must not name reference ranks.
    store_only = spec.model_copy(update={"reference": spec.reference.model_copy(update={"mode": "store"})})
    assert store_only.world_size == 2 and role_map(store_only) == "global ranks 0-1: trainer"


@pytest.mark.parametrize(
    ("omp", "local_rank", "procs", "share"),
    [("1", 0, 2, [0]), ("1", 1, 2, [1]), ("1", 2, 2, [0]), ("", 0, 1, [0, 1]), ("", 1, 2, [1]), ("2", 1, 2, [0, 1])],
)
def test_bind_cores_gives_each_local_rank_its_share_of_the_allowed_cores(
    monkeypatch: pytest.MonkeyPatch, omp: str, local_rank: int, procs: int, share: list[int]
) -> None:
    """`topology.bind_cores`: local rank r gets cores [r*t, (r+1)*t) of those allowed, wrapping around,
    t = OMP_NUM_THREADS or cores / procs (written here for 2 allowed cores, as in CI)."""
    import torch

    from poft_ds.distributed import bind_cpu_cores

    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    allowed = sorted(before)[:2]
    if len(allowed) < 2:
        pytest.fail("this test needs 2 CPU cores (CI has 2)")
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    try:
        os.sched_setaffinity(0, allowed)
        expected = [allowed[i] for i in share]
        assert bind_cpu_cores(local_rank, procs) == expected
        assert sorted(os.sched_getaffinity(0)) == expected and torch.get_num_threads() == len(expected)
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)
