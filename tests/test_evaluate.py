"""`poft-ds eval`: figures against a plain computation, answer checking, the held-out rows, bad rows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.prepare import build_schedule
from poft_ds.data.rows import load_rows
from poft_ds.evaluate import evaluate_model, write_report
from poft_ds.spec import JobSpec, SpecError, load_spec
from poft_ds.tiny import CHATML_TEMPLATE

MAX_NEW = 8


def checker(generation: str, answer: str, row: dict[str, Any]) -> bool:
    """A user checker (`tests.test_evaluate:checker`): the row itself says whether it counts as correct."""
    return row["expect"]


def _spec(assets: Path, tmp_path: Path, aligned: list[dict[str, Any]] | None = None, **over: Any) -> JobSpec:
    """A job spec on the tiny target (a PoFT job with `aligned` models), loaded as `poft-ds eval` loads it;
    `over` updates sections."""
    raw: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "seed": 7,
        "model": {"path": str(assets / "target"), "max_length": 96},
        "data": {"train_files": [str(assets / "data" / "train.jsonl")]},
        "objective": {"kind": "sft"},
        # float32 on a GPU too, so that the figures compare with the CPU computations here.
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 2, "precision": "fp32"},
        "topology": {"procs_per_node": 1},
    }
    if aligned:
        raw["objective"] = {"kind": "poft"}
        raw["topology"] = {"procs_per_node": 4}
        raw["aligned_models"] = aligned
    for section, values in over.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path)


def _chats(assets: Path, n: int) -> list[dict[str, Any]]:
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_figures_equal_a_plain_computation(assets: Path, tmp_path: Path) -> None:
    chats = _chats(assets, 6)
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in chats), "want a multi-turn row"
    data = _write_jsonl(tmp_path / "eval.jsonl", chats)
    spec = _spec(assets, tmp_path, eval={"batch_size": 4})  # two batches, the second one padded differently
    report = evaluate_model(spec, assets / "target", data)

    # By hand: ChatML renders each assistant turn as `<|im_start|>assistant\n{content}<|im_end|>`; the
    # content and its end-of-turn marker are the response. Each sample alone, full float32 logits.
    tok = AutoTokenizer.from_pretrained(assets / "target")
    model = AutoModelForCausalLM.from_pretrained(assets / "target").eval()
    scores, sums, counts = [], 0.0, 0
    for c in chats:
        text = tok.apply_chat_template(c["messages"], tokenize=False)
        enc = tok(text, return_offsets_mapping=True)
        spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]
        mask = [b < e and any(s < e and b < t for s, t in spans) for b, e in enc["offset_mapping"]]
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        picked = logp[torch.tensor(mask[1:])]
        scores.append(picked.mean().item())
        sums += picked.sum().item()
        counts += len(picked)

    assert report["rows"] == report["evaluated"] == 6
    assert report["unusable"] == {}
    assert [s["row"] for s in report["samples"]] == [f"{data}:{i}" for i in range(1, 7)]
    assert report["samples"][0]["tokens"] > 0
    assert report["mean_logprob"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
    assert report["cross_entropy"] == pytest.approx(-sums / counts, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(-sums / counts), rel=1e-5)
    assert report["response_tokens"] == counts
    assert [s["s"] for s in report["samples"]] == pytest.approx(scores, rel=1e-5)
    assert report["exact_match"] is None and all(s["generation"] is None for s in report["samples"])

    out = tmp_path / "reports" / "report.json"
    write_report(report, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temporary file left


def _greedy(assets: Path, chats: list[dict[str, Any]]) -> list[str]:
    """Each chat's greedy answer to its last assistant turn, one prompt at a time, with transformers alone."""
    tok = AutoTokenizer.from_pretrained(assets / "target")
    model = AutoModelForCausalLM.from_pretrained(assets / "target").eval()
    answers = []
    for c in chats:
        msgs = c["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def test_exact_match_contains_and_a_user_checker(assets: Path, tmp_path: Path) -> None:
    chats = _chats(assets, 7)
    greedy = _greedy(assets, chats[:6])
    assert all(len(g.strip()) >= 3 for g in greedy), "the tiny model should say something"
    assert len(set(greedy)) > 1, "answers should differ between prompts"
    # Rows 0, 2, 4: the model's own answer; 1, 3: wrong; 5: a part of it (contains, not exact); 6: no answer.
    answers = [greedy[0], "wrong answer", greedy[2], "nope", greedy[4], greedy[5].strip()[:2]]
    records = [dict(c, answer=a, expect=i in (1, 3)) for i, (c, a) in enumerate(zip(chats, answers))]
    records.append(dict(chats[6], expect=False))
    data = _write_jsonl(tmp_path / "qa.jsonl", records)

    def run(check: str) -> dict[str, Any]:
        spec = _spec(assets, tmp_path, eval={"answer_field": "answer", "checker": check, "max_new_tokens": MAX_NEW})
        return evaluate_model(spec, assets / "target", data)

    exact = run("exact")
    assert [s["generation"] for s in exact["samples"][:6]] == greedy  # batched, left-padded: the same answers
    assert [s["correct"] for s in exact["samples"]] == [True, False, True, False, True, False, None]
    assert exact["exact_match"] == pytest.approx(3 / 6)
    assert exact["checked"] == 6 and exact["not_checked"] == {"no 'answer' field": 1}
    assert exact["evaluated"] == 7  # the row without an answer is still scored
    assert exact["samples"][1]["answer"] == "wrong answer" and exact["samples"][6]["answer"] is None

    assert run("contains")["exact_match"] == pytest.approx(4 / 6)
    custom = run("tests.test_evaluate:checker")
    assert [s["correct"] for s in custom["samples"][:6]] == [False, True, False, True, False, False]
    assert custom["exact_match"] == pytest.approx(2 / 6)


def test_without_data_the_rows_training_holds_out(assets: Path, tmp_path: Path) -> None:
    chats = [json.loads(line) for line in (assets / "data" / "train.jsonl").read_text().splitlines()]
    long_prompt = {"messages": [{"role": "user", "content": "What is 1 plus 2? " * 60}, chats[0]["messages"][1]]}
    # Unusable rows in the middle, so that held-out row numbers differ from usable-row positions.
    # A prompt of about 52 tokens: the target (96 tokens) can use it, the shorter aligned model (40) cannot.
    medium = {"messages": [{"role": "user", "content": "What is 1 plus 2? " * 6}, chats[0]["messages"][1]]}
    data = _write_jsonl(tmp_path / "train.jsonl", [*chats[:10], "{not json", long_prompt, medium, *chats[10:]])
    aligned = [
        {"name": "chatml", "path": str(assets / "aligned_chatml"), "max_length": 40},
        {"name": "zephyr", "path": str(assets / "aligned_zephyr")},
    ]
    spec = _spec(assets, tmp_path, aligned, data={"train_files": [str(data)], "eval_fraction": 0.25})
    report = evaluate_model(spec, assets / "target", None)

    # The selection training makes (prepare.build_schedule), on the rows every model can use.
    rows = load_rows(spec.data.sources, spec.seed)
    chat = {
        m: ChatTokenizer(AutoTokenizer.from_pretrained(assets / m), n)
        for m, n in (("target", 96), ("aligned_chatml", 40), ("aligned_zephyr", 96))
    }
    usable = tuple(i for i, r in enumerate(rows) if r.messages and all(c(r.messages)[0] for c in chat.values()))
    usable_by_target = [i for i, r in enumerate(rows) if r.messages and chat["target"](r.messages)[0]]
    assert len(usable_by_target) == len(rows) - 2
    assert len(usable) < len(usable_by_target), "want rows only an aligned model cannot use"
    lengths = [len(chat["target"](r.messages)[0].input_ids) if i in usable else 0 for i, r in enumerate(rows)]
    schedule, held_out, _ = build_schedule(spec, rows, usable, lengths)

    assert len(held_out) == round(0.25 * len(usable))
    assert not set(held_out) & set(schedule.usable)
    assert [s["row"] for s in report["samples"]] == [rows[i].where for i in held_out]
    assert report["evaluated"] == report["rows"] == len(held_out)
    assert "eval_fraction=0.25" in report["data"]


def test_unusable_rows_are_counted_not_fatal(assets: Path, tmp_path: Path) -> None:
    refusing = CHATML_TEMPLATE.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}",
    )
    chats = _chats(assets, 12)
    with_system = sum(c["messages"][0]["role"] == "system" for c in chats)
    assert 0 < with_system < len(chats)
    data = _write_jsonl(tmp_path / "eval.jsonl", [*chats, "{broken"])
    spec = _spec(assets, tmp_path, model={"chat_template": refusing})
    report = evaluate_model(spec, assets / "target", data)
    assert report["rows"] == 13
    assert report["evaluated"] == 12 - with_system
    assert report["unusable"] == {
        "chat template refused the row: no system turns": with_system,
        "malformed JSON (Expecting property name enclosed in double quotes)": 1,
    }
    assert report["unusable_examples"]["malformed JSON (Expecting property name enclosed in double quotes)"] == [
        f"{data}:13"
    ]
    assert math.isfinite(report["cross_entropy"])


def test_bad_checker_and_missing_hold_out_are_spec_errors(assets: Path, tmp_path: Path) -> None:
    for bad, why in [
        ("exactly", "neither 'exact', 'contains' nor 'module.path:function'"),
        ("no_such_module_poft:f", "cannot import module 'no_such_module_poft'"),
        ("tests.test_evaluate:no_such_function", "has no function 'no_such_function'"),
    ]:
        with pytest.raises(SpecError, match=r"eval\.checker: .*" + re.escape(why)):
            _spec(assets, tmp_path, eval={"checker": bad})
    spec = _spec(assets, tmp_path)
    with pytest.raises(SpecError, match=r"data\.eval_fraction"):
        evaluate_model(spec, assets / "target")
    with pytest.raises(SpecError, match="not a Hugging Face model folder"):
        evaluate_model(spec, tmp_path, tmp_path / "none.jsonl")
