"""The noisy-SFT example's builder (examples/noisy_sft/build.py): data only, no training run.

The held-out facts are the training facts asked again with the correct answer (the task is memorization:
an unseen fact cannot be answered), so "disjoint" here means: no held-out row is a training row (ids
differ), every held-out row is clean, and the valid and test halves share no fact.
"""

from __future__ import annotations

import importlib.util
import string
from collections import Counter
from pathlib import Path

import pytest

BUILD = Path(__file__).resolve().parent.parent / "examples" / "noisy_sft" / "build.py"


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("noisy_sft_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _solve(question: str) -> str:
    """The correct answer, recomputed from the question's words independently of the builder."""
    words = question.rstrip("?.").split()
    if question.startswith("What is"):
        assert words[3] == "plus"
        return str(int(words[2]) + int(words[4]))
    if question.startswith("Which letter comes after"):
        return string.ascii_lowercase[string.ascii_lowercase.index(words[-1]) + 1]
    if question.startswith("Reverse the word"):
        return words[-1][::-1]
    raise AssertionError(f"unknown question: {question}")


def _qa(row: dict) -> tuple[str, str]:
    (user, assistant) = row["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


def test_deterministic_for_a_seed(build):
    assert build.build_data(seed=3) == build.build_data(seed=3)
    assert build.build_data(seed=3)["train"] != build.build_data(seed=4)["train"]


def test_corruption_fraction_kinds_and_correctness(build):
    data = build.build_data(seed=0, corruption_rate=0.4)
    train = data["train"]
    n_facts = len({r["key"] for r in train})
    assert n_facts == 100 + 25 + 40
    assert len(train) == 3 * n_facts
    corrupted = [r for r in train if r["corrupted"]]
    assert len(corrupted) == round(0.4 * len(train))
    for r in train:
        question, response = _qa(r)
        assert r["answer"] == _solve(question)
        if r["corrupted"]:
            assert response != _solve(question), r
            assert r["corruption"] in {"near_miss", "swapped", "unreversed"}
        else:
            assert response == _solve(question) and r["corruption"] is None, r
    kinds = Counter(r["corruption"] for r in corrupted)
    assert set(kinds) == {"near_miss", "swapped", "unreversed"}, kinds
    # near_miss answers are one off (add) or two letters on (letter); unreversed is the word itself.
    for r in corrupted:
        question, response = _qa(r)
        if r["corruption"] == "near_miss" and r["task"] == "add":
            assert abs(int(response) - int(r["answer"])) == 1
        if r["corruption"] == "unreversed":
            assert response == question.rstrip(".").split()[-1]
    # Systematic noise: every corrupted copy of a fact carries the same wrong answer.
    wrong: dict[str, set[str]] = {}
    for r in corrupted:
        wrong.setdefault(r["key"], set()).add(_qa(r)[1])
    assert all(len(v) == 1 for v in wrong.values())


def test_heldout_and_aligned_data_are_clean(build):
    data = build.build_data(seed=0)
    train_ids = {r["id"] for r in data["train"]}
    for name in ("heldout", "aligned"):
        for r in data[name]:
            question, response = _qa(r)
            assert response == r["answer"] == _solve(question), (name, r)
            assert r["id"] not in train_ids
    heldout = data["heldout"]
    assert len({r["key"] for r in heldout}) == len(heldout) == 165
    splits = Counter(r["split"] for r in heldout)
    assert set(splits) == {"valid", "test"} and abs(splits["valid"] - splits["test"]) <= 1
    assert {r["key"] for r in data["aligned"]} == {r["key"] for r in heldout} == {r["key"] for r in data["train"]}


def test_bad_corruption_rate_is_refused(build):
    with pytest.raises(ValueError, match="corruption_rate"):
        build.build_data(corruption_rate=1.0)


def test_both_tokenizers_render_every_row(build):
    data = build.build_data(seed=0)
    tok_a, tok_b = build.tokenizers(data["aligned"])
    assert tok_a.get_vocab() != tok_b.get_vocab()
    rows = data["train"] + data["heldout"]
    for tok, marker, end in ((tok_a, "<|im_start|>assistant\n", "<|im_end|>"), (tok_b, "<|assistant|>\n", "</s>")):
        for r in rows:
            text = tok.apply_chat_template(r["messages"], tokenize=False)
            question, response = _qa(r)
            assert question in text and marker + response + end in text, text
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id is None or tok.unk_token_id not in ids, text
            assert tok.decode(ids) == text


def test_readmes_show_the_table_the_script_wrote():
    """The results table in README.md and in the example's README is the one in results.md, which
    run.py wrote (copied from its work folder), and results.json says the same."""
    import json

    root = Path(__file__).resolve().parent.parent
    results = (root / "examples" / "noisy_sft" / "results.md").read_text()
    table = next(block for block in results.split("\n\n") if block.startswith("| seed | method | best lr"))
    assert table in (root / "README.md").read_text()
    assert table in (root / "examples" / "noisy_sft" / "README.md").read_text()
    best = json.loads((root / "examples" / "noisy_sft" / "results.json").read_text())
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert len(rows) == 4  # 2 seeds x (sft, poft)
    for cells in rows:
        seed, method, lr, test_em, test_logprob = (c.strip() for c in cells[:5])
        run = best["best"][seed][method]
        assert float(lr) == run["lr"]
        assert f"{run['test']['exact_match']:.3f}" == test_em
        assert f"{run['test']['mean_logprob']:.3f}" == test_logprob
