"""Chat data: loading rows, rendering them with a model's chat template, masking responses.

Every model (the target and each aligned model) tokenizes a sample with its *own* tokenizer and
chat template. The response mask marks the tokens of every assistant turn: the turn's content
and the end-of-turn marker the template closes it with (so the model learns to stop), and
nothing of the prompt, system or user turns.

Assistant spans are found by incremental rendering: rendering the conversation up to turn i
with a generation prompt, and up to and including turn i, gives the character span of turn i in
the full rendering, which the tokenizer's offsets map to tokens. A template whose renderings are
not prefixes of each other cannot be masked this way and is reported as an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Unusable data, named by file and row."""


@dataclass
class Row:
    """One conversation and where it came from."""

    source: str
    line: int
    messages: list[dict[str, str]] | None
    problem: str | None = None


def _read_records(path: Path) -> list[tuple[int, Any, str | None]]:
    """(line or row number, record, parse problem) for every row of a JSONL, JSON or parquet file."""
    if path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        return [(i + 1, rec, None) for i, rec in enumerate(ds)]
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file holds a list of rows, got {type(records).__name__}")
        return [(i + 1, rec, None) for i, rec in enumerate(records)]
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((i, None, f"malformed JSON ({e.msg})"))
    return out


def _check_messages(rec: Any, messages_field: str) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(rec, dict) or messages_field not in rec:
        return None, f"no '{messages_field}' field"
    msgs = rec[messages_field]
    if not isinstance(msgs, list) or not msgs:
        return None, f"'{messages_field}' is not a non-empty list"
    clean = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return None, f"turn {j} is not a {{role: system|user|assistant, content: str}} mapping"
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        return None, "no assistant turn"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in clean):
        return None, "empty assistant content"
    return clean, None


def load_rows(files: list[str], messages_field: str = "messages") -> list[Row]:
    """Read every row of every file, keeping unusable rows with the reason (nothing is dropped).

    Args:
        files: JSONL, JSON or parquet paths.
        messages_field: The column holding the conversation.

    Returns:
        Rows in file order; a row with `problem` set cannot be trained on.
    """
    rows: list[Row] = []
    for f in files:
        path = Path(f)
        try:
            records = _read_records(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
        for line, rec, problem in records:
            msgs = None
            if problem is None:
                msgs, problem = _check_messages(rec, messages_field)
            rows.append(Row(str(path), line, msgs, problem))
    return rows


@dataclass
class TokenizedSample:
    """A conversation as one model sees it."""

    input_ids: list[int]
    response_mask: list[bool]


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


class ChatTokenizer:
    """Turns conversations into token ids and response masks for one model.

    Args:
        tokenizer: The model's Hugging Face tokenizer (a fast tokenizer: offsets are needed).
        max_length: Longest sequence; longer conversations are cut at the end.
        chat_template: Optional template overriding the tokenizer's.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, chat_template: str | None = None):
        self.tok = tokenizer
        self.max_length = max_length
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise DataError(f"tokenizer {tokenizer.name_or_path} has no chat template and the spec gives none")
        # Templates that do not write the BOS token themselves rely on the tokenizer to add it.
        bos = tokenizer.bos_token_id
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.prepend_bos = bos is not None and with_special[:1] == [bos]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def assistant_char_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and, per assistant turn, the character span to train on.

        A span covers the turn's content and the end-of-turn text the template closes it with,
        without trailing whitespace (formatting between turns, never generated).

        Raises:
            DataError: if the template's renderings are not prefixes of one another.
        """
        full = self._render(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True) if i else ""
            through = self._render(messages[: i + 1], generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise DataError(
                    "chat template renders a conversation differently from its prefixes "
                    f"(assistant turn {i}); its assistant tokens cannot be located"
                )
            turn = through[len(before) :]
            content_at = turn.find(m["content"])
            if content_at < 0:
                raise DataError(f"chat template does not render assistant turn {i}'s content verbatim")
            start = len(before) + content_at
            end = len(before) + len(turn.rstrip())
            spans.append((start, end))
        return full, spans

    def __call__(self, messages: list[dict[str, str]]) -> tuple[TokenizedSample | None, str | None]:
        """Tokenize one conversation.

        Returns:
            (sample, None), or (None, reason) when the sample has no response token left.
        """
        text, spans = self.assistant_char_spans(messages)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if self.prepend_bos and not text.startswith(self.tok.bos_token or "\0"):
            ids, offsets = [self.tok.bos_token_id] + ids, [(0, 0)] + offsets
        mask = [any(s < e_tok and b_tok < e and b_tok < e_tok for s, e in spans) for b_tok, e_tok in offsets]
        ids, mask = ids[: self.max_length], mask[: self.max_length]
        # The first token has no left context, so it cannot be scored.
        if not any(mask[1:]):
            return None, "no response token within max_length"
        return TokenizedSample(ids, mask), None


def tokenize_rows(rows: list[Row], chat: ChatTokenizer) -> tuple[list[TokenizedSample | None], TokenizeReport]:
    """Tokenize every usable row; unusable ones become None and are counted by reason."""
    out: list[TokenizedSample | None] = []
    report = TokenizeReport()
    for row in rows:
        where = f"{row.source}:{row.line}"
        if row.problem is not None:
            out.append(None)
            report.add(row.problem, where)
            continue
        sample, reason = chat(row.messages)
        if reason is not None:
            report.add(reason, where)
        out.append(sample)
    return out, report


@dataclass
class Batch:
    """A right-padded batch of samples."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: list[TokenizedSample], pad_id: int) -> Batch:
    """Right-pad samples into one batch (right padding keeps causal positions unchanged)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    resp = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        resp[i, :n] = torch.tensor(s.response_mask)
    return Batch(ids, attn, resp)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A token id for padding (padding is masked, so any valid id works when none is defined)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
