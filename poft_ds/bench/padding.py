"""Benchmarks, run as `poft-ds bench <name> --out result.json`; they report ratios, not timings.

`padding`: how many of the tokens a scoring or training pass processes are real (not padding),
on a log-normal length distribution like chat SFT data, for the batchings poft-ds offers
(padding-free packing to a token budget; right-padded length-grouped batches) against padding
every sample to max_length and against unsorted batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from poft_ds.data.schedule import Schedule, length_grouped_batches, pack_positions, reference_positions


def _efficiency(batches: list[list[int]], lengths: list[int], width: int | None = None) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(len(b) * (width or max(lengths[i] for i in b)) for b in batches if b)
    return real / processed


def _packed_efficiency(batches: list[list[int]], lengths: list[int]) -> float:
    """Packed batches process exactly their samples' tokens; an empty pass processes 2 tokens."""
    real = sum(lengths[i] for b in batches for i in b)
    return real / max(sum(sum(lengths[i] for i in b) or 2 for b in batches), 1)


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
    max_tokens: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """Real tokens / processed tokens for scoring and training batches.

    Lengths are drawn log-normally (median `median_tokens`) and clipped to [16, max_length].
    Scoring batches are cut the way reference ranks cut them (`length_grouped_batches` of each
    rank's share of every global batch); training micro-batches come from `Schedule` with and
    without length grouping, and packed to `max_tokens`, where an empty pass (a trainer with fewer
    micro-batches than another) processes the 2 tokens poft-ds runs for it.
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
    grouped_scoring, unsorted_scoring, packed_scoring = [], [], []
    for step in range(plain.total_steps):
        rows = plain.global_batch_at(step)
        step_bins = []
        for r in range(reference_ranks):
            share = [rows[p] for p in reference_positions(global_batch, reference_ranks, r)]
            grouped_scoring += length_grouped_batches(share, lengths.__getitem__, score_batch_size)
            unsorted_scoring += [share[k : k + score_batch_size] for k in range(0, len(share), score_batch_size)]
            (bins,) = pack_positions([lengths[i] for i in share], max_tokens, 1)
            step_bins.append([[share[k] for k in b] for b in bins])
        # The ranks of a group run as many passes as the busiest one; the others run empty ones.
        passes = max(len(b) for b in step_bins)
        packed_scoring += [b for bins in step_bins for b in bins] + [[]] * sum(passes - len(b) for b in step_bins)

    def micro_batches(s: Schedule) -> list[list[int]]:
        out = []
        for step in range(s.total_steps):
            rows = s.global_batch_at(step)
            out += [rows[k : k + micro_batch] for k in range(0, global_batch, micro_batch)]
        return out

    packed = Schedule(usable, seed, global_batch, 1, trainers, 1, lengths=lengths, max_tokens=max_tokens)
    real = processed = passes = 0
    for step in range(packed.total_steps):
        rows = packed.global_batch_at(step)
        for t in range(trainers):
            for m in packed.micro_batches(step, t):
                tokens = sum(lengths[rows[p]] for p in m)
                real, processed, passes = real + tokens, processed + (tokens or 2), passes + 1

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
            "max_tokens": max_tokens,
            "seed": seed,
        },
        "observed_median_tokens": sorted(lengths)[n_samples // 2],
        "scoring": {
            "pad_to_max_length": _efficiency(unsorted_scoring, lengths, max_length),
            "pad_to_longest_unsorted": _efficiency(unsorted_scoring, lengths),
            "length_grouped": _efficiency(grouped_scoring, lengths),
            "packed": _packed_efficiency(packed_scoring, lengths),
        },
        "training": {
            "pad_to_max_length": _efficiency(micro_batches(plain), lengths, max_length),
            "pad_to_longest_unsorted": _efficiency(micro_batches(plain), lengths),
            "length_grouped": _efficiency(micro_batches(schedule(True)), lengths),
            "packed": real / processed,
            "packed_passes_per_step": passes / (packed.total_steps * trainers),
        },
    }
