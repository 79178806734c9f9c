"""Reading training rows from files in the formats users have, as chat `messages`.

Formats (`data.train_files[].format`, or `auto` to detect each row's own format):

  * `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
    (OpenAI / UltraChat-200k style);
  * `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`;
  * `alpaca`: `{"instruction": str, "input": str (optional), "output": str}`;
  * `prompt_completion`: `{"prompt": str, "completion": str}`.

`columns` renames a format's fields (e.g. `{messages: chat}` reads the `chat` column). Files are
JSONL, JSON (a list of rows), parquet or arrow. A row that cannot be used keeps its place with the
reason (malformed JSON, undecodable bytes, which turn has which bad field, empty response,
duplicate id...), so nothing is dropped silently and every problem names its file and line.
Reasons are short categories (they are counted), never the row's own text. A UTF-8 byte-order
mark is accepted; OpenAI content-part lists are read when every part is text.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poft_ds.spec import JobSpec

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
    # Preference pairs: UltraFeedback-binarized (`chosen`/`rejected` full conversations) or TRL's
    # prompt/chosen/rejected (strings, or message lists continuing the prompt).
    "preference": ("prompt", "chosen", "rejected", "system"),
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
        rejected: A preference row's rejected conversation (`messages` is the chosen one).
    """

    source: str
    line: int
    messages: list[dict[str, str]] | None
    problem: str | None = None
    id: str | None = None
    ref_score: float | None = None
    rejected: list[dict[str, str]] | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_records(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line or row number, record, problem) for every row of a JSONL, JSON, CSV/TSV, parquet or arrow file.

    CSV rows are numbered by their line in the file when no cell spans lines (the header is line 1).
    """
    if path.suffix in (".csv", ".tsv"):
        import datasets

        try:
            ds = datasets.Dataset.from_csv(str(path), sep="\t" if path.suffix == ".tsv" else ",")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable {path.suffix[1:].upper()} file: {e}") from e
        return [(i + 2, rec, None) for i, rec in enumerate(ds)]
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
            records = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid UTF-8 JSON: {e}") from e
        except RecursionError as e:
            raise DataError(f"{path}: JSON nested too deeply to read") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file holds a list of rows, got {type(records).__name__}")
        return [(i + 1, rec, None) for i, rec in enumerate(records)]
    out = []
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of row 1.
    for i, raw in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out.append((i, json.loads(raw.decode("utf-8")), None))
        except UnicodeDecodeError:
            out.append((i, None, "undecodable (not UTF-8)"))
        except json.JSONDecodeError as e:
            out.append((i, None, f"malformed JSON ({e.msg})"))
        except RecursionError:
            out.append((i, None, "nested too deeply"))
    return out


DETECT_BY = (
    ("preference", "chosen"),
    ("messages", "messages"),
    ("sharegpt", "conversations"),
    ("alpaca", "instruction"),
    ("prompt_completion", "prompt"),
)
UNDETECTED = "unknown format: no 'chosen', 'messages', 'conversations', 'instruction' or 'prompt' field"


def detect_format(rec: Any, columns: dict[str, str] | None = None) -> str | None:
    """The format a record looks like (its fields renamed by `columns`), or None."""
    if not isinstance(rec, dict):
        return None
    columns = columns or {}
    return next((fmt for fmt, key in DETECT_BY if columns.get(key, key) in rec), None)


def _kind(value: Any) -> str:
    """A value's JSON type name, for reasons that say what a field holds instead of text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _short(value: str) -> str:
    """A role name for a reason: quoted, cut short so a huge field does not become a category."""
    return repr(value if len(value) <= 20 else value[:20] + "...")


def _content(value: Any, field: str) -> tuple[str | None, str | None]:
    """A turn's text: a string, or an OpenAI content-part list whose parts are all text (joined).

    Returns:
        (text, None), or (None, what is wrong with the field).
    """
    if isinstance(value, list) and field == "content":
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                return None, (
                    f"content part of type {_short(kind)}" if isinstance(kind, str) else "content part is not text"
                )
            if not isinstance(part.get("text"), str):
                return None, "content part has no text"
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        return None, f"{field} is {_kind(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") would fail in the tokenizer
        return None, f"{field} is not valid Unicode"
    return value, None


def _turn(t: Any, fmt: str) -> tuple[dict[str, str] | None, str | None]:
    """One turn of a `messages` or `sharegpt` row, or (None, what is wrong with it)."""
    role_key, text_key, tag = ("from", "value", " (sharegpt)") if fmt == "sharegpt" else ("role", "content", "")
    if not isinstance(t, dict):
        return None, f"not an object{tag}"
    if role_key not in t:
        return None, f"'{role_key}' missing{tag}"
    raw = t[role_key]
    role = SHAREGPT_ROLES.get(raw) if fmt == "sharegpt" and isinstance(raw, str) else raw
    if not isinstance(raw, str):
        return None, f"{role_key} is {_kind(raw)}{tag}"
    if role not in ROLES:
        return None, f"unknown role {_short(raw)}{tag}"
    if text_key not in t:
        return None, f"'{text_key}' missing{tag}"
    text, problem = _content(t[text_key], text_key)
    return ({"role": role, "content": text}, None) if problem is None else (None, problem + tag)


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
        if not isinstance(turns, list):
            return None, f"no '{key}' list" if turns is None else f"'{key}' is {_kind(turns)}, not a list"
        if not turns:
            return None, f"'{key}' is empty"
        msgs = []
        for n, t in enumerate(turns, start=1):
            msg, problem = _turn(t, fmt)
            if problem:
                return None, f"turn {n}: {problem}"
            if msg["role"] == "assistant" and not msg["content"].strip():
                return None, f"turn {n}: empty response"
            msgs.append(msg)
    else:
        user_key, out_key = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
        for k in (col[user_key], col[out_key]):
            if k not in rec:
                return None, f"'{k}' missing"
        prompt, problem = _content(rec[col[user_key]], f"'{col[user_key]}'")
        response, problem = (None, problem) if problem else _content(rec[col[out_key]], f"'{col[out_key]}'")
        if problem:
            return None, problem
        if not response.strip():
            return None, f"'{col[out_key]}' is empty"
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
    return msgs, None


def _turns(value: Any, field: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """A preference field as messages: a string is one turn of `role`, a list is a `messages` list."""
    msgs = []
    for n, t in enumerate(value, start=1):
        msg, problem = _turn(t, "messages")
        if problem:
            return None, f"'{field}' turn {n}: {problem}"
        msgs.append(msg)
    return msgs, None


def to_preference_pair(
    rec: Any, columns: dict[str, str]
) -> tuple[list[dict[str, str]] | None, list[dict[str, str]] | None, str | None]:
    """A preference record as its chosen and rejected conversations.

    The prompt (a string: one user turn; or a message list, optionally after a `system` string)
    is followed by each response (a string: one assistant turn; or message lists). Responses that
    are whole conversations starting with the prompt (UltraFeedback-binarized) are taken as they
    are; without a prompt field they must be whole conversations sharing everything but their
    last turn.

    Returns:
        (chosen, rejected, None), or (None, None, reason).
    """
    col = {f: columns.get(f, f) for f in FIELDS["preference"]}
    if not isinstance(rec, dict):
        return None, None, "row is not a JSON object"
    prompt: list[dict[str, str]] = []
    system = rec.get(col["system"])
    if isinstance(system, str) and system.strip():
        prompt.append({"role": "system", "content": system})
    raw = rec.get(col["prompt"])
    if isinstance(raw, str):
        if not raw.strip():
            return None, None, f"'{col['prompt']}' is empty"
        prompt.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        turns, problem = _turns(raw, col["prompt"])
        if problem:
            return None, None, problem
        prompt += turns
    elif raw is not None:
        return None, None, f"'{col['prompt']}' is {_kind(raw)}"
    sides = []
    for name in (col["chosen"], col["rejected"]):
        if name not in rec:
            return None, None, f"'{name}' missing"
        value = rec[name]
        if isinstance(value, str):
            text, problem = _content(value, f"'{name}'")
            if problem:
                return None, None, problem
            conv = [*prompt, {"role": "assistant", "content": text}]
        elif isinstance(value, list) and value:
            turns, problem = _turns(value, name)
            if problem:
                return None, None, problem
            # A whole conversation repeats the prompt (or stands alone); a continuation does not.
            whole = not prompt or (turns[: len(prompt)] == prompt and len(turns) > len(prompt))
            conv = turns if whole else [*prompt, *turns]
        else:
            return None, None, f"'{name}' is {_kind(value)}" if not isinstance(value, list) else f"'{name}' is empty"
        if conv[-1]["role"] != "assistant":
            return None, None, f"'{name}' does not end with an assistant turn"
        if not conv[-1]["content"].strip():
            return None, None, f"'{name}' is an empty response"
        if not any(m["role"] == "user" for m in conv[:-1]):
            return None, None, "no prompt (no user turn before the response)"
        sides.append(conv)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        return None, None, "chosen and rejected follow different prompts"
    return chosen, rejected, None


def read_source(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None, score_column: str | None = None
) -> list[Row]:
    """Every row of one file, usable or not, in file order.

    Under `auto`, each row is read in the format it looks like, so a file mixing formats keeps
    every row; a row that looks like none is unusable with that reason.

    Raises:
        DataError: when the file cannot be read at all, holds no rows, or no row has a known format.
    """
    columns = columns or {}
    p = Path(path)
    try:
        records = read_records(p)
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e}") from e
    if not records:
        raise DataError(f"{p}: no rows (the file is empty)")
    parsed = [r for _, r, problem in records if problem is None]
    if fmt == "auto" and parsed and not any(detect_format(r, columns) for r in parsed):
        raise DataError(f"{p}: cannot detect the data format; set format in data.train_files")
    rows = []
    for line, rec, problem in records:
        msgs = rejected = None
        if problem is None:
            row_fmt = detect_format(rec, columns) if fmt == "auto" else fmt
            if row_fmt is None:
                problem = "row is not a JSON object" if not isinstance(rec, dict) else UNDETECTED
            elif row_fmt == "preference":
                msgs, rejected, problem = to_preference_pair(rec, columns)
            else:
                msgs, problem = to_messages(rec, row_fmt, columns)
        rid = rec.get(columns.get("id", "id")) if isinstance(rec, dict) else None
        score = None
        if score_column and problem is None:
            score = rec.get(score_column)
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                msgs, problem, score = None, f"no finite '{score_column}' score", None
        rows.append(Row(str(p), line, msgs, problem, str(rid) if rid is not None else None, score, rejected))
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


def load_rows(sources: list[Any], seed: int = 0, score_column: str | None = None, pairs: bool = False) -> list[Row]:
    """Read every source of a job (paths, or `SourceSpec`s with format, columns and weight).

    Duplicate ids are checked over all sources before weighting; a weighted source's rows
    appear `weight` times (the fractional part as a seeded sample). A preference row is its
    chosen conversation (SFT and PoFT train on it); with `pairs` (DPO), every row becomes two:
    row 2i its chosen conversation and row 2i+1 its rejected one (`preference_rows`).
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
    return preference_rows(out) if pairs else out


NOT_A_PAIR = "not a preference pair (no 'chosen' and 'rejected')"


def preference_rows(rows: list[Row]) -> list[Row]:
    """Each row as two: its chosen conversation (even index), then its rejected one (odd index).

    Both halves of an unusable pair are unusable, with the same reason, so a pair is always
    usable or not as a whole (and counted once per half).
    """
    out = []
    for r in rows:
        problem = r.problem or (NOT_A_PAIR if r.rejected is None else None)
        chosen, rejected = (None, None) if problem else (r.messages, r.rejected)
        out.append(Row(r.source, r.line, chosen, problem, r.id, r.ref_score))
        out.append(Row(r.source, r.line, rejected, problem, r.id, r.ref_score))
    return out


def job_rows(spec: JobSpec) -> list[Row]:
    """The job's data rows: for DPO, each preference pair as two rows (chosen 2i, rejected 2i+1)."""
    pairs = spec.objective.kind == "dpo"
    return load_rows(spec.data.sources, spec.seed, spec.data.reference_score_column, pairs=pairs)
