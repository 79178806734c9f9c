"""DPO on poft-ds's engine: a real ZeRO-3 job on CPU against a plain single-process computation."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from tests.conftest import base_spec, launch, read_metrics, start_cli, write_spec
from tests.test_e2e import dumped_scores

pytestmark = pytest.mark.distributed


def plain_pair_logps(
    model_dir: Path, data_file: Path, pairs: list[int], max_length: int
) -> dict[int, tuple[float, float]]:
    """Each pair's chosen and rejected log-probability sums over its last response, plainly."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = ChatTokenizer(tok, max_length, last_turn_only=True)
    rows = load_rows([str(data_file)], pairs=True)
    out = {}
    with torch.no_grad():
        for i in pairs:
            sums = []
            for r in (i, i + 1):
                s, _ = chat(rows[r].messages)
                ids = torch.tensor([s.input_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
                taken = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
                sums.append(float((taken * torch.tensor(s.response_mask[1:])).sum()))
            out[i] = (sums[0], sums[1])
    return out


def test_sft_then_dpo_staged_job_resumes_its_killed_second_stage_and_dpo_learns(assets: Path, tmp_path: Path) -> None:
    prefs = assets / "data" / "preferences.jsonl"
    spec = base_spec(
        assets,
        tmp_path / "run",
        checkpoint={"every_steps": 3},
        topology={"procs_per_node": 3},  # DPO: 2 trainers, 1 rank for the reference model
    )
    del spec["aligned_models"]  # the base's aligned models would be PoFT's only anyway
    spec["training"].update(learning_rate=2e-3, micro_batch_size=1, max_tokens_per_micro_batch=256)
    spec["stages"] = [
        {
            "name": "sft",
            "objective": {"kind": "sft"},
            "topology": {"procs_per_node": 2},
            "training": {"max_steps": 2},
        },
        {  # starts from the SFT stage's model, which is also its reference (the default)
            "name": "dpo",
            "objective": {"kind": "dpo", "beta": 0.5},
            "data": {"train_files": [str(prefs)]},
            "training": {"max_steps": 12},
            "logging": {"dump_scores": True},
        },
    ]
    path = write_spec(spec, tmp_path / "job.yaml")
    proc = start_cli("launch", str(path))
    dpo_metrics = tmp_path / "run" / "dpo" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (dpo_metrics.exists() and len(dpo_metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, "the job ended early:\n" + proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    # The whole job at once, mid second stage: every rank too (a rank left alone would notice its
    # launcher's death only within its watchdog's interval, time enough to finish this tiny stage).
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)
    sft = tmp_path / "run" / "sft"
    assert (sft / "STAGE_DONE").is_file() and not (tmp_path / "run" / "dpo" / "STAGE_DONE").exists()
    before = {f: f.stat().st_mtime_ns for f in sft.rglob("*") if f.is_file()}

    again = launch(path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"[poft-ds] stage sft: finished earlier ({sft}); skipped" in again.stdout
    assert {f: f.stat().st_mtime_ns for f in sft.rglob("*") if f.is_file()} == before  # not run again
    resumed = re.search(r"resumed from \S*dpo/checkpoints/step_(\d{8}) at step (\d+)", again.stdout)
    assert resumed and int(resumed[1]) == int(resumed[2]), again.stdout[-3000:]
    assert int(resumed[2]) in (3, 6, 9)  # a checkpoint of the killed launch (every 3 steps), not a fresh start
    run_dir = tmp_path / "run" / "dpo"
    assert (run_dir / "STAGE_DONE").is_file() and (run_dir / "final_model" / "config.json").is_file()
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))

    # Step 1: the policy is the reference (the SFT stage's model), so every reward is 0 and the
    # sigmoid loss is log 2.
    first = metrics[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # It learns to prefer the right answers, on pairs it has not trained on yet (one epoch).
    late = metrics[-6:]
    assert sum(m["rewards/accuracies"] for m in late) / len(late) > 0.8, [m["rewards/accuracies"] for m in late]
    assert late[-1]["rewards/margins"] > 0.5 and late[-1]["loss"] < first["loss"] - 0.2
    for m in metrics:  # TRL's definitions: the margin is chosen minus rejected
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-9)

    # The reference ranks' log-probabilities equal a plain single-process computation under the
    # SFT stage's model, over the last response of each conversation (multi-turn prompts included).
    dumped = dumped_scores(run_dir)  # steps after the checkpoint were run twice
    assert {(d["step"], d["row"]) for d in dumped} == {(d["step"], d["row"]) for d in dumped if d["step"] <= 12}
    assert len({(d["step"], d["row"]) for d in dumped}) == 12 * 8
    pairs = sorted({d["row"] for d in dumped})
    rows = load_rows([str(prefs)], pairs=True)
    assert all(p % 2 == 0 for p in pairs)
    assert any(sum(m["role"] == "assistant" for m in rows[p].messages) > 1 for p in pairs)
    expected = plain_pair_logps(sft / "final_model", prefs, pairs, 96)
    for d in dumped:
        assert (d["ref_logps"]["chosen"], d["ref_logps"]["rejected"]) == pytest.approx(expected[d["row"]], abs=1e-4)
    for d in (d for d in dumped if d["step"] == 1):  # and the policy's equal them before the first update
        assert (d["logps"]["chosen"], d["logps"]["rejected"]) == pytest.approx(expected[d["row"]], abs=1e-4)

    # Each stage's resolved spec: the DPO stage starts from the SFT stage's model, its reference too.
    stage = yaml.safe_load((run_dir / "job.yaml").read_text())
    assert stage["model"]["path"] == str(sft / "final_model") == stage["aligned_models"][0]["path"]
    assert stage["objective"]["kind"] == "dpo" and stage["aligned_models"][0]["name"] == "reference"
    report = json.loads((run_dir / "data_report" / "trainer.json").read_text())
    assert report["rows"] == 96 and report["usable_by_all_models"] == 96  # pairs
