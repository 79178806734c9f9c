"""`poft-ds eval`: a model's scores, perplexity and greedy answers on held-out data.

One process, plain PyTorch and transformers (no DeepSpeed engine), on the first GPU or the CPU.
Every conversation is rendered and masked with the *target's* tokenizer and chat template (the
spec's `model` section), exactly as training renders it, whichever model folder is evaluated:

  * s, the PoFT score: the mean log-probability of a sample's response tokens, averaged over
    samples; the token-level cross-entropy over all response tokens; perplexity = exp(cross-entropy);
  * with `eval.answer_field`: the greedy answer to each sample's last assistant turn, given the
    conversation before it, checked against the row's answer by `eval.checker` (exact match).

The data is a file (`--data`) or, by default, the rows a training run of the spec holds out
(`data.eval_fraction`), selected by the same code the trainers run (`prepare.build_schedule`).
A row the target's template cannot use is counted by reason, never dropped silently.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import TemplateError, TemplateSyntaxError
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from poft_ds.data.batch import collate, pad_token_id
from poft_ds.data.chat import REFUSED, ChatTokenizer, RowError, TokenizedSample, load_tokenizer
from poft_ds.data.prepare import build_schedule, model_lengths
from poft_ds.data.rows import DataError, Row, load_rows, read_records, read_source
from poft_ds.data.tokenize import TokenizeReport, tokenize_rows
from poft_ds.ds_config import resolve_precision
from poft_ds.files import atomic_write
from poft_ds.models import DTYPES, HEAD_CHECK_ATOL
from poft_ds.scoring import ResponseScorer, check_head
from poft_ds.spec import EvalSpec, JobSpec, SpecError

Checker = Callable[[str, str, dict[str, Any]], bool]


def _exact(generation: str, answer: str, row: dict[str, Any]) -> bool:
    return generation.strip() == answer.strip()


def _contains(generation: str, answer: str, row: dict[str, Any]) -> bool:
    return answer.strip() in generation


def evaluate_model(spec: JobSpec, model_path: str | Path, data_path: str | Path | None = None) -> dict[str, Any]:
    """Score a model on held-out data and, with `eval.answer_field`, check its greedy answers.

    Args:
        spec: The job spec: its `model` gives the tokenizer and chat template, `data` the held-out
            rows, `eval` the answer checking.
        model_path: A Hugging Face model folder (e.g. RUN_DIR/final_model, or the spec's model.path).
        data_path: A data file (JSONL, JSON, parquet or arrow; format detected row by row) to
            evaluate on; None: the rows training holds out (`data.eval_fraction`).

    Returns:
        The report: `mean_logprob` (s), `cross_entropy`, `perplexity`, `response_tokens`, row counts
        (`rows`, `evaluated`, `unusable` by reason with `unusable_examples`), `exact_match` (None
        without an answer field), `checked` and `not_checked` by reason, and `samples`: per row
        evaluated, its `row` (file:line), `s`, `tokens`, `generation`, `answer` and `correct`.

    Raises:
        SpecError: when the model folder is not one, or there is neither `data_path` nor a hold-out.
        DataError: when the data cannot be read, no row is usable, or a checker fails on a row.
    """
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise SpecError(f"--model: {model_path} is not a Hugging Face model folder (no config.json)")
    tokenizer = load_tokenizer(spec.model)
    chat = ChatTokenizer(tokenizer, spec.model.max_length, spec.model.chat_template, spec.model.truncation)
    rows, samples, report, source = _eval_samples(spec, chat, data_path)
    usable = [i for i, s in enumerate(samples) if s is not None]
    if not usable:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.counts.items())
        raise DataError(f"{source}: no row is usable under the target's chat template ({reasons})")

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    # On the CPU always float32 (bf16 there is slow and not what a GPU run computes); on a GPU the run's precision.
    precision = "fp32" if device.type == "cpu" else resolve_precision(spec, device)
    lm = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=DTYPES[precision],
        trust_remote_code=spec.model.trust_remote_code,
        **({"attn_implementation": spec.model.attn_implementation} if spec.model.attn_implementation else {}),
    )
    lm.to(device).eval()
    scorer = ResponseScorer(lm, spec.model.head_chunk_tokens)
    why = check_head(scorer, device, HEAD_CHECK_ATOL[precision])
    if why:
        print(f"[poft-ds] eval: {why}", flush=True)

    pad = pad_token_id(tokenizer)
    logp_sums, n_tokens = _score(scorer, [samples[i] for i in usable], pad, spec.eval.batch_size, device)
    records: list[dict[str, Any]] = [
        {
            "row": rows[i].where,
            "s": lp / n,
            "tokens": n,
            "generation": None,
            "answer": None,
            "correct": None,
        }
        for i, lp, n in zip(usable, logp_sums, n_tokens)
    ]
    total_logp, total_tokens = sum(logp_sums), sum(n_tokens)
    cross_entropy = -total_logp / total_tokens
    out: dict[str, Any] = {
        "model": str(model_path),
        "data": source,
        "rows": len(rows),
        "evaluated": len(usable),
        "unusable": dict(report.counts),
        "unusable_examples": report.examples,
        "truncated_responses": sum(samples[i].lost_response_tokens > 0 for i in usable),
        "mean_logprob": sum(r["s"] for r in records) / len(records),
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(cross_entropy) if cross_entropy < 700 else math.inf,
        "response_tokens": total_tokens,
        "answer_field": spec.eval.answer_field,
        "checker": spec.eval.checker,
        "exact_match": None,
        "checked": 0,
        "not_checked": {},
    }
    if spec.eval.answer_field is not None:
        _check_answers(spec.eval, lm, chat, [rows[i] for i in usable], records, out, device)
    out["samples"] = records
    return out


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON, atomically (a reader never sees half of it)."""
    atomic_write(Path(path), (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())


def _eval_samples(
    spec: JobSpec, chat: ChatTokenizer, data_path: str | Path | None
) -> tuple[list[Row], list[TokenizedSample | None], TokenizeReport, str]:
    """The rows to evaluate, their samples under the target (None where unusable), the unusable
    ones by reason, and a description of where the rows come from."""
    if data_path is not None:
        rows = read_source(str(data_path))
        samples, report = tokenize_rows(rows, chat)  # in memory: a one-off file is no run's cache
        return rows, list(samples), report, str(data_path)
    d = spec.data
    if not d.eval_fraction:
        raise SpecError(
            "data.eval_fraction: the spec holds out no rows; give a data file (--data PATH) or set data.eval_fraction"
        )
    # The rows training holds out: those every model can use (the target and each aligned model,
    # through the tokenization cache training fills), then the trainers' own seeded selection.
    rows = load_rows(d.sources, spec.seed, d.reference_score_column)
    if not rows:
        raise DataError(f"data.train_files: no rows in {d.train_files}")
    samples, _ = tokenize_rows(rows, chat, d.resolved_cache_dir(spec.run_dir))
    lengths = samples.lengths()
    usable = lengths > 0
    for m in spec.aligned_models:
        usable &= model_lengths(spec, m, rows) > 0
    _, held_out, _ = build_schedule(spec, rows, tuple(np.flatnonzero(usable).tolist()), lengths)
    source = f"held-out rows of data.train_files (data.eval_fraction={d.eval_fraction}, seed={spec.seed})"
    # Every held-out row is usable by construction: none is unusable here.
    return [rows[i] for i in held_out], [samples[i] for i in held_out], TokenizeReport(), source


def _score(
    scorer: ResponseScorer, samples: list[TokenizedSample], pad: int, batch_size: int, device: torch.device
) -> tuple[list[float], list[int]]:
    """Per sample: the sum of its response tokens' log-probabilities, and how many there are."""
    logp_sums: list[float] = []
    n_tokens: list[int] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], pad).to(device)
            logp, n = scorer(*batch.inputs())
            logp_sums += logp.double().tolist()
            n_tokens += n.tolist()
    return logp_sums, n_tokens


def _checker(eval_spec: EvalSpec) -> Checker:
    return {"exact": _exact, "contains": _contains}.get(eval_spec.checker) or EvalSpec.user_checker(eval_spec.checker)


def _answers(rows: list[Row], field: str) -> tuple[list[tuple[str, dict[str, Any]] | None], list[str | None]]:
    """Each row's expected answer and raw record, read again from its file (Row keeps no extra
    fields); where a row has none, None and the reason."""
    records: dict[str, dict[int, Any]] = {}
    found: list[tuple[str, dict[str, Any]] | None] = []
    reasons: list[str | None] = []
    for row in rows:
        if row.source not in records:
            records[row.source] = {line: rec for line, rec, _ in read_records(Path(row.source))}
        rec = records[row.source].get(row.line)
        value = rec.get(field) if isinstance(rec, dict) else None
        if value is None:
            found.append(None)
            reasons.append(f"no '{field}' field")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            found.append(None)
            reasons.append(f"'{field}' is not a string or a number")
        else:
            found.append((str(value), rec))
            reasons.append(None)
    return found, reasons


def _prompt_ids(chat: ChatTokenizer, messages: list[dict[str, str]]) -> tuple[list[int] | None, str | None]:
    """The conversation before its last assistant turn, rendered with the generation prompt and
    tokenized as training tokenizes (special-token text in content stays plain text).

    Returns:
        (token ids, None), or (None, why the prompt cannot be built).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = messages[:last]
    try:
        ids = chat.encode_prompt(prompt)
    except TemplateSyntaxError:
        raise
    except TemplateError as e:
        return None, REFUSED + str(e)
    except RowError as e:  # special-token text the template moves: it cannot be kept plain text
        return None, str(e)
    if len(ids) >= chat.max_length:
        return None, "prompt reaches model.max_length"
    return ids, None


def _stop_ids(lm: torch.nn.Module, tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the model's generation eos ids and the tokenizer's eos."""
    eos = lm.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _generate(
    lm: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    eval_spec: EvalSpec,
    device: torch.device,
) -> list[str]:
    """Greedy answers to token-id prompts, in batches left-padded to their longest prompt."""
    pad = pad_token_id(tok)
    stop = _stop_ids(lm, tok)
    # A fresh configuration: a model's own sampling defaults (temperature, top_p) do not apply to greedy decoding.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=eval_spec.max_new_tokens, eos_token_id=stop or None, pad_token_id=pad
    )
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), eval_spec.batch_size):
            chunk = prompts[start : start + eval_spec.batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.as_tensor(p)
                attn[i, width - len(p) :] = 1
            out = lm.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config)
            for new in out[:, width:].tolist():
                end = next((k for k, t in enumerate(new) if t in stop), len(new))
                texts.append(tok.decode(new[:end], skip_special_tokens=True))
    return texts


def _check_answers(
    eval_spec: EvalSpec,
    lm: torch.nn.Module,
    chat: ChatTokenizer,
    rows: list[Row],
    records: list[dict[str, Any]],
    out: dict[str, Any],
    device: torch.device,
) -> None:
    """Generate greedy answers for the rows with an answer and check them; fills `records` and `out`."""
    check = _checker(eval_spec)
    answers, reasons = _answers(rows, eval_spec.answer_field)
    prompts: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        if answers[k] is None:
            continue
        ids, reasons[k] = _prompt_ids(chat, row.messages)
        if ids is not None:
            prompts[k] = ids
    generations = _generate(lm, chat.tok, list(prompts.values()), eval_spec, device)
    for k, generation in zip(prompts, generations):
        answer, rec = answers[k]
        try:
            correct = check(generation, answer, rec)
        except Exception as e:  # a user checker's failure, named with the row it failed on
            raise DataError(f"eval.checker {eval_spec.checker}: failed on {rows[k].where}: {e!r}") from e
        if not isinstance(correct, (bool, np.bool_)):
            raise DataError(
                f"eval.checker {eval_spec.checker}: returned {type(correct).__name__} on {rows[k].where}, not a bool"
            )
        records[k].update(generation=generation, answer=answer, correct=bool(correct))
    out["checked"] = len(prompts)
    out["not_checked"] = dict(Counter(r for r in reasons if r is not None))
    out["exact_match"] = sum(r["correct"] is True for r in records) / len(prompts) if prompts else None
