"""Which sample goes where: the order every rank derives on its own, so no index is ever sent.

Each epoch is a seeded shuffle of the usable samples, cut into global batches of
`global_batch_size` (one optimizer step). Position p of a global batch is scored by reference
rank `p % ranks` of each aligned model's group, and trained by one trainer in one of its
micro-batches:

  * fixed micro-batches (`micro_batch_size` samples, right-padded): trainer
    `p // (micro_batch_size * grad_accum)`, micro-batch `(p // micro_batch_size) % grad_accum`;
    with length grouping, the global batch is first reordered so micro-batches hold similar lengths;
  * packed micro-batches (`max_tokens_per_micro_batch`): the global batch is bin-packed by the
    samples' target-token lengths (best-fit decreasing) into as few micro-batches of at most that
    many tokens as fit, and the micro-batches are dealt to the trainers so that each runs the same
    number of passes (ZeRO-3 gathers parameters collectively) with similar token counts.

A reference rank sends each trainer the scores of the positions they share, in the trainer's
order. A final, incomplete global batch of an epoch is not trained on; its size is logged.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Schedule:
    """The job's batch arithmetic.

    Attributes:
        usable: Indices (into the data rows) of samples every model can score.
        seed: Shuffle seed; epoch e uses seed + e.
        global_batch: Samples per optimizer step.
        micro_batch: Samples per trainer forward pass.
        trainers: Trainer ranks.
        epochs: Passes over the data.
        max_steps: Optimizer steps; when set it overrides `epochs` (as in Hugging Face's
            TrainingArguments), cycling through as many epochs as it needs.
        lengths: Per-row target-token lengths. Without `max_tokens`, when given, each global batch
            is grouped by length so fixed micro-batches hold similar lengths (less padding).
        max_tokens: Pack micro-batches to this many tokens (needs `lengths`); `micro_batch` is
            then not used.
    """

    usable: tuple[int, ...]
    seed: int
    global_batch: int
    micro_batch: int
    trainers: int
    epochs: int
    max_steps: int | None = None
    lengths: Sequence[int] | None = None
    max_tokens: int | None = None
    # Packing plans of recent steps (every micro-batch of a step asks, and trainers also plan the
    # next step to receive its scores early), and the current epoch's shuffle: a randperm over
    # every usable row is milliseconds at millions of rows, too much to redraw per call.
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _order: tuple = field(default=(-1, None), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.lengths is None:
            raise ValueError("packing micro-batches to max_tokens needs the samples' lengths")

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.trainers)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.usable) // self.global_batch

    @property
    def leftover_per_epoch(self) -> int:
        return len(self.usable) % self.global_batch

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps else self.steps_per_epoch * self.epochs

    @property
    def total_epochs(self) -> float:
        """Passes over the data the run makes (fractional when max_steps ends mid-epoch)."""
        return self.total_steps / max(self.steps_per_epoch, 1)

    def global_batch_at(self, step: int) -> list[int]:
        """Row indices of optimizer step `step` (0-based), in position order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            object.__setattr__(self, "_order", (epoch, torch.randperm(len(self.usable), generator=g)))
        order = self._order[1][within * self.global_batch : (within + 1) * self.global_batch]
        rows = [self.usable[i] for i in order.tolist()]
        if self.lengths is None or self.max_tokens is not None:
            return rows
        # Longest first (memory problems show at step 1); micro-batch k of that order goes to
        # trainer k % trainers so every trainer gets a similar token count.
        rows.sort(key=lambda r: -self.lengths[r])
        mb = self.micro_batch
        chunks = [rows[k * mb : (k + 1) * mb] for k in range(self.global_batch // mb)]
        return [r for t in range(self.trainers) for m in range(self.grad_accum) for r in chunks[m * self.trainers + t]]

    def micro_batches(self, step: int, trainer: int) -> list[list[int]]:
        """Positions of each micro-batch `trainer` runs at `step`, in order.

        Every trainer gets the same number of micro-batches at a step; with packing some may be
        empty (the trainer then runs an empty pass).
        """
        if self.max_tokens is None:
            mb, per = self.micro_batch, self.micro_batch * self.grad_accum
            return [list(range(trainer * per + m * mb, trainer * per + (m + 1) * mb)) for m in range(self.grad_accum)]
        if step not in self._plans:
            rows = self.global_batch_at(step)
            if len(self._plans) >= 4:
                self._plans.pop(min(self._plans))
            self._plans[step] = pack_positions([int(self.lengths[r]) for r in rows], self.max_tokens, self.trainers)
        return self._plans[step][trainer]

    def trainer_positions(self, trainer: int, step: int) -> list[int]:
        """Positions of a global batch that `trainer` consumes at `step`, in micro-batch order."""
        return [p for m in self.micro_batches(step, trainer) for p in m]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def rows_in_steps(self, start: int, stop: int) -> np.ndarray:
        """Row indices of steps [start, stop), in step order (each epoch's shuffle drawn once)."""
        usable = np.asarray(self.usable, dtype=np.int64)
        out, spe, g_size = [np.empty(0, dtype=np.int64)], self.steps_per_epoch, self.global_batch
        for epoch in range(self.epoch_of(start), self.epoch_of(stop - 1) + 1 if stop > start else 0):
            order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
            a, b = max(start - epoch * spe, 0), min(stop - epoch * spe, spe)
            out.append(usable[order[a * g_size : b * g_size]])
        return np.concatenate(out)


def pack_positions(lengths: list[int], max_tokens: int, trainers: int) -> list[list[list[int]]]:
    """Bin-pack a global batch into micro-batches of at most `max_tokens` tokens, dealt to trainers.

    Best-fit decreasing: each sample, longest first, goes into the fullest micro-batch it still
    fits in (a sample longer than the budget gets one of its own). The micro-batches, largest
    first, then go to the trainer with the fewest tokens among those with fewer than
    ceil(micro-batches / trainers), so every trainer runs as many passes, padded with empty ones.
    Ties are broken by position, so every rank derives the same plan.

    Args:
        lengths: Tokens of each position of the global batch.
        max_tokens: Token budget of one micro-batch.
        trainers: Trainer ranks.

    Returns:
        Per trainer, its micro-batches (largest first), each a sorted list of positions.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin), sorted: the fullest bin that fits is found by bisection
    for p in sorted(range(len(lengths)), key=lambda p: (-lengths[p], p)):
        k = bisect.bisect_left(room, (lengths[p], -1))
        if k < len(room):
            left, b = room.pop(k)
        else:
            left, b = max_tokens, len(bins)
            bins.append([])
        bins[b].append(p)
        bisect.insort(room, (left - lengths[p], b))
    size = [sum(lengths[p] for p in b) for b in bins]
    passes = -(-len(bins) // trainers)
    load = [(0, t) for t in range(trainers)]  # (tokens, trainer), a heap
    plan: list[list[list[int]]] = [[] for _ in range(trainers)]
    for b in sorted(range(len(bins)), key=lambda b: (-size[b], b)):
        full = []
        while True:
            tokens, t = heapq.heappop(load)
            if len(plan[t]) < passes:
                break
            full.append((tokens, t))
        plan[t].append(sorted(bins[b]))
        heapq.heappush(load, (tokens + size[b], t))
        for item in full:
            heapq.heappush(load, item)
    for t in range(trainers):
        plan[t] += [[] for _ in range(passes - len(plan[t]))]
    return plan


def reference_positions(global_batch: int, ranks: int, rank: int) -> list[int]:
    """Positions of a global batch that reference rank `rank` of a `ranks`-rank group scores."""
    return list(range(rank, global_batch, ranks))


def shared_positions(schedule: Schedule, step: int, trainer: int, ranks: int, rank: int) -> list[int]:
    """Positions trainer `trainer` needs from reference rank `rank` (of `ranks`) at `step`, in its order."""
    return [p for p in schedule.trainer_positions(trainer, step) if p % ranks == rank]


def length_grouped_batches(items: list[int], length: Callable[[int], int], batch_size: int) -> list[list[int]]:
    """Cut items into batches of similar length (sorted, longest first), to cut padding."""
    ordered = sorted(items, key=lambda i: -length(i))
    return [ordered[k : k + batch_size] for k in range(0, len(ordered), batch_size)]
