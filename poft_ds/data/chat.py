"""Render and mask: a conversation as one model sees it, under its own chat template.

Every model (the target and each aligned model) tokenizes a sample with its *own* tokenizer and
chat template. The response mask marks the tokens of every assistant turn: the turn's content as
the template renders it and the end-of-turn marker the template closes it with (so the model
learns to stop), and nothing of the prompt, system or user turns.

Assistant spans are found by incremental rendering: rendering the conversation up to turn i
with a generation prompt, and up to and including turn i, gives turn i's text in the full
rendering, in which the content is found verbatim (or trimmed, for templates that trim it).
Templates that render history differently from a final turn (Qwen3 drops earlier turns'
reasoning and adds an empty one to the last turns) are masked by their `{% generation %}` blocks
when they have some, else by finding each message's content in order in the full rendering. A
row whose content the template rewrites, or that the template refuses (`raise_exception`), is
unusable with that reason; it never stops the job.

Data text never becomes a control token: the template's own text keeps its special tokens, but
special-token text inside a message's content (an answer quoting `<|im_end|>`) is tokenized as
plain text (`split_special_tokens=True`), so data cannot forge turn boundaries. Rows without such
text tokenize exactly as a single call over the rendering would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError, TemplateSyntaxError
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from poft_ds.data.rows import DataError
from poft_ds.spec import JobSpec, ModelSpec


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """A model's tokenizer, with the spec's chat template applied when it overrides one."""
    tok = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    if model.chat_template:
        tok.chat_template = model.chat_template
    return tok


def chat_tokenizer(spec: JobSpec, model: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> ChatTokenizer:
    """How the job renders and masks conversations under one of its models.

    DPO scores the final response only: the turns before it are the prompt the pair shares.
    """
    return ChatTokenizer(
        tokenizer if tokenizer is not None else load_tokenizer(model),
        model.max_length,
        model.chat_template,
        model.truncation,
        last_turn_only=spec.objective.kind == "dpo",
    )


@dataclass
class TokenizedSample:
    """A conversation as one model sees it."""

    input_ids: list[int]
    response_mask: list[bool]
    # Response tokens cut off by max_length (the sample is still usable, but trains on less).
    lost_response_tokens: int = 0


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Reasons a template gives for refusing a row, e.g. Mistral's alternating roles, Gemma-2's system turn.
REFUSED = "chat template refused the row: "
# Part of the tokenization cache key: a change to how masks are drawn must not reuse old masks.
MASK_RULES = 3


class RowError(Exception):
    """A row this model's template cannot render or mask; the message is the reason counted."""


def _find(text: str, content: str, start: int) -> tuple[int, int]:
    """Where `content` is rendered in `text` from `start`, verbatim or trimmed (Llama-3 and Gemma trim it).

    The earlier of the two wins (the verbatim form on a tie): a trimmed rendering comes before
    any later verbatim repeat, and a verbatim one before the trimmed text inside it.

    Returns:
        (position, length), or (-1, 0) when it is not there.
    """
    hits = [(text.find(needle, start), len(needle)) for needle in (content, content.strip()) if needle]
    return min(((at, n) for at, n in hits if at >= 0), key=lambda h: (h[0], -h[1]), default=(-1, 0))


def _shared_prefix(a: str, b: str) -> int:
    """Length of the text two renderings start with in common."""
    n = min(len(a), len(b))
    return n if a[:n] == b[:n] else next(k for k in range(n) if a[k] != b[k])


class ChatTokenizer:
    """Turns conversations into token ids and response masks for one model.

    Args:
        tokenizer: The model's Hugging Face tokenizer (a fast tokenizer: offsets are needed).
        max_length: Longest sequence.
        chat_template: Optional template overriding the tokenizer's.
        truncation: What to do with a longer conversation: `right` keeps its first `max_length`
            tokens, `left` its last ones (the latest turns, trimming the prompt from the left),
            `drop` makes it unusable ("too long").
        last_turn_only: Score the last assistant turn only (DPO: earlier turns are the prompt).

    Raises:
        DataError: when neither the spec nor the tokenizer has a chat template.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        chat_template: str | None = None,
        truncation: str = "right",
        last_turn_only: bool = False,
    ):
        self.tok = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.last_turn_only = last_turn_only
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise DataError(f"tokenizer {tokenizer.name_or_path} has no chat template and the spec gives none")
        # Templates that do not write the BOS token themselves rely on the tokenizer to add it.
        bos = tokenizer.bos_token_id
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.prepend_bos = bos is not None and with_special[:1] == [bos]
        self.control_ids = set(tokenizer.added_tokens_decoder)
        self._control_id_array = np.array(sorted(self.control_ids), dtype=np.int64)
        # Special-token strings that data text must not turn into control tokens.
        self.control_texts = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content}, key=len
        )[::-1]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def assistant_char_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and, per assistant turn, the character span to train on.

        A span covers the turn's content as rendered and the end-of-turn text the template
        closes it with, without trailing whitespace (formatting between turns, never generated).

        Raises:
            RowError: when the template rewrites an assistant turn's content so it cannot be found.
            jinja2.TemplateError: when the template refuses the row (`raise_exception`).
        """
        full = self._render(messages, generation_prompt=False)
        # Per assistant turn: the rendering up to its generation prompt, and up to and including it.
        prefixes = {
            i: (self._render(messages[:i], generation_prompt=True) if i else "", self._render(messages[: i + 1], False))
            for i, m in enumerate(messages)
            if m["role"] == "assistant"
        }
        if all(full.startswith(through) and through.startswith(before) for before, through in prefixes.values()):
            spans = []
            for i, (before, through) in prefixes.items():
                turn = through[len(before) :]
                at, n = _find(turn, messages[i]["content"], 0)
                if at < 0:
                    raise RowError(f"chat template rewrites assistant turn {i}'s content")
                spans.append((len(before) + at, len(before) + max(at + n, len(turn.rstrip()))))
            return full, spans
        if GENERATION_BLOCK.search(self.template):
            return self._generation_marker_spans(messages)
        return full, self._located_spans(messages, full, prefixes)

    def _located_spans(
        self, messages: list[dict[str, str]], full: str, prefixes: dict[int, tuple[str, str]]
    ) -> list[tuple[int, int]]:
        """Spans for a template that renders history differently from a last turn (Qwen3, Phi-3's eos).

        Each message's content is found in the full rendering after the previous one's, so an
        answer "4" is not found inside an earlier "2+2=4?"; an assistant turn's content is also
        looked for only after the text its generation prompt shares with the full rendering. Its
        end-of-turn marker is the first word the template writes after that content when the
        turn is the last message, trained when the full rendering has it there too.
        """
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] == "system":
                continue  # templates move it (into the first or last user turn) or drop it
            if m["role"] == "assistant":
                before, through = prefixes[i]
                cursor = max(cursor, _shared_prefix(before, full))
            at, n = _find(full, m["content"], cursor)
            if at < 0:
                if m["role"] == "assistant":
                    raise RowError(f"chat template rewrites assistant turn {i}'s content")
                continue  # a user turn the template reshapes: the next assistant turn is still bounded
            cursor = at + n
            if m["role"] == "assistant":
                # Where the content sits in the rendering that ends with this turn: after the text that
                # rendering shares with the generation prompt or with the full one, and not after `at`.
                start = min(at, max(_shared_prefix(before, through), _shared_prefix(through, full)))
                last_at, last_n = _find(through, m["content"], start)
                if last_at < 0:
                    raise RowError(f"chat template rewrites assistant turn {i}'s content")
                end_of_turn = re.match(r"\s*\S*", through[last_at + last_n :]).group()
                if full.startswith(end_of_turn, cursor):
                    cursor += len(end_of_turn)
                spans.append((at, cursor))
        return spans

    def _generation_marker_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """Spans from the template's own `{% generation %}` blocks (for templates that rewrite history)."""
        rendered, indices = render_jinja_template(
            [messages], chat_template=self.template, return_assistant_tokens_mask=True, **self.tok.special_tokens_map
        )
        full = rendered[0]
        if not indices[0]:
            raise RowError("chat template's {% generation %} blocks mark no assistant text")
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
            (sample, None), or (None, reason) when the template refuses or cannot mask the row,
            or the sample has no response token left.

        Raises:
            jinja2.TemplateSyntaxError: when the template itself is broken (every row would fail;
                `poft-ds validate` reports it first).
        """
        try:
            text, spans = self.assistant_char_spans(messages)
            spans = spans[-1:] if self.last_turn_only else spans
            ids, offsets = self._encode(text, self._forged_spans(messages, text))
        except RowError as e:
            return None, str(e)
        except TemplateSyntaxError:
            raise
        except TemplateError as e:
            return None, REFUSED + str(e)
        if self.prepend_bos and not text.startswith(self.tok.bos_token or "\0"):
            ids, offsets = [self.tok.bos_token_id] + ids, [(0, 0)] + offsets
        mask = self._response_mask(ids, offsets, spans)
        trained = sum(mask)
        if len(ids) > self.max_length:
            if self.truncation == "drop":
                return None, "too long"
            keep = slice(len(ids) - self.max_length, None) if self.truncation == "left" else slice(self.max_length)
            ids, mask = ids[keep], mask[keep]
        # The first token has no left context, so it cannot be scored.
        if not any(mask[1:]):
            return None, "no response token within max_length"
        return TokenizedSample(ids, mask, trained - sum(mask)), None

    def _response_mask(
        self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> list[bool]:
        """Which tokens are trained: those overlapping an assistant span.

        A control token counts only when it starts inside a span, since one that absorbs the
        whitespace after it (Phi-3's `rstrip`) reaches into the content. Computed with numpy
        (a span at a time over every token): the per-token Python loop was a quarter of the
        tokenization time of long samples.
        """
        if not ids:
            return []
        at = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        begin, end = at[:, 0], at[:, 1]
        control = np.isin(np.asarray(ids, dtype=np.int64), self._control_id_array)
        mask = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            mask |= (s < end) & (begin < e) & ((begin >= s) | ~control)
        return (mask & (begin < end)).tolist()

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the generation prompt (what a model then
        answers), encoded as `__call__` encodes training text: message text never becomes a
        control token, and a BOS the template leaves out is prepended.

        Raises:
            jinja2.TemplateError: the template refuses the conversation.
        """
        text = self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        ids, _ = self._encode(text, self._forged_spans(messages, text))
        if self.prepend_bos and not text.startswith(self.tok.bos_token or "\0"):
            ids = [self.tok.bos_token_id, *ids]
        return ids

    def _forged_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        """Character spans of `text` where a message's content spells a special token.

        Each content is located by rendering the conversation with that content replaced by a
        placeholder: the template text before it is the same, so the placeholder's position is
        where the content starts (a template's own tokens are never mistaken for data).

        Raises:
            RowError: when such content cannot be located (the template moves or rewrites it).
        """
        spans = []
        for i, m in enumerate(messages):
            if not any(c in m["content"] for c in self.control_texts):
                continue
            marker = "\x00poft-content\x00"
            probe = [dict(x, content=marker) if j == i else x for j, x in enumerate(messages)]
            at = self._render(probe, generation_prompt=False).find(marker)
            content = next(
                (
                    c
                    for c in (m["content"], m["content"].lstrip(), m["content"].strip())
                    if at >= 0 and text.startswith(c, at)
                ),
                None,
            )
            if content is None:
                raise RowError(f"turn {i + 1}: special-token text in content the template moves")
            spans += [
                (at + hit.start(), at + hit.end())
                for hit in re.finditer("|".join(re.escape(c) for c in self.control_texts), content)
            ]
        return sorted(spans)

    def _encode(self, text: str, forged: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text`, the `forged` spans tokenized as plain text.

        A special token is always a token boundary, so cutting the text at the forged spans leaves
        every other token as one call over the whole text would make it.
        """
        ids, offsets, cuts = [], [], [0]
        for s, e in forged:
            cuts += [s, e]
        cuts.append(len(text))
        for k in range(len(cuts) - 1):
            a, b = cuts[k], cuts[k + 1]
            if a == b:
                continue
            enc = self.tok(
                text[a:b], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=k % 2 == 1
            )
            ids += enc["input_ids"]
            offsets += enc["offset_mapping"] if a == 0 else [(s + a, e + a) for s, e in enc["offset_mapping"]]
        return ids, offsets
