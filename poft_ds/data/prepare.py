"""Prepare a role's data: read the rows, tokenize them under this role's model, agree with every
other rank on the usable samples, and derive the schedule."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from poft_ds.data.chat import TokenizedSample, chat_tokenizer
from poft_ds.data.rows import DataError, Row, job_rows
from poft_ds.data.schedule import Schedule
from poft_ds.data.tokenize import tokenize_rows
from poft_ds.distributed import Worlds
from poft_ds.spec import JobSpec, ModelSpec


class RowPlaces(Sequence):
    """Where every row was read ("file:line"), kept as a file index and a line number per row."""

    def __init__(self, rows: Sequence[Row]):
        index: dict[str, int] = {}
        self.file = np.fromiter((index.setdefault(r.source, len(index)) for r in rows), np.int32, len(rows))
        self.line = np.fromiter((r.line for r in rows), np.int64, len(rows))
        self.files = tuple(index)

    def __len__(self) -> int:
        return len(self.line)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return f"{self.files[self.file[i]]}:{self.line[i]}"

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


class OptionalFloats(Sequence):
    """A float or None per row, kept as one float64 array (NaN for None: scores read are finite)."""

    def __init__(self, values: Iterable[float | None], n: int):
        self.values = np.fromiter((np.nan if v is None else v for v in values), np.float64, n)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> float | None:  # type: ignore[override]
        v = float(self.values[i])
        return None if v != v else v

    def __iter__(self) -> Iterator[float | None]:
        return (self[i] for i in range(len(self)))


@dataclass
class PreparedData:
    """This role's view of the data.

    Attributes:
        samples: One entry per data row; None where this role's model cannot use the row.
        schedule: The batch order every rank agrees on.
        where: "file:line" of every row, for logs and score dumps.
        keys: Content hash of every row (score store key); None for unusable rows.
        ref_scores: Precomputed reference scores from the data (`data.reference_score_column`).
        lengths: Tokens of every row under this role's model (0 where unusable).
        target_lengths: Tokens of every row under the target's tokenizer, known on every rank (the
            trainers' micro-batches are packed by them, and reference ranks must know which
            trainer takes which sample).
        eval_rows: Held-out rows (`data.eval_fraction`), never trained on.
    """

    samples: Sequence[TokenizedSample | None]
    schedule: Schedule
    where: Sequence[str]
    keys: Sequence[str | None]
    ref_scores: Sequence[float | None]
    lengths: np.ndarray
    target_lengths: np.ndarray
    eval_rows: tuple[int, ...] = ()
    # [rows, aligned models] stored scores when the job runs store-only (`reference.mode: store`).
    store_scores: np.ndarray | None = None

    def fingerprint(self, spec: JobSpec) -> dict[str, Any]:
        """What the sample order depends on; a checkpoint records it and a resume compares it.

        `data` hashes the content of the usable and held-out rows in order, so it changes with the
        files, their order, filters, the hold-out and anything that makes rows unusable.
        """
        h = hashlib.sha256()
        for i in (*self.schedule.usable, -1, *self.eval_rows):
            h.update((self.keys[i] or "-").encode() if i >= 0 else b"|")
        t, d = spec.training, spec.data
        return {
            "data": h.hexdigest()[:16],
            "samples": len(self.schedule.usable),
            "seed": spec.seed,
            "global_batch_size": t.global_batch_size,
            "micro_batch_size": t.micro_batch_size,
            "max_tokens_per_micro_batch": t.max_tokens_per_micro_batch,
            "trainer_ranks": spec.trainer_ranks,
            "group_by_length": d.group_by_length,
            "eval_fraction": d.eval_fraction,
            "filter_min_score": d.filter_min_score,
            "filter_min_quantile": d.filter_min_quantile,
        }


def unit_rows(spec: JobSpec, unit: int) -> tuple[int, ...]:
    """The data rows of one scheduled unit: the row itself, or a DPO pair's chosen and rejected rows."""
    return (unit, unit + 1) if spec.objective.kind == "dpo" else (unit,)


def pair_units(usable: tuple[int, ...], lengths: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """DPO's unit of scheduling: a pair, named by its chosen row (2i) and usable when both rows are.

    Returns:
        (usable pairs, per-row lengths where row 2i holds the pair's two lengths summed): the
        schedule batches pairs and packs micro-batches by both sequences' tokens.
    """
    ok = set(usable)
    units = tuple(i for i in usable if i % 2 == 0 and i + 1 in ok)
    pair_lengths = lengths.copy()
    pair_lengths[0::2] += lengths[1::2]
    pair_lengths[1::2] = 0
    return units, pair_lengths


def model_of_role(spec: JobSpec, worlds: Worlds) -> ModelSpec:
    k = worlds.role.model_index
    return spec.model if k is None else spec.aligned_models[k]


def prepare_data(spec: JobSpec, worlds: Worlds, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenize the data for this role's model and agree with all ranks on the usable samples.

    A sample is usable only if every model (target and aligned) keeps at least one response
    token. Unusable rows are counted by reason, written to `data_report/<role>.json`, and the job
    refuses to start when their fraction exceeds `data.max_bad_fraction`.

    Raises:
        DataError: naming the reasons and example rows when too many rows are unusable.
    """
    model = model_of_role(spec, worlds)
    rows = job_rows(spec)
    if not rows:
        raise DataError(f"data.train_files: no rows in {spec.data.train_files}")
    chat = chat_tokenizer(spec, model, tokenizer)
    # One process per node tokenizes while the others wait; all of them memory-map the result.
    samples, report = tokenize_rows(rows, chat, spec.data.resolved_cache_dir(spec.run_dir))

    lengths = samples.lengths()
    # One reduction over every rank gives both the rows every model can use (minimum of 0/1 flags)
    # and the target's token lengths (minimum of the trainers' negated lengths).
    n = len(rows)
    agreed = torch.zeros(2 * n, dtype=torch.int64)
    agreed[:n] = torch.from_numpy(lengths > 0)
    store_scores = None
    if spec.store_only:
        # No reference rank runs: the trainers find which rows the aligned models can use (from
        # the tokenization cache the launch filled) so the usable rows, and the schedule, are
        # those of an online run; the scores come from the store.
        from poft_ds.ds_config import resolve_precision
        from poft_ds.scores import store_score_table

        for m in spec.aligned_models:
            agreed[:n] *= torch.from_numpy(model_lengths(spec, m, rows) > 0).long()
        store_scores = store_score_table(spec, rows, resolve_precision(spec, worlds.device))
    if worlds.role.kind == "trainer":
        agreed[n:] = -torch.from_numpy(lengths).to(torch.int64)
    worlds.bridge_allreduce_min(agreed)
    usable = tuple(np.flatnonzero(agreed[:n].numpy()).tolist())
    target_lengths = (-agreed[n:]).to(torch.int32).numpy()
    if spec.objective.kind == "dpo":
        usable, target_lengths = pair_units(usable, target_lengths)

    role = worlds.role
    units = len(rows) // 2 if spec.objective.kind == "dpo" else len(rows)  # DPO: pairs
    bad = units - len(usable)
    if role.rank == 0:
        out = Path(spec.run_dir) / "data_report" / f"{role.name.replace('/', '_')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "model": model.path,
                    "rows": units,
                    "unusable_here": dict(report.counts),
                    "examples": report.examples,
                    "usable_by_all_models": len(usable),
                    # Usable samples that lost response tokens to max_length, and how many in all.
                    "truncated_responses": {
                        "samples": int(np.count_nonzero(lost := samples.lost_response_tokens())),
                        "tokens": int(lost.sum()),
                    },
                },
                indent=2,
            )
        )
    if bad / units > spec.data.max_bad_fraction:
        reasons = ", ".join(f"{r}: {n} (e.g. {', '.join(report.examples[r][:3])})" for r, n in report.counts.items())
        raise DataError(
            f"{bad} of {units} rows are unusable, more than data.max_bad_fraction="
            f"{spec.data.max_bad_fraction}. Under {role.name}'s tokenizer: {reasons or 'none (see other roles)'}"
        )
    if bad and role.rank == 0:
        print(f"[poft-ds] {role.name}: {bad} of {units} rows unusable, see data_report/", flush=True)

    schedule, eval_rows, kept = build_schedule(spec, rows, usable, target_lengths)
    if kept is not None and role.rank == 0:
        (Path(spec.run_dir) / "data_report" / f"filter_{role.name.replace('/', '_')}.json").write_text(
            json.dumps(kept, indent=2)
        )
        print(f"[poft-ds] score filter: kept {kept['kept']} of {kept['usable']} samples", flush=True)
    t = spec.training
    if spec.trainer_ranks and schedule.steps_per_epoch == 0:
        raise DataError(
            f"training.global_batch_size: {t.global_batch_size} is larger than the {len(schedule.usable)} "
            "usable samples"
        )
    if store_scores is not None:
        # The launch found every score of the schedule in the store; it must not have changed since.
        needed = np.unique(schedule.rows_in_steps(0, schedule.total_steps))
        for k, m in enumerate(spec.aligned_models):
            lacking = needed[np.isnan(store_scores[needed, k])]
            if len(lacking):
                raise DataError(
                    f"reference.mode: store, but the score store lacks {m.name}'s score of {len(lacking)} scheduled "
                    f"samples (e.g. {rows[lacking[0]].where}); it changed since the launch checked it"
                )
    # Nothing returned refers to `rows`: they are freed when this returns.
    return PreparedData(
        samples,
        schedule,
        RowPlaces(rows),
        samples.keys,
        OptionalFloats((r.ref_score for r in rows), len(rows)),
        lengths,
        target_lengths,
        eval_rows,
        store_scores,
    )


def model_lengths(spec: JobSpec, model: ModelSpec, rows: list[Row]) -> np.ndarray:
    """Tokens of every row under a model (0 where it cannot use the row), through the tokenization cache."""
    chat = chat_tokenizer(spec, model)
    samples, _ = tokenize_rows(rows, chat, spec.data.resolved_cache_dir(spec.run_dir))
    return samples.lengths()


def build_schedule(
    spec: JobSpec, rows: list[Row], usable: tuple[int, ...], target_lengths: np.ndarray
) -> tuple[Schedule, tuple[int, ...], dict[str, Any] | None]:
    """The schedule of the rows every model can use: score filters, the hold-out, the batch order.

    Every rank derives it alike, and so does `poft-ds launch` when it checks the score store.

    Returns:
        (schedule, held-out rows, what the score filter kept, or None without a filter).
    """
    kept = None
    if spec.data.filter_min_score is not None or spec.data.filter_min_quantile is not None:
        from poft_ds.scores import filter_by_reference_score

        usable, kept = filter_by_reference_score(spec, rows, usable)
    eval_rows: tuple[int, ...] = ()
    if spec.data.eval_fraction:
        # A seeded hold-out every rank derives alike; it never enters the training schedule.
        g = torch.Generator().manual_seed(spec.seed - 1)
        n_eval = max(1, round(spec.data.eval_fraction * len(usable)))
        picked = set(torch.randperm(len(usable), generator=g)[:n_eval].tolist())
        eval_rows = tuple(u for i, u in enumerate(usable) if i in picked)
        usable = tuple(u for i, u in enumerate(usable) if i not in picked)
    t = spec.training
    schedule = Schedule(
        usable=usable,
        seed=spec.seed,
        global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size,
        trainers=spec.trainer_ranks,
        epochs=t.epochs,
        max_steps=t.max_steps,
        lengths=target_lengths if spec.data.group_by_length or t.max_tokens_per_micro_batch else None,
        max_tokens=t.max_tokens_per_micro_batch,
    )
    return schedule, eval_rows, kept
