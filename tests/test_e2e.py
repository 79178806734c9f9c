"""End-to-end jobs: real processes, real DeepSpeed ZeRO-3, gloo on CPU. No mocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from tests.conftest import PARTITIONED, base_spec, launch, read_metrics, run_job, write_spec
from tests.test_scoring import plain_scores

pytestmark = pytest.mark.distributed


def single_process_scores(model_dir: Path, data_file: Path, rows: list[int], max_length: int) -> dict[int, float]:
    """Each row's score under a model, computed plainly, one sample at a time."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = ChatTokenizer(tok, max_length)
    data = load_rows([str(data_file)])
    out = {}
    with torch.no_grad():
        for i in rows:
            s, _ = chat(data[i].messages)
            ids = torch.tensor([s.input_ids])
            out[i] = float(plain_scores(model, ids, torch.ones_like(ids), torch.tensor([s.response_mask]))[0])
    return out


def dumped_scores(run_dir: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted((run_dir / "scores").glob("*.jsonl")) for line in f.read_text().splitlines()
    ]


# Target tokens per packed micro-batch in the packed run (samples are at most 96 tokens).
PACKED_BUDGET = 128


def test_poft_job_trains_checkpoints_exports_and_sends_exact_scores(assets: Path, tmp_path: Path) -> None:
    # The shipped DeepSpeed configs (ds_configs/zero3.json, zero3_inference.json), as the quickstart runs.
    spec = base_spec(assets, tmp_path / "run", logging={"dump_scores": True}, deepspeed={})
    run_dir = run_job(spec, tmp_path, log=tmp_path / "console.txt")

    # A quiet console: a third-party warning shows once per run, not at every step from every rank.
    warned = [line for line in (tmp_path / "console.txt").read_text().splitlines() if "Warning:" in line]
    assert len(warned) == len(set(warned)), sorted(w for w in warned if warned.count(w) > 1)[:3]

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for m in metrics:
        for key in (
            "loss",
            "cross_entropy",
            "poft_weight",
            "s_target",
            "s_ref",
            "lr",
            "tokens_per_s",
            "wait_for_scores_s",
            "s_ref/chatml",
            "s_ref/zephyr",
        ):
            assert math.isfinite(m[key]), (key, m)
        assert 0 < m["poft_weight"] < 1
    assert metrics[-1]["cross_entropy"] < metrics[0]["cross_entropy"]  # it learns

    assert (run_dir / "job.resolved.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    for tag in ("step_00000003", "step_00000006"):
        assert len(list((run_dir / "checkpoints" / tag).glob("*optim_states.pt"))) == 2  # one shard per trainer

    final = run_dir / "final_model"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    start = load_file(assets / "target" / "model.safetensors")
    trained = load_file(final / "model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    # The reference ranks' scores equal a plain single-process computation, multi-turn rows included.
    dumped = dumped_scores(run_dir)
    assert len(dumped) == 6 * 8
    rows = sorted({d["row"] for d in dumped})
    data = load_rows(spec["data"]["train_files"])
    assert any(sum(m["role"] == "assistant" for m in data[i].messages) > 1 for i in rows)
    for name, folder in (("chatml", "aligned_chatml"), ("zephyr", "aligned_zephyr")):
        expected = single_process_scores(assets / folder, Path(spec["data"]["train_files"][0]), rows, 96)
        for d in dumped:
            assert d["scores"][name] == pytest.approx(expected[d["row"]], abs=1e-5), (name, d)


def test_packed_two_trainers_match_padded_one_trainer_and_sharded_reference_matches(
    assets: Path, tmp_path: Path
) -> None:
    """Same global batches on 2 ZeRO-3 trainers + a reference model sharded over 2 ranks, all with
    padding-free packed batches, and on 1 + 1 with right-padded ones: the same losses and scores.

    The packed trainers run as many passes as each step's bin-packing needs, some of them empty.
    """
    runs = {}
    for trainers, ref_ranks, micro in ((2, 2, 1), (1, 1, 4)):
        packed = trainers == 2
        spec = base_spec(
            assets,
            tmp_path / f"run{trainers}",
            aligned_models=[
                {
                    "name": "zephyr",
                    "path": str(assets / "aligned_zephyr"),
                    "max_length": 96,
                    "ranks": ref_ranks,
                    "score_batch_size": 3,
                    "max_tokens_per_batch": 150 if packed else None,
                }
            ],
            training={
                "learning_rate": 1e-3,
                "micro_batch_size": micro,
                "global_batch_size": 8,
                "max_steps": 6,
                "max_tokens_per_micro_batch": PACKED_BUDGET if packed else None,
            },
            topology={"procs_per_node": trainers + ref_ranks},
            logging={"dump_scores": True},
            checkpoint={"every_steps": 100, "save_final_model": False},
        )
        runs[trainers] = run_job(spec, tmp_path, f"job{trainers}.yaml")
    two, one = read_metrics(runs[2]), read_metrics(runs[1])
    assert len(two) == len(one) == 6
    for a, b in zip(two, one):
        for key in ("loss", "cross_entropy", "s_target", "s_ref", "poft_weight", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a["step"])
    assert sum(m["padding_efficiency"] for m in two) > sum(m["padding_efficiency"] for m in one)
    # The shape the test relies on: packing needs a different number of passes at different steps,
    # and some steps give one trainer fewer micro-batches than the other (it runs empty ones).
    passes = [m["micro_batches"] for m in two]
    assert len(set(passes)) > 1, passes
    assert any(m["padding_efficiency"] < 1.0 for m in two)  # an empty pass processed its 2 tokens
    by_row = {(d["step"], d["row"]): d["scores"]["zephyr"] for d in dumped_scores(runs[1])}
    sharded = {(d["step"], d["row"]): d["scores"]["zephyr"] for d in dumped_scores(runs[2])}
    assert sharded.keys() == by_row.keys()
    for k, v in sharded.items():
        assert v == pytest.approx(by_row[k], abs=1e-5)


def test_sft_job_runs_without_reference_ranks_and_gradient_checkpointing_changes_nothing(
    assets: Path, tmp_path: Path
) -> None:
    runs = {}
    for checkpointing in (False, True):
        spec = base_spec(
            assets,
            tmp_path / f"sft-{checkpointing}",
            aligned_models=[],
            objective={"kind": "sft"},
            training={
                "learning_rate": 1e-3,
                "micro_batch_size": 2,
                "global_batch_size": 8,
                "max_steps": 6,
                "gradient_checkpointing": checkpointing,
            },
            topology={"procs_per_node": 2},
            checkpoint={"every_steps": 100, "save_final_model": False},
        )
        runs[checkpointing] = read_metrics(run_job(spec, tmp_path, f"sft-{checkpointing}.yaml"))
    metrics = runs[False]
    assert len(metrics) == 6 and "poft_weight" not in metrics[0]
    # SFT's loss is the token-level cross-entropy of the response tokens.
    for m in metrics:
        assert m["loss"] == pytest.approx(m["cross_entropy"], rel=0.05)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    for a, b in zip(metrics, runs[True]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_topology_that_does_not_fit_fails_before_any_rank_starts(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(
        assets,
        tmp_path / "bad",
        topology={"procs_per_node": 2},
        aligned_models=[{"name": "a", "path": str(assets / "aligned_chatml"), "ranks": 2}],
    )
    proc = launch(write_spec(spec, tmp_path / "bad.yaml"), timeout=120)
    assert proc.returncode == 2
    assert "topology.procs_per_node" in proc.stderr and "no trainer rank" in proc.stderr
    assert "torch.distributed.run" not in proc.stdout  # nothing was launched
    assert not (tmp_path / "bad").exists()


def test_held_out_rows_are_evaluated_and_never_trained_on(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(
        assets,
        tmp_path / "run",
        aligned_models=[{"name": "zephyr", "path": str(assets / "aligned_zephyr"), "max_length": 96}],
        data={"train_files": [str(assets / "data" / "train.jsonl")], "eval_fraction": 0.1},
        topology={"procs_per_node": 3},
        logging={"eval_every_steps": 3, "dump_scores": True},
        checkpoint={"every_steps": 100, "save_final_model": True},
        # The shipped offload config: parameters and optimizer state on the CPU, DeepSpeed's CPU Adam.
        deepspeed={"train_config": "zero3_offload.json", "reference_config": PARTITIONED["reference_config"]},
    )
    run_dir = run_job(spec, tmp_path)
    record = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    assert record["role"] == "trainer" and record["optimizer"] == "DeepSpeedCPUAdam"
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "eval_cross_entropy" in m]
    assert [m["step"] for m in evals] == [3, 6]
    trained = {d["row"] for d in dumped_scores(run_dir)}
    # The held-out rows: the same seeded choice, recomputed here from what was trained on.
    data = load_rows(spec["data"]["train_files"])
    held_out = [i for i in range(len(data)) if i not in trained]
    assert len(held_out) >= round(0.1 * 96)

    # eval_cross_entropy of the final model on the held-out rows, recomputed in one process.
    tok = AutoTokenizer.from_pretrained(run_dir / "final_model")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_model").eval()
    chat = ChatTokenizer(tok, 96)
    g = torch.Generator().manual_seed(spec["seed"] - 1)
    picked = sorted(torch.randperm(96, generator=g)[: round(0.1 * 96)].tolist())
    assert not set(picked) & trained
    logp = tokens = 0.0
    with torch.no_grad():
        for i in picked:
            s, _ = chat(data[i].messages)
            ids = torch.tensor([s.input_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            mask = torch.tensor(s.response_mask[1:])
            logp += lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[mask].sum().item()
            tokens += mask.sum().item()
    assert evals[-1]["eval_cross_entropy"] == pytest.approx(-logp / tokens, rel=1e-4)
