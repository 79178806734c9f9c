"""End-to-end jobs: real processes, real DeepSpeed ZeRO-3, gloo on CPU. No mocks."""

from __future__ import annotations

import json
import math
import platform
import socket
from pathlib import Path

import deepspeed
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import poft_ds
from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import load_rows
from poft_ds.environment import git_commit
from poft_ds.plot import PIXEL_SIZE
from tests.conftest import PARTITIONED, base_spec, hub_cache, launch, read_metrics, run_job, status_of, write_spec
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
    spec = base_spec(
        assets, tmp_path / "run", logging={"dump_scores": True, "report_to": ["tensorboard"]}, deepspeed={}
    )
    # The target and one aligned model named by hub ids, found offline in a local hub cache.
    cache = tmp_path / "hub"
    commits = hub_cache(
        cache, {"poft-test/target": assets / "target"}, {"poft-test/zephyr": {"v1": assets / "aligned_zephyr"}}
    )
    spec["model"]["path"] = "poft-test/target"
    spec["aligned_models"][1].update(path="poft-test/zephyr", revision="v1")
    hub_env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run_dir = run_job(spec, tmp_path, log=tmp_path / "console.txt", env=hub_env)

    # What the run ran with: versions, the commit, hosts and devices of every rank, the hub models' commits.
    (launch,) = json.loads((run_dir / "environment.json").read_text())["launches"]
    assert launch["software"]["packages"]["torch"] == torch.__version__
    assert launch["software"]["packages"]["deepspeed"] == deepspeed.__version__
    assert launch["software"]["python"] == platform.python_version()
    assert launch["software"]["git_commit"] == git_commit() and launch["software"]["poft_ds"] == poft_ds.__version__
    assert launch["hosts"] == [socket.gethostname()] and launch["software_differs"] == []
    assert [(r["global_rank"], r["role"], r["device"]) for r in launch["ranks"]] == [
        (0, "trainer", "cpu"),
        (1, "trainer", "cpu"),
        (2, "ref/chatml", "cpu"),
        (3, "ref/zephyr", "cpu"),
    ]
    assert launch["models"]["trainer"]["hub_id"] == "poft-test/target"
    assert launch["models"]["trainer"]["revision"] == commits["poft-test/target"]
    assert launch["models"]["ref/zephyr"]["revision"] == commits["poft-test/zephyr@v1"]
    assert launch["models"]["ref/chatml"] == {"path": str(assets / "aligned_chatml"), "hub_id": None, "revision": None}
    for tag in ("step_00000003", "step_00000006"):  # each checkpoint keeps the record it was trained with
        assert (run_dir / "checkpoints" / tag / "environment.json").read_bytes() == (
            run_dir / "environment.json"
        ).read_bytes()
    resolved = yaml.safe_load((run_dir / "job.resolved.yaml").read_text())
    assert (resolved["model"]["path"], resolved["model"]["revision"]) == (
        "poft-test/target",
        commits["poft-test/target"],
    )

    # A quiet console: a third-party warning shows once per run, not at every step from every rank.
    console = (tmp_path / "console.txt").read_text()
    warned = [line for line in console.splitlines() if "Warning:" in line]
    assert len(warned) == len(set(warned)), sorted(w for w in warned if warned.count(w) > 1)[:3]
    # Each rank logs to its own file; the console shows trainer rank 0 (and errors, of which there are none).
    logs = {r: (run_dir / "logs" / f"rank{r}.log").read_text() for r in range(4)}
    assert "[poft-ds] step=6 " in logs[0] and "[poft-ds] step=6 " in console
    for r, role in ((2, "ref/chatml"), (3, "ref/zephyr")):
        assert f"[poft-ds] {role} rank 0: " in logs[r]  # the reference rank's summary line...
        assert f"[poft-ds] {role} rank 0: " not in console  # ...stays in its log
    assert "global_rank=1/4 role=trainer" in logs[1]
    assert all("\r" not in text for text in [console, *logs.values()])  # no progress-bar redraws captured
    assert "[poft-ds] training: 6/6 steps (100%)" in logs[0]  # plain progress lines with an ETA
    # The start-up table: one line per rank with its role and the part of the model it holds.
    table = console.split("[poft-ds] ranks:")[1].splitlines()[1:6]
    assert table[0].split()[:2] == ["rank", "role"]
    assert [line.split()[:3] for line in table[1:]] == [
        ["0", "trainer", "0/2"],
        ["1", "trainer", "1/2"],
        ["2", "ref/chatml", "0/1"],
        ["3", "ref/zephyr", "0/1"],
    ]
    for r, line in enumerate(table[1:]):  # each rank's share, as its ranks/rank<N>.json records it
        record = json.loads((run_dir / "ranks" / f"rank{r}.json").read_text())
        assert f"{100 * record['local_fraction']:.1f}% of {record['numel']:,} parameters" in line

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
    for m in metrics:  # where each step's seconds went
        assert m["wait_for_scores_s"] + m["compute_s"] == pytest.approx(m["step_time_s"], rel=1e-6)
    ckpt = {m["step"]: m["checkpoint_s"] for m in metrics}
    assert min(ckpt[3], ckpt[6]) > 10 * max(ckpt[1], ckpt[2], ckpt[4], ckpt[5])  # checkpoints at steps 3 and 6
    scored = [m for m in metrics if m["ref_new_scores"]]
    assert scored and all(m["ref_busy_fraction"] > 0 and m["ref_tokens_per_s"] > 0 for m in scored)
    summaries = [json.loads((run_dir / "ranks" / f"summary_rank{r}.json").read_text()) for r in range(2)]
    assert 0 < max(m["peak_memory_bytes"] for m in metrics) <= max(x["peak_rss_bytes"] for x in summaries)

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

    # samples.jsonl: every step's samples with the weight PoFT gave them, computed here from the
    # dumped per-trainer scores (beta 1, gamma 0, mean aggregation); quantiles and the share the
    # target already wins in metrics.jsonl follow from them.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in samples] == list(range(1, 7))
    by_step = {}
    for d in dumped:
        s_ref = (d["scores"]["chatml"] + d["scores"]["zephyr"]) / 2
        by_step.setdefault(d["step"], {})[d["row"]] = (d["s_target"], s_ref, 1 / (1 + math.exp(d["s_target"] - s_ref)))
    for x, m in zip(samples, metrics):
        mine = by_step[x["step"]]
        assert sorted(x["row"]) == sorted(mine)
        for row, s_t, s_r, w in zip(x["row"], x["s_target"], x["s_ref"], x["weight"]):
            assert (s_t, s_r, w) == pytest.approx(mine[row], abs=1e-6)
        w = sorted(v[2] for v in mine.values())
        for q in (10, 50, 90):  # linear interpolation between order statistics, as numpy and torch define it
            pos = q / 100 * (len(w) - 1)
            lo = int(pos)
            expect = w[lo] + (pos - lo) * (w[min(lo + 1, len(w) - 1)] - w[lo])
            assert m[f"poft_weight/p{q}"] == pytest.approx(expect, abs=1e-6)
        assert m["target_beats_ref"] == sum(v[0] > v[1] for v in mine.values()) / len(mine)
        assert m["poft_weight"] == pytest.approx(sum(w) / len(w), abs=1e-6)

    # The figures, drawn at the end of training: PNGs that decode, at the size drawn, not blank.
    for name in ("loss", "lr_throughput", "weights", "scores"):
        with Image.open(run_dir / "plots" / f"{name}.png") as img:
            assert img.size == PIXEL_SIZE
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, name

    # TensorBoard: the loss series, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics
    ]

    # `poft-ds status` on the finished run.
    done = status_of(run_dir)
    assert done["state"] == "finished" and done["step"] == 6 and done["total_steps"] == 6
    assert done["last_checkpoint"] == "step_00000006" and len(done["ranks"]) == 4


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
        # The end of training also runs `poft-ds eval` on the final model (eval.json); these rows
        # have no answers, so it scores them and checks none.
        eval={"answer_field": "answer"},
        # Packed micro-batches: training and the held-out evaluation bin-pack to the token budget.
        training={"learning_rate": 1e-3, "global_batch_size": 8, "max_steps": 6, "max_tokens_per_micro_batch": 160},
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
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["cross_entropy"] == pytest.approx(-logp / tokens, rel=1e-4)
    assert report["evaluated"] == len(picked) and report["exact_match"] is None
