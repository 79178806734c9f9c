"""Benchmarks, run as `poft-ds bench <name> --out result.json`; they report ratios, not timings.

`padding`: how many of the tokens a scoring or training pass processes are real (not padding),
on a log-normal length distribution like chat SFT data, for the batching poft-ds uses (length
grouped) against padding every sample to max_length and against unsorted batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from poft_ds.data.schedule import Schedule, length_grouped_batches, reference_positions


def _efficiency(batches: list[list[int]], lengths: list[int], width: int | None = None) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(len(b) * (width or max(lengths[i] for i in b)) for b in batches if b)
    return real / processed


def padding_efficiency(
    n_samples: int = 8192,
    median_tokens: int = 800,
    sigma: float = 0.7,
    max_length: int = 4096,
    global_batch: int = 512,
    reference_ranks: int = 2,
    score_batch_size: int = 8,
    trainers: int = 8,
    micro_batch: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Real tokens / processed tokens for scoring and training batches.

    Lengths are drawn log-normally (median `median_tokens`) and clipped to [16, max_length].
    Scoring batches are cut the way reference ranks cut them (`length_grouped_batches` of each
    rank's share of every global batch); training micro-batches come from `Schedule` with and
    without length grouping.
    """
    g = torch.Generator().manual_seed(seed)
    draws = torch.empty(n_samples, dtype=torch.float64).log_normal_(math.log(median_tokens), sigma, generator=g)
    lengths = draws.clamp(16, max_length).round().long().tolist()
    usable = tuple(range(n_samples))

    def schedule(grouped: bool) -> Schedule:
        return Schedule(
            usable, seed, global_batch, micro_batch, trainers, epochs=1, lengths=tuple(lengths) if grouped else None
        )

    plain = schedule(False)
    grouped_scoring, unsorted_scoring = [], []
    for step in range(plain.total_steps):
        rows = plain.global_batch_at(step)
        for r in range(reference_ranks):
            share = [rows[p] for p in reference_positions(global_batch, reference_ranks, r)]
            grouped_scoring += length_grouped_batches(share, lengths.__getitem__, score_batch_size)
            unsorted_scoring += [share[k : k + score_batch_size] for k in range(0, len(share), score_batch_size)]

    def micro_batches(s: Schedule) -> list[list[int]]:
        out = []
        for step in range(s.total_steps):
            rows = s.global_batch_at(step)
            out += [rows[k : k + micro_batch] for k in range(0, global_batch, micro_batch)]
        return out

    return {
        "config": {
            "n_samples": n_samples,
            "median_tokens": median_tokens,
            "sigma": sigma,
            "max_length": max_length,
            "global_batch": global_batch,
            "reference_ranks": reference_ranks,
            "score_batch_size": score_batch_size,
            "trainers": trainers,
            "micro_batch": micro_batch,
            "seed": seed,
        },
        "observed_median_tokens": sorted(lengths)[n_samples // 2],
        "scoring": {
            "pad_to_max_length": _efficiency(unsorted_scoring, lengths, max_length),
            "pad_to_longest_unsorted": _efficiency(unsorted_scoring, lengths),
            "length_grouped": _efficiency(grouped_scoring, lengths),
        },
        "training": {
            "pad_to_max_length": _efficiency(micro_batches(plain), lengths, max_length),
            "pad_to_longest_unsorted": _efficiency(micro_batches(plain), lengths),
            "length_grouped": _efficiency(micro_batches(schedule(True)), lengths),
        },
    }
