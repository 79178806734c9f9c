"""Prepare a role's data: read the rows, tokenize them under this role's model, agree with every
other rank on the usable samples, and derive the schedule."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from poft_ds.data.chat import ChatTokenizer, TokenizedSample
from poft_ds.data.rows import DataError, load_rows
from poft_ds.data.schedule import Schedule
from poft_ds.data.tokenize import tokenize_rows
from poft_ds.distributed import Worlds
from poft_ds.score_store import sample_key
from poft_ds.spec import JobSpec, ModelSpec


@dataclass
class PreparedData:
    """This role's view of the data.

    Attributes:
        samples: One entry per data row; None where this role's model cannot use the row.
        schedule: The batch order every rank agrees on.
        where: "file:line" of every row, for logs and score dumps.
        keys: Content hash of every row (score store key); None for unusable rows.
        ref_scores: Precomputed reference scores from the data (`data.reference_score_column`).
        eval_rows: Held-out rows (`data.eval_fraction`), never trained on.
    """

    samples: list[TokenizedSample | None]
    schedule: Schedule
    where: list[str]
    keys: list[str | None]
    ref_scores: list[float | None]
    eval_rows: tuple[int, ...] = ()

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
            "trainer_ranks": spec.trainer_ranks,
            "group_by_length": d.group_by_length,
            "eval_fraction": d.eval_fraction,
            "filter_min_score": d.filter_min_score,
            "filter_min_quantile": d.filter_min_quantile,
        }


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
    rows = load_rows(spec.data.sources, spec.seed, spec.data.reference_score_column)
    if not rows:
        raise DataError(f"data.train_files: no rows in {spec.data.train_files}")
    chat = ChatTokenizer(tokenizer, model.max_length, model.chat_template, model.truncation)
    # Ranks of a role compute the same result; the cache file is replaced atomically, so they may race.
    samples, report = tokenize_rows(rows, chat, spec.data.resolved_cache_dir(spec.run_dir))

    ok = torch.tensor([s is not None for s in samples], dtype=torch.uint8)
    worlds.bridge_allreduce_min(ok)
    usable = tuple(i for i, v in enumerate(ok.tolist()) if v)

    role = worlds.role
    bad = len(rows) - len(usable)
    if role.rank == 0:
        out = Path(spec.run_dir) / "data_report" / f"{role.name.replace('/', '_')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "model": model.path,
                    "rows": len(rows),
                    "unusable_here": dict(report.counts),
                    "examples": report.examples,
                    "usable_by_all_models": len(usable),
                    # Usable samples that lost response tokens to max_length, and how many in all.
                    "truncated_responses": {
                        "samples": sum(1 for s in samples if s and s.lost_response_tokens),
                        "tokens": sum(s.lost_response_tokens for s in samples if s),
                    },
                },
                indent=2,
            )
        )
    if bad / len(rows) > spec.data.max_bad_fraction:
        reasons = ", ".join(f"{r}: {n} (e.g. {', '.join(report.examples[r][:3])})" for r, n in report.counts.items())
        raise DataError(
            f"{bad} of {len(rows)} rows are unusable, more than data.max_bad_fraction="
            f"{spec.data.max_bad_fraction}. Under {role.name}'s tokenizer: {reasons or 'none (see other roles)'}"
        )
    if bad and role.rank == 0:
        print(f"[poft-ds] {role.name}: {bad} of {len(rows)} rows unusable, see data_report/", flush=True)

    if spec.data.filter_min_score is not None or spec.data.filter_min_quantile is not None:
        from poft_ds.scores import filter_by_reference_score

        usable, kept = filter_by_reference_score(spec, rows, usable)
        if role.rank == 0:
            (Path(spec.run_dir) / "data_report" / f"filter_{role.name.replace('/', '_')}.json").write_text(
                json.dumps(kept, indent=2)
            )
            print(f"[poft-ds] score filter: kept {kept['kept']} of {kept['usable']} samples", flush=True)

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
        lengths=tuple(sum(len(m["content"]) for m in r.messages or []) for r in rows)
        if spec.data.group_by_length
        else None,
    )
    if spec.trainer_ranks and schedule.steps_per_epoch == 0:
        raise DataError(
            f"training.global_batch_size: {t.global_batch_size} is larger than the {len(usable)} usable samples"
        )
    keys = [sample_key(r.messages) if r.messages else None for r in rows]
    return PreparedData(samples, schedule, [r.where for r in rows], keys, [r.ref_score for r in rows], eval_rows)
