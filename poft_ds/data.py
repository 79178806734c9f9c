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

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from poft_ds import __version__
from poft_ds.files import atomic_write
from poft_ds.formats import DataError, Row


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


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTokenizer:
    """Turns conversations into token ids and response masks for one model.

    Args:
        tokenizer: The model's Hugging Face tokenizer (a fast tokenizer: offsets are needed).
        max_length: Longest sequence.
        chat_template: Optional template overriding the tokenizer's.
        truncation: What to do with a longer conversation: `right` keeps its first `max_length`
            tokens, `left` its last ones (the latest turns, trimming the prompt from the left),
            `drop` makes it unusable ("too long").
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        chat_template: str | None = None,
        truncation: str = "right",
    ):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncation = truncation
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
                if GENERATION_BLOCK.search(self.template):
                    return self._generation_marker_spans(messages)
                raise DataError(
                    "chat template renders a conversation differently from its prefixes "
                    f"(assistant turn {i}) and has no {{% generation %}} markers; its assistant tokens "
                    "cannot be located. Add generation markers to the template (chat_template in the spec)"
                )
            turn = through[len(before) :]
            content_at = turn.find(m["content"])
            if content_at < 0:
                raise DataError(f"chat template does not render assistant turn {i}'s content verbatim")
            start = len(before) + content_at
            end = len(before) + len(turn.rstrip())
            spans.append((start, end))
        return full, spans

    def _generation_marker_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Spans from the template's own `{% generation %}` blocks (for templates that rewrite history)."""
        rendered, indices = render_jinja_template(
            [messages], chat_template=self.template, return_assistant_tokens_mask=True, **self.tok.special_tokens_map
        )
        full = rendered[0]
        if not indices[0]:
            raise DataError("chat template's {% generation %} blocks mark no assistant text")
        # The blocks' end-of-turn marker may sit just outside them; trained when it directly follows.
        spans = []
        for start, end in indices[0]:
            eos = self.tok.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
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
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                return None, "too long"
            keep = slice(len(ids) - self.max_length, None) if self.truncation == "left" else slice(self.max_length)
            ids, mask = ids[keep], mask[keep]
        # The first token has no left context, so it cannot be scored.
        if not any(mask[1:]):
            return None, "no response token within max_length"
        return TokenizedSample(ids, mask), None


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
    h.update(f"{chat.template}|{chat.max_length}|{chat.truncation}|{chat.prepend_bos}|{__version__}".encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path) -> list[tuple[TokenizedSample | None, str | None]] | None:
    try:
        table = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException):
        return None
    return [
        (TokenizedSample(ids, mask) if ids is not None else None, reason)
        for ids, mask, reason in zip(table["input_ids"], table["response_mask"], table["reason"])
    ]


def _write_cache(path: Path, results: list[tuple[TokenizedSample | None, str | None]]) -> None:
    table = pa.table(
        {
            "input_ids": [s.input_ids if s else None for s, _ in results],
            "response_mask": [s.response_mask if s else None for s, _ in results],
            "reason": [reason for _, reason in results],
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes())


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
