"""`poft-ds bench data`: what the tokenized data costs each rank, on a large synthetic data set.

Writes `n_rows` synthetic chats (log-normal token counts, median `median_tokens`, like chat SFT
data) with a tiny local BPE tokenizer, tokenizes them through the real cached path
(`tokenize_rows` with a cache folder), then, in a fresh process that loads the data the way a
rank does (`load_rows`, `tokenize_rows`, the columns `prepare_data` keeps, the rows dropped),
measures the resident memory the data adds. It also measures tokenization rows/s with N
processes against one, and that the second load reads the cache without tokenizing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np


def _status() -> dict[str, int]:
    """This process's resident memory, in bytes: total, private (anonymous) and file-backed."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[fields[name]] = int(value.split()[0]) * 1024
    return out


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS, so RSS shows what is still in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build_tokenizer(folder: Path, words: list[str]) -> None:
    """A byte-level BPE tokenizer on which every made-up word is one or two tokens, ChatML template."""
    from transformers import PreTrainedTokenizerFast

    from poft_ds.tiny import CHATML_TEMPLATE, _bpe_tokenizer

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    corpus = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)] * 20 + ["system user assistant"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(corpus, 4 * len(words), specials),
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(folder)


def _write_rows(path: Path, n_rows: int, words: list[str], median_tokens: int, sigma: float, seed: int) -> None:
    """Chats of about `length` words each (log-normal), 30% prompt, 70% response, a third multi-turn."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(median_tokens), sigma, n_rows)), 32, 3500).astype(int)
    vocab = np.array(words)
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            text = vocab[rng.integers(len(vocab), size=n)]
            turns = 2 if i % 3 == 0 else 1
            msgs, at = [], 0
            for t in range(turns):
                end = n * (t + 1) // turns
                cut = at + (end - at) * 3 // 10
                msgs.append({"role": "user", "content": " ".join(text[at:cut])})
                msgs.append({"role": "assistant", "content": " ".join(text[cut:end])})
                at = end
            f.write(json.dumps({"messages": msgs}) + "\n")


def _rank_load(config: dict[str, Any]) -> dict[str, Any]:
    """Load the data the way a rank does and measure what it adds (run in a fresh process)."""
    from transformers import AutoTokenizer

    from poft_ds.data.chat import ChatTokenizer
    from poft_ds.data.prepare import OptionalFloats, RowPlaces
    from poft_ds.data.rows import load_rows
    from poft_ds.data.tokenize import tokenize_rows

    class Counting(ChatTokenizer):
        calls = 0

        def __call__(self, messages):
            Counting.calls += 1
            return super().__call__(messages)

    chat = Counting(AutoTokenizer.from_pretrained(config["tokenizer"]), config["max_length"])
    # Code is not data: a first load of a few rows imports and initializes everything the path uses.
    # (From a file of its own: loading every row here would leave freed memory for the measured load to reuse.)
    with open(config["data"]) as f:
        head = [next(f) for _ in range(16)]
    warm_file = Path(config["cache"]) / "warm-up.jsonl"
    warm_file.write_text("".join(head))
    warm = load_rows([str(warm_file)])
    warm_samples, _ = tokenize_rows(warm, chat, Path(config["cache"]) / "warm-up")
    (warm_samples[0], warm_samples.lengths(), RowPlaces(warm), OptionalFloats([None], 1), list(warm_samples.keys))
    del warm, warm_samples
    Counting.calls = 0
    _release_freed_memory()
    before = _status()
    t0 = time.perf_counter()
    rows = load_rows([config["data"]])
    t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples, report = tokenize_rows(rows, chat, Path(config["cache"]))
    t_cache = time.perf_counter() - t0
    # What prepare_data keeps; the rows themselves are dropped when it returns.
    kept = (
        samples,
        samples.lengths(),
        RowPlaces(rows),
        samples.keys,
        OptionalFloats((r.ref_score for r in rows), len(rows)),
    )
    during = _status()
    del rows, report
    _release_freed_memory()
    after = _status()
    # A training step reads a few samples: materialize some, as a rank does.
    some = [kept[0][i] for i in range(0, len(kept[0]), max(1, len(kept[0]) // 64))]
    read_samples = _status()
    fingerprint = sum(len(kept[3][i] or "") for i in range(len(kept[3])))  # every key, as `fingerprint` does
    touched = _status()
    return {
        "tokenizer_calls": Counting.calls,
        "load_rows_s": round(t_rows, 2),
        "open_cache_s": round(t_cache, 2),
        "before": before,
        "with_rows": during,
        "after": after,
        "after_reading_64_samples": read_samples,
        "after_reading_64_samples_and_every_key": touched,
        "kept_numpy_bytes": int(kept[1].nbytes + kept[2].file.nbytes + kept[2].line.nbytes + kept[4].values.nbytes),
        "check": len(some) + (fingerprint > 0),
    }


def _rate(rows: list, chat: Any, procs: int) -> float:
    from poft_ds.data.tokenize import tokenize_rows

    t0 = time.perf_counter()
    tokenize_rows(rows, chat, procs=procs)
    return len(rows) / (time.perf_counter() - t0)


def data_bench(
    n_rows: int = 200_000,
    median_tokens: int = 800,
    sigma: float = 0.7,
    max_length: int = 4096,
    procs: int | None = None,
    rate_rows: int = 2000,
    seed: int = 0,
    work: str | None = None,
) -> dict[str, Any]:
    """Build, tokenize and load a synthetic data set; return the measurements, JSON-ready.

    Args:
        n_rows: Conversations.
        median_tokens: Median tokens of a conversation (log-normal, `sigma`).
        sigma: Spread of the log-normal lengths.
        max_length: The model's max_length (above the longest conversation: nothing is cut).
        procs: Tokenizing processes (default `default_procs()`).
        rate_rows: Rows of the sample tokenized with one and with `procs` processes.
        seed: Seed of the data.
        work: Folder for the data, tokenizer and cache, kept after (default a temporary one, removed after).
    """
    from transformers import AutoTokenizer

    from poft_ds.data.chat import ChatTokenizer
    from poft_ds.data.rows import load_rows
    from poft_ds.data.tokenize import default_procs, tokenize_rows

    procs = procs or default_procs()
    # Each process tokenizes one row at a time: the Rust tokenizer's own threads only compete with them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.ExitStack() as stack:
        tmp = Path(work) if work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tmp.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + 1)
        letters = list("abcdefghijklmnopqrstuvwxyz")
        words = sorted({"".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(600)})
        _build_tokenizer(tmp / "tokenizer", words)
        t0 = time.perf_counter()
        _write_rows(tmp / "train.jsonl", n_rows, words, median_tokens, sigma, seed)
        t_write = time.perf_counter() - t0
        chat = ChatTokenizer(AutoTokenizer.from_pretrained(tmp / "tokenizer"), max_length)

        rows = load_rows([str(tmp / "train.jsonl")])
        sample = rows[:rate_rows]
        one, many = _rate(sample, chat, 1), _rate(sample, chat, procs)
        # The old layout for comparison: a Python list of TokenizedSample per rank.
        tracemalloc.start()
        as_lists = [chat(r.messages)[0] for r in sample[:500]]
        list_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        list_tokens = sum(len(s.input_ids) for s in as_lists)
        del as_lists

        t0 = time.perf_counter()
        samples, _ = tokenize_rows(rows, chat, tmp / "cache", procs=procs)
        t_first = time.perf_counter() - t0
        lengths = samples.lengths()
        usable, tokens = int((lengths > 0).sum()), int(lengths.sum())
        del samples, rows, sample
        (entry,) = [p for p in (tmp / "cache").iterdir() if p.is_dir()]  # before the rank's warm-up entry
        arrow_bytes = sum(f.stat().st_size for f in entry.glob("*.arrow"))
        entry_bytes = sum(f.stat().st_size for f in entry.iterdir())

        config = {"tokenizer": str(tmp / "tokenizer"), "data": str(tmp / "train.jsonl"), "cache": str(tmp / "cache")}
        config["max_length"] = max_length
        proc = subprocess.run(
            [sys.executable, "-m", "poft_ds.bench.data", json.dumps(config)],
            capture_output=True,
            text=True,
            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the rank-load process failed:\n{proc.stderr[-4000:]}")
        rank = json.loads(proc.stdout.strip().splitlines()[-1])

    added = rank["after"]["rss"] - rank["before"]["rss"]
    return {
        "config": {
            "n_rows": n_rows,
            "median_tokens": median_tokens,
            "sigma": sigma,
            "max_length": max_length,
            "procs": procs,
            "rate_rows": rate_rows,
            "seed": seed,
            "cpus": len(os.sched_getaffinity(0)),
        },
        "data": {"usable_rows": usable, "tokens": tokens, "mean_tokens": tokens / max(usable, 1)},
        "write_jsonl_s": round(t_write, 1),
        "tokenize": {
            "first_build_s": round(t_first, 1),
            "first_build_rows_per_s": round(n_rows / t_first, 1),
            "rows_per_s_1_proc": round(one, 1),
            f"rows_per_s_{procs}_procs": round(many, 1),
            "speedup": round(many / one, 2),
        },
        "cache": {
            "arrow_bytes": arrow_bytes,
            "entry_bytes": entry_bytes,
            "arrow_bytes_per_token": round(arrow_bytes / tokens, 3),
            "python_lists_bytes_per_token": round(list_bytes / list_tokens, 1),
        },
        "rank": {
            **rank,
            "added_rss_bytes": added,
            "added_rss_anon_bytes": rank["after"]["rss_anon"] - rank["before"]["rss_anon"],
            "added_rss_file_bytes": rank["after"]["rss_file"] - rank["before"]["rss_file"],
            "added_rss_over_arrow_bytes": round(added / arrow_bytes, 4),
        },
        "second_load": {
            "tokenized": rank["tokenizer_calls"] > 0,
            "load_rows_s": rank["load_rows_s"],
            "open_cache_s": rank["open_cache_s"],
        },
        "acceptance": {
            "added_rss_under_10pct_of_arrow": added < 0.1 * arrow_bytes,
            "second_load_without_tokenizing": rank["tokenizer_calls"] == 0,
        },
    }


if __name__ == "__main__":
    print(json.dumps(_rank_load(json.loads(sys.argv[1]))))
