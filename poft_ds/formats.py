"""Reading training rows from files in the formats users have, as chat `messages`.

Formats (`data.train_files[].format`, or `auto` to detect from the first row):

  * `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
    (OpenAI / UltraChat-200k style);
  * `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`;
  * `alpaca`: `{"instruction": str, "input": str (optional), "output": str}`;
  * `prompt_completion`: `{"prompt": str, "completion": str}`.

`columns` renames a format's fields (e.g. `{messages: chat}` reads the `chat` column). Files are
JSONL, JSON (a list of rows), parquet or arrow. A row that cannot be used keeps its place with the
reason (malformed JSON, undecodable bytes, missing roles, empty response, duplicate id...), so
nothing is dropped silently and every problem names its file and line.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion", "system"),
}


class DataError(ValueError):
    """Unusable data, named by file and row."""


@dataclass
class Row:
    """One conversation and where it came from.

    Attributes:
        source: The file it was read from.
        line: Its line (JSONL) or row number (1-based).
        messages: The conversation, or None when the row is unusable.
        problem: Why the row is unusable, or None.
        id: The row's `id` field when it has one.
        ref_score: A precomputed reference score, when the data carries one.
    """

    source: str
    line: int
    messages: list[dict[str, str]] | None
    problem: str | None = None
    id: str | None = None
    ref_score: float | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _read_records(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line or row number, record, problem) for every row of a JSONL, JSON, parquet or arrow file."""
    if path.suffix in (".parquet", ".arrow"):
        import datasets

        ds = (
            datasets.Dataset.from_parquet(str(path))
            if path.suffix == ".parquet"
            else datasets.Dataset.from_file(str(path))
        )
        return [(i + 1, rec, None) for i, rec in enumerate(ds)]
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid UTF-8 JSON: {e}") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file holds a list of rows, got {type(records).__name__}")
        return [(i + 1, rec, None) for i, rec in enumerate(records)]
    out = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out.append((i, json.loads(raw.decode("utf-8")), None))
        except UnicodeDecodeError:
            out.append((i, None, "undecodable (not UTF-8)"))
        except json.JSONDecodeError as e:
            out.append((i, None, f"malformed JSON ({e.msg})"))
    return out


def detect_format(rec: Any) -> str | None:
    """The format a record looks like, or None."""
    if not isinstance(rec, dict):
        return None
    for fmt, key in (
        ("messages", "messages"),
        ("sharegpt", "conversations"),
        ("alpaca", "instruction"),
        ("prompt_completion", "prompt"),
    ):
        if key in rec:
            return fmt
    return None


def to_messages(rec: Any, fmt: str, columns: dict[str, str]) -> tuple[list[dict[str, str]] | None, str | None]:
    """Convert one record to chat messages.

    Returns:
        (messages, None), or (None, reason) when the record cannot be used.
    """
    col = {f: columns.get(f, f) for f in FIELDS[fmt]}
    if not isinstance(rec, dict):
        return None, "row is not a JSON object"
    if fmt in ("messages", "sharegpt"):
        key = col["messages" if fmt == "messages" else "conversations"]
        turns = rec.get(key)
        if not isinstance(turns, list) or not turns:
            return None, f"no '{key}' list"
        msgs = []
        for t in turns:
            if fmt == "sharegpt":
                role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
                content = t.get("value") if isinstance(t, dict) else None
            else:
                role = t.get("role") if isinstance(t, dict) else None
                content = t.get("content") if isinstance(t, dict) else None
            if role not in ROLES or not isinstance(content, str):
                return None, "malformed roles"
            msgs.append({"role": role, "content": content})
    else:
        user_key, out_key = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
        prompt, response = rec.get(col[user_key]), rec.get(col[out_key])
        if not isinstance(prompt, str) or not isinstance(response, str):
            return None, f"'{col[user_key]}' and '{col[out_key]}' must be strings"
        extra = rec.get(col["input"]) if fmt == "alpaca" else None
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        msgs = []
        system = rec.get(col["system"])
        if isinstance(system, str) and system.strip():
            msgs.append({"role": "system", "content": system})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if not any(m["role"] == "assistant" for m in msgs):
        return None, "no assistant turn"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return None, "empty response"
    return msgs, None


def read_source(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None, score_column: str | None = None
) -> list[Row]:
    """Every row of one file, usable or not, in file order.

    Raises:
        DataError: when the file cannot be read at all or its format cannot be detected.
    """
    columns = columns or {}
    p = Path(path)
    try:
        records = _read_records(p)
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e}") from e
    if fmt == "auto":
        detected = next((detect_format(r) for _, r, problem in records if problem is None and detect_format(r)), None)
        if detected is None:
            raise DataError(f"{p}: cannot detect the data format; set format in data.train_files")
        fmt = detected
    rows = []
    for line, rec, problem in records:
        msgs = None
        if problem is None:
            msgs, problem = to_messages(rec, fmt, columns)
        rid = rec.get(columns.get("id", "id")) if isinstance(rec, dict) else None
        score = None
        if score_column and problem is None:
            score = rec.get(score_column)
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                msgs, problem, score = None, f"no finite '{score_column}' score", None
        rows.append(Row(str(p), line, msgs, problem, str(rid) if rid is not None else None, score))
    return rows


def mark_duplicate_ids(rows: list[Row]) -> None:
    """Mark every row whose `id` was already seen (in any file) as unusable."""
    first: dict[str, str] = {}
    for r in rows:
        if r.id is None:
            continue
        if r.id in first:
            if r.problem is None:
                r.messages, r.problem = None, "duplicate id"
        else:
            first[r.id] = r.where


def apply_weight(rows: list[Row], weight: float, seed: int) -> list[Row]:
    """Repeat a source's rows `weight` times: whole copies, then a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(rows, round(frac * len(rows))) if frac else []
    return rows * whole + sorted(extra, key=lambda r: r.line)


def load_rows(sources: list[Any], seed: int = 0, score_column: str | None = None) -> list[Row]:
    """Read every source of a job (paths, or `SourceSpec`s with format, columns and weight).

    Duplicate ids are checked over all sources before weighting; a weighted source's rows
    appear `weight` times (the fractional part as a seeded sample).
    """
    read = []
    for src in sources:
        if isinstance(src, str):
            read.append((read_source(src, score_column=score_column), 1.0))
        else:
            read.append((read_source(src.path, src.format, src.columns, score_column), src.weight))
    mark_duplicate_ids([r for rows, _ in read for r in rows])
    out: list[Row] = []
    for i, (rows, weight) in enumerate(read):
        out += rows if weight == 1.0 else apply_weight(rows, weight, seed + i)
    return out
