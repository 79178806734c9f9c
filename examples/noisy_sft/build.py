"""Build the noisy-SFT example's assets (offline, deterministic): python build.py [folder] [--seed N].

A synthetic instruction task with checkable one-word answers, three task types:

  * add:     "What is 3 plus 5?"            -> "8"    (single digits: 100 facts)
  * letter:  "Which letter comes after d?"  -> "e"    (a..y: 25 facts)
  * reverse: "Reverse the word cat."        -> "tac"  (40 words: 40 facts)

Files written under `folder` (default ../../runs/noisy_sft/assets):

  * `data/aligned.jsonl`  clean conversations (every fact, `ALIGNED_COPIES` times) on which the two
                          aligned models are trained first, through poft-ds's own SFT;
  * `data/train.jsonl`    every fact `TRAIN_COPIES` times, a `corruption_rate` share of the rows
                          (exactly that many, seeded) with a wrong answer; each row holds `answer`
                          (the correct one), `corrupted` and `corruption` (its kind, or null);
  * `data/heldout.jsonl`  every fact once, clean, each row's `split` `valid` or `test` (half the facts
                          each, seeded): the learning rate is picked on `valid`, results are on `test`;
  * `target/`             a random tiny Llama, BPE tokenizer A, ChatML template;
  * `aligned_a_init/`     a random tiny Llama on tokenizer A and ChatML (trained into aligned model A);
  * `aligned_b_init/`     a random tiny Llama on a different tokenizer B with the zephyr template.

The noise is systematic, as real label noise is: each fact has ONE wrong answer, the same in
every corrupted copy, so with three copies a fact is corrupted in most of its copies about a third
of the time and majority voting over copies cannot wash the noise out. Corruption kinds: `near_miss`
(add: the sum off by one; letter: the letter two after), `swapped` (another fact's answer of the
same task type) and `unreversed` (reverse: the word itself).

The held-out facts are the training facts (this is a memorization task; a fact never seen cannot
be answered), asked in the same words but always with the correct answer: the test measures
whether a method learned the right fact despite the noisy copies.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from poft_ds.files import atomic_write
from poft_ds.tiny import CHATML_TEMPLATE, ZEPHYR_TEMPLATE, _bpe_tokenizer, _save, _tiny_llama

HERE = Path(__file__).resolve().parent
DEFAULT_FOLDER = HERE.parent.parent / "runs" / "noisy_sft" / "assets"

# Non-palindromes of 3-4 letters, so "unreversed" is always a wrong answer.
WORDS = [
    "cat",
    "dog",
    "sun",
    "map",
    "pen",
    "cup",
    "box",
    "hat",
    "jam",
    "leg",
    "net",
    "owl",
    "pig",
    "rat",
    "toy",
    "van",
    "web",
    "yak",
    "zip",
    "bus",
    "fish",
    "bird",
    "lamp",
    "desk",
    "milk",
    "frog",
    "star",
    "moon",
    "tree",
    "rock",
    "sand",
    "wind",
    "coat",
    "ship",
    "drum",
    "gold",
    "salt",
    "corn",
    "wolf",
    "king",
]
TRAIN_COPIES = 3
ALIGNED_COPIES = 2
CORRUPTION_RATE = 0.4


def facts() -> list[dict[str, str]]:
    """Every fact of the task, in a fixed order: `task`, `key` (unique), `question`, `answer`."""
    out = []
    for a in range(10):
        for b in range(10):
            out.append(
                {"task": "add", "key": f"add:{a}+{b}", "question": f"What is {a} plus {b}?", "answer": f"{a + b}"}
            )
    for c in string.ascii_lowercase[:-1]:
        nxt = chr(ord(c) + 1)
        out.append(
            {"task": "letter", "key": f"letter:{c}", "question": f"Which letter comes after {c}?", "answer": nxt}
        )
    for w in WORDS:
        out.append({"task": "reverse", "key": f"reverse:{w}", "question": f"Reverse the word {w}.", "answer": w[::-1]})
    return out


def _near_miss(fact: dict[str, str], rng: random.Random) -> str:
    if fact["task"] == "add":
        total = int(fact["answer"])
        return str(total + 1 if total == 0 else total + rng.choice((-1, 1)))
    # letter: the letter two after (z wraps to a, never the right answer)
    return chr((ord(fact["answer"]) - ord("a") + 1) % 26 + ord("a"))


def wrong_answers(all_facts: list[dict[str, str]], seed: int) -> dict[str, tuple[str, str]]:
    """Per fact key, its one (kind, wrong answer): fixed, so every corrupted copy of a fact agrees."""
    rng = random.Random(seed * 7919 + 1)
    by_task: dict[str, list[str]] = {}
    for f in all_facts:
        by_task.setdefault(f["task"], []).append(f["answer"])
    out = {}
    for f in all_facts:
        kinds = ["near_miss", "swapped"] if f["task"] != "reverse" else ["unreversed", "swapped"]
        kind = rng.choice(kinds)
        if kind == "near_miss":
            wrong = _near_miss(f, rng)
        elif kind == "unreversed":
            wrong = f["answer"][::-1]
        else:
            wrong = rng.choice([a for a in by_task[f["task"]] if a != f["answer"]])
        out[f["key"]] = (kind, wrong)
    return out


def _llama(vocab_size: int, seed: int, bos: int, eos: int, pad: int) -> LlamaForCausalLM:
    """A random tiny Llama: twice the width of poft_ds.tiny's (64 wide could not memorize the 165 facts in
    300 steps: about 10% exact match), still a tiny fraction of a step's cost on a CPU."""
    return _tiny_llama(
        vocab_size, seed, bos, eos, pad, hidden_size=128, intermediate_size=256, max_position_embeddings=128
    )


def _row(fact: dict[str, str], idx: str, response: str, **extra: object) -> dict:
    return {
        "id": idx,
        "messages": [{"role": "user", "content": fact["question"]}, {"role": "assistant", "content": response}],
        "task": fact["task"],
        "key": fact["key"],
        "answer": fact["answer"],
        **extra,
    }


def build_data(seed: int = 0, corruption_rate: float = CORRUPTION_RATE) -> dict[str, list[dict]]:
    """The example's data sets, deterministic for a seed: `aligned`, `train`, `heldout` (see module docstring).

    Args:
        seed: Seeds the corruption choice, the wrong answers, the row order and the valid/test split.
        corruption_rate: Share of training rows with a wrong answer (exactly round(rate * rows)).

    Returns:
        The rows of each data set.
    """
    if not 0.0 <= corruption_rate < 1.0:
        raise ValueError(f"corruption_rate: {corruption_rate} is not in [0, 1)")
    rng = random.Random(seed)
    all_facts = facts()
    wrong = wrong_answers(all_facts, seed)

    train_facts = [f for f in all_facts for _ in range(TRAIN_COPIES)]
    rng.shuffle(train_facts)
    corrupted = set(rng.sample(range(len(train_facts)), round(corruption_rate * len(train_facts))))
    train = []
    for i, f in enumerate(train_facts):
        kind, bad = wrong[f["key"]] if i in corrupted else (None, f["answer"])
        train.append(_row(f, f"train-{i:04d}", bad, corrupted=i in corrupted, corruption=kind))

    aligned_facts = [f for f in all_facts for _ in range(ALIGNED_COPIES)]
    rng.shuffle(aligned_facts)
    aligned = [_row(f, f"aligned-{i:04d}", f["answer"]) for i, f in enumerate(aligned_facts)]

    order = list(range(len(all_facts)))
    rng.shuffle(order)
    valid = set(order[: len(order) // 2])
    heldout = [
        _row(f, f"heldout-{i:04d}", f["answer"], split="valid" if i in valid else "test")
        for i, f in enumerate(all_facts)
    ]
    return {"aligned": aligned, "train": train, "heldout": heldout}


def tokenizers(rows: list[dict]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """Tokenizer A (target and aligned model A, ChatML) and a different tokenizer B (zephyr), trained on `rows`."""
    corpus = [m["content"] for r in rows for m in r["messages"]] + [f["answer"] for f in facts()]
    corpus += [w for w in WORDS] + ["system user assistant"]
    tok_a = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(corpus, 400, ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]),
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok_a.chat_template = CHATML_TEMPLATE
    tok_b = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(
            corpus, 300, ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
        ),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok_b.chat_template = ZEPHYR_TEMPLATE
    return tok_a, tok_b


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def build(folder: str | Path = DEFAULT_FOLDER, seed: int = 0, corruption_rate: float = CORRUPTION_RATE) -> Path:
    """Write the data, tokenizers and random initial models under `folder` (see the module docstring).

    Args:
        folder: Output folder.
        seed: Seed for the data, tokenizers' data and initial weights.
        corruption_rate: Share of training rows with a wrong answer.

    Returns:
        The folder.
    """
    folder = Path(folder)
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per model is noise on the console
    data = build_data(seed, corruption_rate)
    for name, rows in data.items():
        _write_jsonl(folder / "data" / f"{name}.jsonl", rows)
    tok_a, tok_b = tokenizers(data["aligned"])

    def ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}

    torch.set_num_threads(1)
    _save(folder / "target", _llama(len(tok_a), seed + 1, **ids(tok_a)), tok_a)
    _save(folder / "aligned_a_init", _llama(len(tok_a), seed + 2, **ids(tok_a)), tok_a)
    _save(folder / "aligned_b_init", _llama(len(tok_b), seed + 3, **ids(tok_b)), tok_b)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corruption-rate", type=float, default=CORRUPTION_RATE)
    args = parser.parse_args()
    print(f"noisy-SFT assets written to {build(args.folder, args.seed, args.corruption_rate)}")


if __name__ == "__main__":
    main()
