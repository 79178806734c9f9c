"""Pre-flight checks on a job's data and chat templates, run on one process before any rank starts.

`check_templates` proves every model's template can be masked (an error names the field and the
model); `inspect_data` tokenizes the data under every model and reports what is usable (`poft-ds
data inspect`).
"""

from __future__ import annotations

import statistics
from typing import Any

from jinja2 import TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from poft_ds.data.chat import REFUSED, ChatTokenizer, chat_tokenizer, load_tokenizer
from poft_ds.data.rows import DataError, job_rows
from poft_ds.data.tokenize import tokenize_rows
from poft_ds.spec import JobSpec, ModelSpec, SpecError

# Several turns, with contents that start and end with whitespace (which some templates trim).
PROBE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": " Hello?\n"},
    {"role": "assistant", "content": "\nHi there. "},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " 4\n"},
]


def job_models(spec: JobSpec) -> list[tuple[str, str, ModelSpec]]:
    """(field path, display name, model) for the target and every aligned model the job uses."""
    out = [("model", "target", spec.model)]
    if spec.objective.uses_reference:
        out += [(f"aligned_models[{i}]", m.name, m) for i, m in enumerate(spec.aligned_models)]
    return out


def check_templates(spec: JobSpec) -> None:
    """Mask a probe conversation under every model's template; raise naming each model that fails.

    A template that refuses the probe's system turn (Gemma-2, Mistral-Instruct) is probed without
    it: it can still train on rows without one, and `poft-ds data inspect` names the rows it refuses.

    Raises:
        SpecError: listing every model whose tokenizer or chat template cannot be used.
    """
    problems = []
    for field, name, model in job_models(spec):
        try:
            chat = ChatTokenizer(load_tokenizer(model), 10_000, model.chat_template)
            if not getattr(chat.tok, "is_fast", False):
                raise DataError("a fast (Rust) tokenizer is needed for character offsets")
            _, reason = chat(PROBE)
            if reason and reason.startswith(REFUSED):
                _, reason = chat(PROBE[1:])
            if reason:
                raise DataError(reason)
        except TemplateSyntaxError as e:
            problems.append(
                f"  {field}.chat_template: {name}'s template does not compile: {e.message} (line {e.lineno})"
            )
        except (DataError, OSError, ValueError) as e:
            problems.append(f"  {field}.chat_template: {name}'s template cannot be masked: {e}")
    if problems:
        raise SpecError("chat templates:\n" + "\n".join(problems))


def render_mask(tok: PreTrainedTokenizerBase, ids: list[int], mask: list[bool]) -> str:
    """A sample's text with the trained tokens wrapped in [[ ]]."""
    out, run, inside = [], [], False
    for i, m in zip(ids, mask):
        if m != inside:
            out.append(tok.decode(run))
            out.append("[[" if m else "]]")
            run, inside = [], m
        run.append(i)
    out.append(tok.decode(run) + ("]]" if inside else ""))
    return "".join(out)


def inspect_data(spec: JobSpec) -> dict[str, Any]:
    """Tokenize the data under every model and report outcomes, lengths and one masked sample.

    Returns:
        A JSON-ready report: rows, per-model outcome counts with example rows, length
        statistics and response tokens lost to truncation, rows usable by every model, and
        whether the job would start.
    """
    rows = job_rows(spec)
    usable = [True] * len(rows)
    models = {}
    for field, name, model in job_models(spec):
        tok = load_tokenizer(model)
        samples, report = tokenize_rows(rows, chat_tokenizer(spec, model, tok))
        lengths = sorted(len(s.input_ids) for s in samples if s)
        usable = [u and s is not None for u, s in zip(usable, samples)]
        first = next((s for s in samples if s), None)
        models[name] = {
            "field": field,
            "path": model.path,
            "outcomes": {"ok": len(lengths), **report.counts},
            "examples": report.examples,
            "tokens": {
                "min": lengths[0],
                "median": statistics.median(lengths),
                "p95": lengths[int(0.95 * (len(lengths) - 1))],
                "max": lengths[-1],
                "response_mean": statistics.mean(sum(s.response_mask) for s in samples if s),
            }
            if lengths
            else None,
            # Usable samples that lost response tokens to max_length, and how many in all.
            "truncated_responses": {
                "samples": sum(1 for s in samples if s and s.lost_response_tokens),
                "tokens": sum(s.lost_response_tokens for s in samples if s),
            },
            "masked_sample": render_mask(tok, first.input_ids, first.response_mask) if first else None,
        }
    bad = len(rows) - sum(usable)
    return {
        "rows": len(rows),
        "usable_by_all_models": sum(usable),
        "bad_fraction": bad / max(len(rows), 1),
        "max_bad_fraction": spec.data.max_bad_fraction,
        "would_start": bad / max(len(rows), 1) <= spec.data.max_bad_fraction,
        "models": models,
    }
