"""Figures of a training run, drawn from its `metrics.jsonl` (and `samples.jsonl` for PoFT runs).

`plot_run(run_dir)` writes PNGs into `<run_dir>/plots/`:
  loss.png            loss, cross-entropy (and held-out cross-entropy) against step
  lr_throughput.png   learning rate and tokens/s against step
  weights.png         PoFT only: the per-sample weight distribution over time (+ early vs late histogram)
  scores.png          PoFT only: s_target against s_ref, coloured by step

It reads a live run too: a last line still being written is ignored.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from poft_ds.files import atomic_write

DPI = 100
PIXEL_SIZE = (800, 450)  # (width, height) of every PNG written
MAX_SCATTER_POINTS = 20_000  # more points only slow drawing down; the cloud looks the same

Record = dict[str, Any]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw the figures of one run into `<run_dir>/plots/`.

    Args:
        run_dir: A run directory holding `metrics.jsonl` (and, for PoFT runs, maybe `samples.jsonl`).

    Returns:
        The written PNG paths: loss.png and lr_throughput.png, plus weights.png and scores.png for PoFT runs.

    Raises:
        FileNotFoundError: `metrics.jsonl` does not exist.
        ValueError: `metrics.jsonl` holds no complete line, or a line (other than a partly written
            last one) is not a JSON object with an integer `step`, or a plotted field is not a number.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no such file (is {run_dir} a poft-ds run directory?)")
    metrics = read_jsonl(metrics_path)
    if not metrics:
        raise ValueError(f"{metrics_path}: no complete metrics line yet")
    samples_path = run_dir / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    for i, rec in enumerate(samples):
        _check_sample(rec, samples_path, i)

    figures = {"loss.png": _loss_figure(metrics, metrics_path), "lr_throughput.png": _lr_figure(metrics, metrics_path)}
    # SFT runs log `s_target` too; the per-sample weight is what only PoFT has.
    if any("poft_weight" in rec for rec in metrics):
        figures["weights.png"] = _weights_figure(metrics, metrics_path, samples, samples_path)
        figures["scores.png"] = _scores_figure(metrics, metrics_path, samples, samples_path)

    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        atomic_write(out_dir / name, buf.getvalue())
        paths.append(out_dir / name)
    return paths


def read_jsonl(path: Path) -> list[Record]:
    """The JSON objects of a JSON-lines file, sorted by their `step` (stable).

    A last line that does not parse is a live writer's partial line and is skipped; any other bad
    line raises ValueError naming the file and line number. Blank lines are skipped.
    """
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines):
                break  # cut mid-write by a running job; it will be complete next time
            raise ValueError(f"{path}: line {number} is not valid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(rec).__name__}, not an object")
        if not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
            raise ValueError(f"{path}: line {number} has no integer 'step' (got {rec.get('step')!r})")
        records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def _check_sample(rec: Record, path: Path, index: int) -> None:
    """Reject a samples.jsonl record whose per-sample lists are missing or not parallel."""
    lengths = {}
    for key in ("s_target", "s_ref", "weight"):
        if not isinstance(rec.get(key), list):
            raise ValueError(f"{path}: step {rec['step']}: field {key!r} is missing or not a list")
        lengths[key] = len(rec[key])
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: step {rec['step']}: per-sample lists differ in length: {lengths}")


def _number(value: Any, path: Path, step: int, key: str) -> float:
    """One logged value as a float; null (and NaN) become NaN, anything else non-numeric is an error."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: step {step}: field {key!r} is {value!r}, not a number")
    return float(value)


def _column(records: list[Record], key: str, path: Path) -> np.ndarray:
    """`key` of every record as floats, NaN where it is absent, null or NaN."""
    return np.array([_number(r.get(key), path, r["step"], key) for r in records], dtype=float)


def _per_sample(records: list[Record], key: str, path: Path) -> list[np.ndarray]:
    """The per-sample list `key` of every samples.jsonl record, as float arrays."""
    return [np.array([_number(v, path, r["step"], key) for v in r[key]], dtype=float) for r in records]


def _new_figure(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure of PIXEL_SIZE on its own Agg canvas (no pyplot: nothing global to leak between figures)."""
    fig = Figure(figsize=(PIXEL_SIZE[0] / DPI, PIXEL_SIZE[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _line(ax: Any, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> bool:
    """Plot the finite points of y against x, joined across gaps; False if there are none."""
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.any():
        return False
    ax.plot(x[finite], y[finite], **kwargs)
    return True


def _finish(ax: Any, drawn: int, what: str) -> None:
    """A legend when more than one series is drawn; a note instead of an empty plot when none is."""
    if drawn > 1:
        ax.legend(loc="best", fontsize="small")
    if drawn == 0:
        ax.text(0.5, 0.5, f"no finite {what} logged yet", ha="center", va="center", transform=ax.transAxes)


def _loss_figure(metrics: list[Record], path: Path) -> Figure:
    """Training loss and cross-entropy (and held-out cross-entropy as markers) against step."""
    fig, axes = _new_figure()
    ax = axes[0, 0]
    step = _column(metrics, "step", path)
    drawn = _line(ax, step, _column(metrics, "loss", path), label="loss (objective)")
    drawn += _line(ax, step, _column(metrics, "cross_entropy", path), label="cross-entropy (train)")
    drawn += _line(
        ax, step, _column(metrics, "eval_cross_entropy", path), label="cross-entropy (held-out)", ls="", marker="o"
    )
    ax.set(title="Loss", xlabel="optimizer step", ylabel="nats per token")
    _finish(ax, drawn, "loss")
    return fig


def _lr_figure(metrics: list[Record], path: Path) -> Figure:
    """Learning rate (top) and throughput (bottom) against step, sharing the step axis."""
    fig, axes = _new_figure(2, 1, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    step = _column(metrics, "step", path)
    _finish(top, _line(top, step, _column(metrics, "lr", path), color="C0"), "learning rate")
    top.set(title="Learning rate and throughput", ylabel="learning rate")
    top.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    _finish(bottom, _line(bottom, step, _column(metrics, "tokens_per_s", path), color="C1"), "throughput")
    bottom.set(xlabel="optimizer step", ylabel="tokens / s")
    return fig


def _weights_figure(metrics: list[Record], path: Path, samples: list[Record], samples_path: Path) -> Figure:
    """PoFT weights over time: p10-p90 band, median and mean; plus early-vs-late histogram from samples."""
    fig, axes = _new_figure(1, 2 if samples else 1)
    ax = axes[0, 0]
    step = _column(metrics, "step", path)
    p10, p90 = _column(metrics, "poft_weight/p10", path), _column(metrics, "poft_weight/p90", path)
    band = np.isfinite(step) & np.isfinite(p10) & np.isfinite(p90)
    drawn = 0
    if band.any():
        ax.fill_between(step[band], p10[band], p90[band], alpha=0.3, color="C0", label="p10–p90")
        drawn += 1
    drawn += _line(ax, step, _column(metrics, "poft_weight/p50", path), color="C0", label="median")
    drawn += _line(ax, step, _column(metrics, "poft_weight", path), color="C3", ls="--", label="mean")
    ax.set(title="PoFT sample weights", xlabel="optimizer step", ylabel="weight", ylim=(0, 1))
    _finish(ax, drawn, "weights")

    if samples:
        hist = axes[0, 1]
        weights = _per_sample(samples, "weight", samples_path)
        quarter = max(1, len(samples) // 4)
        bins = np.linspace(0, 1, 41)
        for label, part, color in (("first", slice(0, quarter), "C0"), ("last", slice(-quarter, None), "C3")):
            values = np.concatenate(weights[part])
            values = np.clip(values[np.isfinite(values)], 0, 1)  # out-of-range weights land in the edge bins
            steps = f"steps {samples[part][0]['step']}–{samples[part][-1]['step']}"
            hist.hist(values, bins=bins, density=True, alpha=0.5, color=color, label=f"{label} quarter ({steps})")
        hist.set(title="Per-sample weights: early vs late", xlabel="weight", ylabel="density", xlim=(0, 1))
        hist.legend(loc="best", fontsize="small")
    return fig


def _scores_figure(metrics: list[Record], path: Path, samples: list[Record], samples_path: Path) -> Figure:
    """s_target against s_ref coloured by step, with the diagonal where the target equals the aligned models."""
    if samples:
        s_ref = np.concatenate(_per_sample(samples, "s_ref", samples_path))
        s_target = np.concatenate(_per_sample(samples, "s_target", samples_path))
        step = np.concatenate([np.full(len(r["s_ref"]), r["step"], dtype=float) for r in samples])
        what = "per sample"
    else:
        s_ref, s_target = _column(metrics, "s_ref", path), _column(metrics, "s_target", path)
        step = _column(metrics, "step", path)
        what = "per-step mean"
    finite = np.isfinite(s_ref) & np.isfinite(s_target)
    s_ref, s_target, step = s_ref[finite], s_target[finite], step[finite]

    fig, axes = _new_figure()
    ax = axes[0, 0]
    ax.set(
        xlabel="s_ref (aligned models' mean log-prob per token)", ylabel="s_target (target's mean log-prob per token)"
    )
    if not len(s_ref):
        ax.set_title(f"Target vs aligned-model scores ({what})")
        _finish(ax, 0, "scores")
        return fig
    beats = float(np.mean(s_target > s_ref))  # over every finite point, not just the drawn ones
    if len(s_ref) > MAX_SCATTER_POINTS:
        # Evenly spaced indices: deterministic, and every stretch of the run stays represented.
        keep = np.linspace(0, len(s_ref) - 1, MAX_SCATTER_POINTS).astype(int)
        s_ref, s_target, step = s_ref[keep], s_target[keep], step[keep]
    size = 6 if len(s_ref) > 2000 else 16  # a few per-step means deserve bigger dots than a dense cloud
    dots = ax.scatter(s_ref, s_target, c=step, cmap="viridis", s=size, alpha=0.6, linewidths=0, label=what)
    fig.colorbar(dots, ax=ax, label="optimizer step")
    lo, hi = min(s_ref.min(), s_target.min()), max(s_ref.max(), s_target.max())
    ax.plot([lo, hi], [lo, hi], color="k", ls="--", lw=1, label="s_target = s_ref (above: target beats them)")
    ax.set_title(f"Target vs aligned-model scores ({what}): target ahead on {beats:.0%}")
    ax.legend(loc="best", fontsize="small")
    return fig
