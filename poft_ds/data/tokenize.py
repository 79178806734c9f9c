"""Tokenize into the cache: every row under one model, with the results kept by content."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from poft_ds import __version__
from poft_ds.data.chat import MASK_RULES, ChatTokenizer, TokenizedSample
from poft_ds.data.rows import Row
from poft_ds.files import atomic_write


@dataclass
class TokenizeReport:
    """Counts of samples a tokenizer could not use, by reason, with example rows."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)


def tokenize_rows(
    rows: list[Row], chat: ChatTokenizer, cache_dir: Path | None = None
) -> tuple[list[TokenizedSample | None], TokenizeReport]:
    """Tokenize every usable row; unusable ones become None and are counted by reason.

    With `cache_dir`, the result is kept under a hash of the rows' contents, the tokenizer's
    files, the template, max length and truncation, so a rerun does not tokenize again.
    """
    key = _cache_key(rows, chat) if cache_dir is not None else None
    results = _read_cache(cache_dir / f"{key}.parquet") if key else None
    if results is None or len(results) != len(rows):
        results = [chat(r.messages) if r.problem is None else (None, r.problem) for r in rows]
        if key:
            _write_cache(cache_dir / f"{key}.parquet", results)
    report = TokenizeReport()
    for row, (_, reason) in zip(rows, results):
        if reason is not None:
            report.add(reason, row.where)
    return [sample for sample, _ in results], report


def _cache_key(rows: list[Row], chat: ChatTokenizer) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update((json.dumps(r.messages, ensure_ascii=False) if r.messages else f"!{r.problem}").encode())
        h.update(b"\0")
    folder = Path(chat.tok.name_or_path)
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if f.is_file() and (
            f.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or f.suffix in (".model", ".jinja")
        ):
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    h.update(
        f"{chat.template}|{chat.max_length}|{chat.truncation}|{chat.prepend_bos}|{__version__}|{MASK_RULES}".encode()
    )
    return h.hexdigest()[:32]


def _read_cache(path: Path) -> list[tuple[TokenizedSample | None, str | None]] | None:
    try:
        table = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException):
        return None
    if "lost_response_tokens" not in table:
        return None
    return [
        (TokenizedSample(ids, mask, lost) if ids is not None else None, reason)
        for ids, mask, lost, reason in zip(
            table["input_ids"], table["response_mask"], table["lost_response_tokens"], table["reason"]
        )
    ]


def _write_cache(path: Path, results: list[tuple[TokenizedSample | None, str | None]]) -> None:
    table = pa.table(
        {
            "input_ids": [s.input_ids if s else None for s, _ in results],
            "response_mask": [s.response_mask if s else None for s, _ in results],
            "lost_response_tokens": [s.lost_response_tokens if s else None for s, _ in results],
            "reason": [reason for _, reason in results],
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes())
