"""`poft_ds.plot`: figures from hand-made run directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from poft_ds.plot import PIXEL_SIZE, plot_run

BASE = ["loss.png", "lr_throughput.png"]
POFT = [*BASE, "weights.png", "scores.png"]


def _metrics(steps: int, poft: bool, scale: float) -> list[dict[str, Any]]:
    """Made-up metrics: a decaying loss, warmup-then-decay lr, NaN and null mixed in."""
    out = []
    for s in range(1, steps + 1):
        loss = scale * (2.0 * math.exp(-s / 15) + 0.5)
        rec: dict[str, Any] = {
            "step": s,
            "epoch": (s - 1) // 20,
            "loss": math.nan if s == 7 else loss,
            "cross_entropy": None if s == 9 else loss * 1.1,
            "lr": 1e-5 * min(1.0, s / 5) * (1 - s / (steps + 1)),
            "grad_norm": None if s % 11 == 0 else 1.0 / s,
            "tokens": 4096,
            "step_time_s": 0.5,
            "tokens_per_s": math.nan if s == 3 else 8000 + 500 * math.sin(s * scale),
            "wait_for_scores_s": 0.01,
            "compute_s": 0.45,
            "checkpoint_s": 0.0,
            "peak_memory_bytes": 2**30,
        }
        if s % 10 == 0:
            rec |= {"eval_cross_entropy": loss * 1.2, "eval_s_target": -loss}
        if poft:
            w = min(0.95, 0.3 + scale * s / (2 * steps))
            rec |= {
                "poft_weight": w,
                "poft_weight/p10": max(0.0, w - 0.2),
                "poft_weight/p50": None if s == 5 else w,
                "poft_weight/p90": math.nan if s == 6 else min(1.0, w + 0.2),
                "s_target": -loss,
                "s_ref": -1.2 * scale,
                "target_beats_ref": 0.5,
                "s_ref/aligned-a": -1.1 * scale,
                "s_ref/aligned-b": -1.3 * scale,
                "ref_busy_fraction": 0.4,
                "ref_tokens_per_s": 20000.0,
            }
        out.append(rec)
    return out


def _samples(steps: int, per_step: int, scale: float) -> list[dict[str, Any]]:
    """Per-sample scores whose weights drift upwards as the made-up target learns."""
    rng = np.random.default_rng(0)
    out = []
    for s in range(1, steps + 1):
        s_ref = rng.normal(-1.2 * scale, 0.3, per_step)
        s_target = s_ref + rng.normal(-0.5 + s / steps, 0.3, per_step)
        weight = 1 / (1 + np.exp(-(s_target - s_ref) * 3))
        rec = {
            "step": s,
            "row": list(range(s * per_step, (s + 1) * per_step)),
            "s_target": s_target.tolist(),
            "s_ref": s_ref.tolist(),
            "weight": weight.tolist(),
        }
        rec["s_target"][0] = math.nan if s == 2 else rec["s_target"][0]
        rec["weight"][1] = None if s == 4 else rec["weight"][1]
        out.append(rec)
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run_dir(
    root: Path, *, poft: bool = True, samples: bool = True, scale: float = 1.0, steps: int = 40, per_step: int = 16
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "metrics.jsonl", _metrics(steps, poft, scale))
    if samples:
        _write_jsonl(root / "samples.jsonl", _samples(steps, per_step, scale))
    return root


def _load(path: Path) -> np.ndarray:
    """Decode a PNG fully (verify, then reopen: verify leaves the image unusable)."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_drawn(pixels: np.ndarray) -> None:
    """A real plot: the expected size, many colours (anti-aliased lines, fills), a fair share of ink."""
    assert (pixels.shape[1], pixels.shape[0]) == PIXEL_SIZE
    colours = np.unique(pixels.reshape(-1, 3).astype(np.int32) @ [1 << 16, 1 << 8, 1])
    assert len(colours) > 100, f"only {len(colours)} distinct colours: nothing much drawn"
    ink = np.any(pixels < 235, axis=2).mean()
    assert ink > 0.03, f"only {ink:.1%} of the pixels are not background"


def test_poft_run_writes_four_readable_plots(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    paths = plot_run(str(run))  # a plain string is accepted too
    assert [p.name for p in paths] == POFT
    assert all(p.parent == run / "plots" for p in paths)
    # Nothing else is left behind (no temp files from the atomic writes).
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(POFT)
    for p in paths:
        _assert_drawn(_load(p))


def test_plots_depend_on_the_data(tmp_path: Path) -> None:
    """Two runs with different numbers give different plot areas: the data is actually drawn."""
    a = plot_run(_run_dir(tmp_path / "a", scale=1.0))
    b = plot_run(_run_dir(tmp_path / "b", scale=2.5))
    w, h = PIXEL_SIZE
    for pa, pb in zip(a, b):
        # The inner area, away from titles and tick labels.
        inner_a = _load(pa)[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        inner_b = _load(pb)[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        differing = np.any(inner_a != inner_b, axis=2).mean()
        assert differing > 0.005, f"{pa.name}: plot area barely changes with the data ({differing:.2%})"


def test_loss_line_is_drawn_in_its_colour(tmp_path: Path) -> None:
    """The loss series (matplotlib's first colour, #1f77b4) covers a visible number of pixels."""
    pixels = _load(plot_run(_run_dir(tmp_path / "run", poft=False))[0])
    blue = np.all(np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]) < 30, axis=2).sum()
    assert blue > 300, f"only {blue} pixels in the loss line's colour"


def test_sft_run_gets_only_loss_and_lr(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "sft", poft=False, samples=False)
    paths = plot_run(run)
    assert [p.name for p in paths] == BASE
    assert sorted(p.name for p in (run / "plots").iterdir()) == BASE
    for p in paths:
        _assert_drawn(_load(p))


def test_poft_run_without_samples_uses_per_step_means(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", samples=False)
    paths = plot_run(run)
    assert [p.name for p in paths] == POFT
    for p in paths:
        _assert_drawn(_load(p))
    # With samples, weights.png gains the histogram panel: the images must differ.
    with_samples = plot_run(_run_dir(tmp_path / "run2"))
    assert (run / "plots" / "weights.png").read_bytes() != with_samples[2].read_bytes()


def test_large_scatter_is_subsampled_deterministically(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "big", steps=30, per_step=1000)  # 30,000 points > the 20,000 cap
    first = plot_run(run)[3].read_bytes()
    assert plot_run(run)[3].read_bytes() == first
    _assert_drawn(_load(run / "plots" / "scores.png"))


def test_missing_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_run(tmp_path)


def test_empty_metrics_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        plot_run(tmp_path)


def test_malformed_middle_line_names_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _metrics(5, poft=False, scale=1.0)]
    lines[2] = lines[2][:-10]  # line 3 cut short, with complete lines after it
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 3\b"):
        plot_run(tmp_path)


def test_malformed_samples_line_names_file_and_line(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    lines = (run / "samples.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl: line 2\b"):
        plot_run(run)


def test_non_numeric_field_names_file_and_field(tmp_path: Path) -> None:
    records = _metrics(5, poft=False, scale=1.0)
    records[3]["loss"] = "high"
    _write_jsonl(tmp_path / "metrics.jsonl", records)
    with pytest.raises(ValueError, match=r"metrics\.jsonl: step 4: field 'loss'"):
        plot_run(tmp_path)


def test_truncated_last_line_of_a_live_run_is_ignored(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "live")
    for name in ("metrics.jsonl", "samples.jsonl"):
        text = (run / name).read_text()
        (run / name).write_text(text + text.splitlines()[-1][:25])  # a writer mid-line, no newline yet
    paths = plot_run(run)
    assert [p.name for p in paths] == POFT
    for p in paths:
        _assert_drawn(_load(p))


def test_all_nan_series_do_not_crash(tmp_path: Path) -> None:
    """A single logged step whose values are all NaN or null still gives readable (annotated) figures."""
    rec = {k: (None if i % 2 else math.nan) for i, k in enumerate(_metrics(1, poft=True, scale=1.0)[0])}
    rec["step"] = 1
    _write_jsonl(tmp_path / "metrics.jsonl", [rec])
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == POFT
    for p in paths:
        assert _load(p).shape[:2] == (PIXEL_SIZE[1], PIXEL_SIZE[0])
