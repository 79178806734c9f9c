"""The tokenized cache: Arrow entries every rank maps, built by one process, rebuilt when damaged."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from poft_ds.data.chat import ChatTokenizer
from poft_ds.data.rows import Row, load_rows
from poft_ds.data.tokenize import MANIFEST, tokenize_rows
from poft_ds.score_store import sample_key


class Counting(ChatTokenizer):
    """A chat tokenizer that counts the conversations it tokenizes (in this process)."""

    calls = 0

    def __call__(self, messages):
        Counting.calls += 1
        return super().__call__(messages)


@pytest.fixture
def rows(assets: Path) -> list[Row]:
    rows = load_rows([str(assets / "data" / "train.jsonl")])
    rows[5].messages, rows[5].problem = None, "no assistant turn"
    return rows


@pytest.fixture
def chat(assets: Path) -> Counting:
    Counting.calls = 0
    # Short enough that some responses are cut: lost tokens must survive the cache too.
    return Counting(AutoTokenizer.from_pretrained(assets / "target"), max_length=40)


def _expected(rows: list[Row], chat: ChatTokenizer) -> list:
    """Every row tokenized one by one, in memory, as the cache must give it back."""
    return [chat(r.messages)[0] if r.problem is None else None for r in rows]


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


def test_mapped_samples_equal_in_memory_tokenization(rows: list[Row], chat: Counting, tmp_path: Path) -> None:
    expected = _expected(rows, chat)
    assert any(s and s.lost_response_tokens for s in expected) and expected[5] is None
    tokenize_rows(rows, chat, tmp_path)
    allocated = pa.total_allocated_bytes()
    samples, report = tokenize_rows(rows, chat, tmp_path)
    # The token columns are mapped from the file, not read into Arrow's memory.
    arrow_bytes = sum(f.stat().st_size for f in _entry(tmp_path).glob("*.arrow"))
    assert pa.total_allocated_bytes() - allocated < arrow_bytes / 4
    assert len(samples) == len(rows)
    for i, want in enumerate(expected):
        assert samples[i] == want, i
    assert list(samples) == expected and samples[-3:] == expected[-3:]
    assert samples.lengths().tolist() == [len(s.input_ids) if s else 0 for s in expected]
    assert samples.lost_response_tokens().tolist() == [s.lost_response_tokens if s else 0 for s in expected]
    assert samples.scored_tokens().tolist() == [sum(s.response_mask[1:]) if s else 0 for s in expected]
    assert list(samples.keys) == [sample_key(r.messages) if r.messages else None for r in rows]
    assert report.counts == {"no assistant turn": 1} and report.examples == {"no assistant turn": [rows[5].where]}


def test_a_second_call_reads_the_cache_without_tokenizing(rows: list[Row], chat: Counting, tmp_path: Path) -> None:
    first, _ = tokenize_rows(rows, chat, tmp_path)
    assert Counting.calls == len(rows) - 1
    again, report = tokenize_rows(rows, chat, tmp_path)
    assert Counting.calls == len(rows) - 1
    assert again == first and report.counts == {"no assistant turn": 1}
    longer = Counting(chat.tok, max_length=96)
    tokenize_rows(rows, longer, tmp_path)  # another max length: another entry
    assert Counting.calls == 2 * (len(rows) - 1)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_parallel_tokenization_equals_serial(rows: list[Row], chat: Counting, tmp_path: Path) -> None:
    expected = _expected(rows, chat)
    parallel, report = tokenize_rows(rows, chat, tmp_path, procs=2)
    assert parallel == expected and report.counts == {"no assistant turn": 1}
    in_memory, _ = tokenize_rows(rows, chat, procs=2)
    assert in_memory == expected


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "no manifest"])
def test_a_damaged_entry_is_rebuilt(damage: str, rows: list[Row], chat: Counting, tmp_path: Path) -> None:
    expected = _expected(rows, chat)
    tokenize_rows(rows, chat, tmp_path)
    entry = _entry(tmp_path)
    (data,) = entry.glob("*.arrow")
    raw = data.read_bytes()
    if damage == "truncated":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "overwritten":
        data.write_bytes(b"\xff" * len(raw))
    else:  # a build that died before its last write
        (entry / MANIFEST).unlink()
    Counting.calls = 0
    samples, _ = tokenize_rows(rows, chat, tmp_path)
    assert Counting.calls == len(rows) - 1
    assert samples == expected
    assert json.loads((entry / MANIFEST).read_text())["rows"] == len(rows)


def _tokenize_in_child(rows: list[Row], chat: Counting, cache: Path, calls: mp.Queue) -> None:
    Counting.calls = 0
    samples, _ = tokenize_rows(rows, chat, cache)
    calls.put((Counting.calls, len(samples)))


def test_processes_sharing_a_cache_tokenize_once(rows: list[Row], chat: Counting, tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    calls = ctx.Queue()
    procs = [ctx.Process(target=_tokenize_in_child, args=(rows, chat, tmp_path, calls)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted(calls.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [(0, len(rows)), (0, len(rows)), (len(rows) - 1, len(rows))]
