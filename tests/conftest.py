"""Shared fixtures: tiny local assets and a helper that runs a real multi-process job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from poft_ds.launchers import free_port
from poft_ds.tiny import build_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny target and aligned models plus synthetic chat data, built once per test session."""
    return build_assets(tmp_path_factory.mktemp("assets"), n_rows=96)


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """Mistral-7B-v0.1's real SentencePiece tokenizer, shipped offline by `mistral-common`."""
    mistral_common = pytest.importorskip("mistral_common")
    folder = tmp_path_factory.mktemp("mistral")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 32000
    return tok


# ZeRO-3 configs with `stage3_param_persistence_threshold: 0`: the tiny test models have no tensor
# above the shipped threshold (100,000 elements), so without these nothing would be partitioned,
# gathered or released, and sharding bugs would go untested.
PARTITIONED = {
    "train_config": str(Path(__file__).parent / "ds_configs" / "zero3_partitioned.json"),
    "reference_config": str(Path(__file__).parent / "ds_configs" / "zero3_inference_partitioned.json"),
}


def base_spec(assets: Path, run_dir: Path, **over: Any) -> dict[str, Any]:
    """A small PoFT job on the tiny assets, every weight partitioned by ZeRO-3; keyword arguments
    replace top-level sections."""
    spec: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"path": str(assets / "target"), "max_length": 96},
        "aligned_models": [
            {"name": "chatml", "path": str(assets / "aligned_chatml"), "max_length": 96},
            {"name": "zephyr", "path": str(assets / "aligned_zephyr"), "max_length": 96},
        ],
        "data": {"train_files": [str(assets / "data" / "train.jsonl")]},
        "objective": {"kind": "poft"},
        "training": {"learning_rate": 1e-3, "micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6},
        "topology": {"procs_per_node": 4},
        "checkpoint": {"every_steps": 3},
        "launcher": {"master_port": free_port()},
        "deepspeed": dict(PARTITIONED),
    }
    spec.update(over)
    return spec


def write_spec(spec: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def launch(
    spec_path: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `poft-ds launch` on a spec, as a user would, and return the finished process.

    `env` adds environment variables to the launch's.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "launch", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    """Start `poft-ds <args>` in its own session (so a test can kill all of it), output merged."""
    return subprocess.Popen(
        [sys.executable, "-m", "poft_ds.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )


def run_job(
    spec: dict[str, Any],
    tmp_path: Path,
    name: str = "job.yaml",
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """Launch a job, fail the test with its output if it fails, and return its run directory.

    With `log`, the job's console output (stdout, then stderr) is written there; `env` adds
    environment variables.
    """
    proc = launch(write_spec(spec, tmp_path / name), env=env)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        pytest.fail(f"job failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return Path(spec["run_dir"])


def hub_cache(root: Path, models: dict[str, Path], tags: dict[str, dict[str, Path]] | None = None) -> dict[str, str]:
    """Put local model folders into a Hugging Face hub cache at `root`, laid out as `hf download` leaves it.

    `models--<org>--<name>/blobs/<sha256>` hold the files, `snapshots/<commit>/<file>` are relative
    links to them, `refs/main` names the commit. `tags` adds, per id, tag -> another folder (its own
    commit, `refs/<tag>`).

    Returns:
        Each `id` and `id@tag` -> its commit.
    """
    commits = {}
    versions = [(repo, "main", folder) for repo, folder in models.items()]
    versions += [(repo, tag, folder) for repo, by_tag in (tags or {}).items() for tag, folder in by_tag.items()]
    for repo, ref, folder in versions:
        base = root / ("models--" + repo.replace("/", "--"))
        files = sorted(f for f in folder.rglob("*") if f.is_file())
        digest = hashlib.sha1(repo.encode() + ref.encode())
        for f in files:
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            digest.update(f"{f.relative_to(folder)}:{blob}".encode())
            (base / "blobs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, base / "blobs" / blob)
        commit = digest.hexdigest()
        for f in files:
            link = base / "snapshots" / commit / f.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            link.symlink_to(os.path.relpath(base / "blobs" / blob, link.parent))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
        commits[repo if ref == "main" else f"{repo}@{ref}"] = commit
    return commits


def status_of(run_dir: Path, *extra: str, expect_exit: int | None = None) -> dict[str, Any]:
    """`poft-ds status RUN_DIR --json`, run as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "status", str(run_dir), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1, 3, 75), proc.stderr
    if expect_exit is not None:
        assert proc.returncode == expect_exit, proc.stdout
    return json.loads(proc.stdout)


def launch_logs(run_dir: Path) -> str:
    """What every rank logged in the run directory's latest launch (`logs/rank<N>.log` are appended to
    by each launch, which starts its part with a `==== rank N` line)."""
    parts = []
    for f in sorted((run_dir / "logs").glob("rank*.log")):
        parts.append(f.read_text().rsplit("==== rank ", 1)[-1])
    return "".join(parts)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
