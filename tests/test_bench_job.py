"""`poft-ds bench job.yaml`: one real benchmark of three tiny jobs (SFT, PoFT online, PoFT from the store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import base_spec, read_metrics, write_spec


@pytest.mark.distributed
def test_bench_job_runs_sft_online_and_store(assets: Path, tmp_path: Path) -> None:
    job = base_spec(assets, tmp_path / "job")
    job["topology"]["bind_cores"] = True  # as examples/bench/cpu.yaml: every variant pins its ranks
    spec = write_spec(job, tmp_path / "job.yaml")
    out = tmp_path / "bench" / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "poft_ds.cli",
            "bench",
            str(spec),
            "--out",
            str(out),
            "--steps",
            "3",
            "--warmup-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert list(runs) == ["sft", "poft_online", "poft_store"]
    assert "PoFT-online / SFT" in proc.stdout  # the table was printed

    # SFT ran the trainer ranks alone; both PoFT runs had one reference rank per aligned model.
    roles = {name: sorted(r["role"] for r in runs[name]["peak_memory"].values()) for name in runs}
    assert roles["sft"] == ["trainer", "trainer"]
    assert roles["poft_online"] == ["ref/chatml", "ref/zephyr", "trainer", "trainer"]
    assert roles["poft_store"] == ["trainer", "trainer"]  # a full store: no reference rank starts
    assert runs["sft"]["reference_ranks"] == 0 and runs["sft"]["ref_forward_passes"] is None

    # Each rank ran on the core its local rank names (one thread each, wrapping over the cores this
    # test may use), in all three variants: the SFT trainers on the cores they have in the PoFT layout.
    allowed = sorted(os.sched_getaffinity(0))
    for name in runs:
        records = [json.loads(f.read_text()) for f in (tmp_path / "bench" / name / "ranks").glob("rank?.json")]
        assert len(records) == len(runs[name]["peak_memory"])
        for rec in records:
            assert rec["cpu_cores"] == [allowed[rec["local_rank"] % len(allowed)]], (name, rec["global_rank"])

    # The store run read every score the online run computed: no reference forward pass at all.
    run_dirs = {name: tmp_path / "bench" / name for name in runs}
    online, store = read_metrics(run_dirs["poft_online"]), read_metrics(run_dirs["poft_store"])
    assert [r["step"] for r in online] == [r["step"] for r in store] == [1, 2, 3]
    assert sum(r["ref_forward_passes"] for r in online) > 0 == runs["poft_store"]["ref_forward_passes"]
    assert sum(r["ref_forward_passes"] for r in store) == 0
    assert runs["poft_online"]["ref_forward_passes"] == sum(r["ref_forward_passes"] for r in online)

    # The ratios are those of the runs' own tokens over their own seconds, after the warm-up step.
    def tokens_per_s(name: str) -> float:
        measured = [r for r in read_metrics(run_dirs[name]) if r["step"] > 1]
        return sum(r["tokens"] for r in measured) / sum(r["step_time_s"] for r in measured)

    sft = tokens_per_s("sft")
    assert runs["sft"]["trainer_tokens_per_s"] == pytest.approx(sft)
    assert result["compare"]["poft_online_over_sft"] == pytest.approx(tokens_per_s("poft_online") / sft)
    assert result["compare"]["poft_store_over_sft"] == pytest.approx(tokens_per_s("poft_store") / sft)
    assert runs["sft"]["mfu"] is None  # CPU: no peak FLOP/s
    estimate = result["compare"]["reference_ranks_needed"]
    assert estimate["estimate"] is True and set(estimate["models"]) == {"chatml", "zephyr"}


def test_readmes_show_the_committed_cpu_benchmark() -> None:
    """The benchmark table in README.md and examples/bench/README.md is the one `poft-ds bench`
    prints for the committed result (examples/bench/results/cpu.json, copied from its --out)."""
    from poft_ds.bench.job import format_table

    root = Path(__file__).resolve().parent.parent
    result = json.loads((root / "examples" / "bench" / "results" / "cpu.json").read_text())
    table = format_table(result)
    assert result["repeats"] >= 3 and result["steps"] > result["warmup_steps"]
    for readme in (root / "README.md", root / "examples" / "bench" / "README.md"):
        assert table in readme.read_text(), readme


def test_best_of_rounds_takes_each_steps_fastest_time() -> None:
    """Rounds of one variant run the same steps: each step's fastest time over the rounds, summed."""
    from poft_ds.bench.job import best_of_rounds

    a = {"measured_step_s": [0.1, 0.2, 0.3], "measured_step_tokens": [10.0, 20.0, 30.0]}
    b = {"measured_step_s": [0.15, 0.1, 0.35], "measured_step_tokens": [10.0, 20.0, 30.0]}
    assert best_of_rounds([a, b]) == pytest.approx(60 / (0.1 + 0.1 + 0.3))
    assert best_of_rounds([a]) == pytest.approx(60 / 0.6)
    # Rounds that did not train the same steps cannot be compared step by step.
    assert best_of_rounds([a, b | {"measured_step_tokens": [10.0, 21.0, 30.0]}]) is None
    assert best_of_rounds([a, b | {"measured_step_s": [0.1, 0.1]}]) is None
