"""Looking at stored reference scores: per-model distributions, agreement, worst samples, export.

Single-process tools over the score store (`poft-ds scores show|export job.yaml`). A sample's
stored score is found by its content hash and its scorer (model files, template, max length,
truncation, precision), exactly as the reference ranks wrote it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poft_ds.data.chat import load_tokenizer
from poft_ds.data.rows import DataError, Row, job_rows, load_rows
from poft_ds.files import atomic_write
from poft_ds.loss import aggregate_reference_scores
from poft_ds.score_store import ScoreStore, model_fingerprint, sample_key, scorer_id
from poft_ds.spec import JobSpec, SpecError


def stored_scores(
    spec: JobSpec, rows: list[Row] | None = None, precisions: list[str] | None = None
) -> tuple[list[Row], dict[str, list[float | None]]]:
    """Every row of the job's data, and each aligned model's stored score of it (None if absent).

    The precision a score was computed in is part of its identity; with `training.precision: auto`
    the bf16 (GPU) scores are preferred and fp32 (CPU) scores used where those are missing, unless
    `precisions` names the one to read.
    """
    rows = rows if rows is not None else job_rows(spec)
    keys = [sample_key(r.messages) if r.messages else None for r in rows]
    root = spec.score_store.resolved_dir(spec.run_dir)
    if precisions is None:
        precisions = ["bf16", "fp32"] if spec.training.precision == "auto" else [spec.training.precision]
    out: dict[str, list[float | None]] = {}
    for m in spec.aligned_models:
        fp = model_fingerprint(m.path, root / ".fingerprints.json")
        template = m.chat_template or load_tokenizer(m).chat_template
        known: dict[str, tuple[float, int]] = {}
        for precision in reversed(precisions):  # preferred precision last, so it wins
            sid = scorer_id(fp, template, m.max_length, m.truncation, precision, spec.objective.kind == "dpo")
            if (root / sid).is_dir():
                known |= ScoreStore(root, sid).load()
        out[m.name] = [known[k][0] if k in known else None for k in keys]
    return rows, out


def _rank(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two score lists (ties broken by order)."""
    ra, rb = _rank(torch.tensor(a, dtype=torch.float64)), _rank(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def scores_report(spec: JobSpec, lowest: int = 10, png: Path | None = None) -> dict[str, Any]:
    """Distributions per aligned model, pairwise rank correlations, and the lowest-scored samples.

    Args:
        spec: The job.
        lowest: How many of the lowest s_ref samples to list (likely bad data).
        png: Where to draw a histogram of each model's scores (needs matplotlib).
    """
    rows, per_model = stored_scores(spec)
    complete = [i for i in range(len(rows)) if all(v[i] is not None for v in per_model.values())]
    report: dict[str, Any] = {"rows": len(rows), "scored_by_every_model": len(complete), "models": {}}
    for name, values in per_model.items():
        got = sorted(v for v in values if v is not None)
        report["models"][name] = {
            "scored": len(got),
            "missing": len(values) - len(got),
            **(
                {
                    "mean": statistics.fmean(got),
                    "std": statistics.pstdev(got),
                    "min": got[0],
                    "p05": got[int(0.05 * (len(got) - 1))],
                    "median": statistics.median(got),
                    "p95": got[int(0.95 * (len(got) - 1))],
                    "max": got[-1],
                }
                if got
                else {}
            ),
        }
    names = list(per_model)
    report["rank_correlation"] = {
        f"{a}~{b}": spearman([per_model[a][i] for i in complete], [per_model[b][i] for i in complete])
        for k, a in enumerate(names)
        for b in names[k + 1 :]
        if len(complete) > 1
    }
    if complete:
        matrix = torch.tensor([[per_model[n][i] for n in names] for i in complete], dtype=torch.float64)
        s_ref = aggregate_reference_scores(matrix, spec.objective.aggregation).tolist()
        worst = sorted(zip(s_ref, complete))[:lowest]
        report["lowest"] = [
            {"where": rows[i].where, "s_ref": s, "first_turn": rows[i].messages[0]["content"][:200]} for s, i in worst
        ]
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, values in per_model.items():
            ax.hist([v for v in values if v is not None], bins=40, alpha=0.5, label=name)
        ax.set_xlabel("mean response-token log-probability")
        ax.set_ylabel("samples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
        report["histogram"] = str(png)
    return report


def export_scores(spec: JobSpec, out: Path, column: str = "mean_log_llm_probs") -> int:
    """Write every fully scored row as a dataset: its conversation, each model's score, and s_ref.

    The file trains with no reference ranks through `data.reference_score_column: <column>`.

    Returns:
        Rows written.
    """
    rows, per_model = stored_scores(spec)
    # A source with `weight` repeats its rows in the schedule; the data set holds each row once.
    first = {rows[i].where: i for i in reversed(range(len(rows)))}
    keep = [i for i in sorted(first.values()) if rows[i].messages and all(v[i] is not None for v in per_model.values())]
    names = list(per_model)
    matrix = torch.tensor([[per_model[n][i] for n in names] for i in keep], dtype=torch.float64).reshape(len(keep), -1)
    s_ref = aggregate_reference_scores(matrix, spec.objective.aggregation).tolist() if keep else []
    table = {
        "messages": [rows[i].messages for i in keep],
        "source": [rows[i].where for i in keep],
        column: s_ref,
    } | {f"score/{n}": [per_model[n][i] for i in keep] for n in names}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        lines = (json.dumps({k: v[j] for k, v in table.items()}, ensure_ascii=False) + "\n" for j in range(len(keep)))
        data = "".join(lines).encode()
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(table), sink)
        data = sink.getvalue().to_pybytes()
    atomic_write(out, data)  # a complete file or none: never half of one
    return len(keep)


def filter_by_reference_score(
    spec: JobSpec, rows: list[Row], usable: tuple[int, ...]
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Keep the usable rows whose s_ref passes `data.filter_min_score` / `data.filter_min_quantile`.

    s_ref comes from `data.reference_score_column` or, for aligned models, from the score store
    (fill it first with `poft-ds score`).

    Raises:
        DataError: when a usable row has no score to filter on.
    """
    d = spec.data
    if d.reference_score_column:
        s_ref = {i: rows[i].ref_score for i in usable}
    else:
        _, per_model = stored_scores(spec, rows)
        missing = [i for i in usable if any(v[i] is None for v in per_model.values())]
        if missing:
            raise DataError(
                f"data.filter_*: {len(missing)} usable rows have no stored score (e.g. {rows[missing[0]].where}); "
                "run `poft-ds score` on this job first"
            )
        matrix = torch.tensor([[v[i] for v in per_model.values()] for i in usable], dtype=torch.float64)
        s_ref = dict(zip(usable, aggregate_reference_scores(matrix, spec.objective.aggregation).tolist()))
    threshold = -float("inf")
    if d.filter_min_score is not None:
        threshold = d.filter_min_score
    if d.filter_min_quantile is not None:
        ordered = sorted(s_ref.values())
        threshold = max(threshold, ordered[int(d.filter_min_quantile * (len(ordered) - 1))])
    kept = tuple(i for i in usable if s_ref[i] >= threshold)
    return kept, {
        "threshold": threshold,
        "usable": len(usable),
        "kept": len(kept),
        "dropped": len(usable) - len(kept),
        "dropped_examples": [rows[i].where for i in usable if s_ref[i] < threshold][:10],
    }


def launch_precision(spec: JobSpec) -> str:
    """The precision the ranks will score in, as seen from the launching machine.

    `training.precision: auto` resolves on each rank's device; a launch decides on this machine's,
    so set the precision explicitly when launching GPU ranks from a machine without a GPU.
    """
    if spec.training.precision != "auto":
        return spec.training.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def store_coverage(spec: JobSpec) -> tuple[bool, str]:
    """Whether the score store holds every aligned model's score of every sample the schedule trains.

    The schedule is derived as the ranks derive it: the rows every model (target and aligned) can
    use, found by tokenizing under each model through the tokenization cache the ranks then read,
    the score filters and the hold-out, and the steps up to `max_steps` or the last epoch. This
    runs only when each aligned model has some stored scores (otherwise the answer is no at once).

    Returns:
        (covered, a one-line account of what is stored and what is missing).
    """
    from poft_ds.data.prepare import build_schedule, model_lengths

    precision = launch_precision(spec)
    rows = load_rows(spec.data.sources, spec.seed, spec.data.reference_score_column)
    _, per_model = stored_scores(spec, rows, precisions=[precision])
    empty = [name for name, values in per_model.items() if all(v is None for v in values)]
    if empty:
        return False, f"the score store has no {precision} score of {', '.join(empty)}"
    target = model_lengths(spec, spec.model, rows)
    ok = target > 0
    for m in spec.aligned_models:
        ok &= model_lengths(spec, m, rows) > 0
    schedule, _, _ = build_schedule(spec, rows, tuple(np.flatnonzero(ok).tolist()), target)
    if schedule.steps_per_epoch == 0:
        return False, "no full global batch of usable samples (the ranks will say more)"
    needed = np.unique(schedule.rows_in_steps(0, schedule.total_steps)).tolist()
    missing = {name: sum(1 for i in needed if values[i] is None) for name, values in per_model.items()}
    if any(missing.values()):
        lacking = ", ".join(f"{k}: {v}" for k, v in missing.items() if v)
        return False, f"the score store lacks {precision} scores of the {len(needed)} scheduled samples ({lacking})"
    return True, f"the score store holds every {precision} score of the {len(needed)} scheduled samples"


def reference_plan(spec: JobSpec) -> tuple[JobSpec, str | None]:
    """The job as it will launch: with reference ranks, or store-only when every score is stored.

    Returns:
        (the spec to launch, with `reference.mode: store` when no reference rank is needed; a line
        saying which and why, or None when the job has no aligned models to decide for).

    Raises:
        SpecError: with `reference.mode: store` when the store lacks a score.
    """
    if spec.objective.kind == "dpo":
        # The trainers need the reference's log-probability sums and token counts, which the
        # reference ranks send; they read their own scores from the store when it has them.
        return spec, "DPO: the reference model's ranks serve its log-probabilities (from the store where it has them)"
    if spec.objective.kind != "poft" or not spec.aligned_models or spec.data.reference_score_column:
        return spec, None
    if spec.reference.mode == "online":
        return spec, "reference.mode: online: reference ranks score while the trainers train"
    if not spec.score_store.enabled:
        return spec, "reference ranks score every sample: score_store.enabled is false"
    covered, why = store_coverage(spec)
    if spec.reference.mode == "store" and not covered:
        raise SpecError(f"reference.mode: store, but {why}; run `poft-ds score` first or use mode auto")
    if not covered:
        return spec, f"reference ranks start: {why} (reference.mode: auto)"
    launch = spec.model_copy(update={"reference": spec.reference.model_copy(update={"mode": "store"})})
    launch._templated = spec._templated
    return launch, (
        f"no reference ranks start: {why}; {launch.world_size} trainer processes train from it "
        f"(reference.mode: {spec.reference.mode})"
    )


def store_score_table(spec: JobSpec, rows: list[Row], precision: str) -> np.ndarray:
    """[rows, aligned models] stored scores in `precision`, NaN where absent (store-only trainers)."""
    _, per_model = stored_scores(spec, rows, precisions=[precision])
    table = np.array([[np.nan if v is None else v for v in values] for values in per_model.values()])
    return table.T.reshape(len(rows), len(per_model))
