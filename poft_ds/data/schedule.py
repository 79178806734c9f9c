"""Which sample goes where: the order every rank derives on its own, so no index is ever sent.

Each epoch is a seeded shuffle of the usable samples, cut into global batches of
`global_batch_size` (one optimizer step). Inside a global batch, position p belongs to

  * trainer `p // (micro_batch_size * grad_accum)`, micro-batch `(p // micro_batch_size) % grad_accum`;
  * reference rank `p % ranks` of each aligned model's group.

A reference rank sends each trainer the scores of the positions they share, in position order.
A final, incomplete global batch of an epoch is not trained on; its size is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
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
        lengths: Optional per-row sizes (tokenizer-independent, e.g. characters); when given, each
            global batch is grouped by length so micro-batches hold similar lengths (less padding).
    """

    usable: tuple[int, ...]
    seed: int
    global_batch: int
    micro_batch: int
    trainers: int
    epochs: int
    max_steps: int | None = None
    lengths: tuple[int, ...] | None = None

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
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.usable), generator=g)[
            within * self.global_batch : (within + 1) * self.global_batch
        ]
        rows = [self.usable[i] for i in order.tolist()]
        if self.lengths is None:
            return rows
        # Longest first (memory problems show at step 1); micro-batch k of that order goes to
        # trainer k % trainers so every trainer gets a similar token count.
        rows.sort(key=lambda r: -self.lengths[r])
        mb = self.micro_batch
        chunks = [rows[k * mb : (k + 1) * mb] for k in range(self.global_batch // mb)]
        return [r for t in range(self.trainers) for m in range(self.grad_accum) for r in chunks[m * self.trainers + t]]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def trainer_positions(self, trainer: int) -> range:
        """Positions of a global batch that `trainer` consumes, in micro-batch order."""
        per_trainer = self.micro_batch * self.grad_accum
        return range(trainer * per_trainer, (trainer + 1) * per_trainer)


def reference_positions(global_batch: int, ranks: int, rank: int) -> list[int]:
    """Positions of a global batch that reference rank `rank` of a `ranks`-rank group scores."""
    return list(range(rank, global_batch, ranks))


def shared_positions(schedule: Schedule, trainer: int, ranks: int, rank: int) -> list[int]:
    """Positions trainer `trainer` needs from reference rank `rank` (of `ranks`), in order."""
    return [p for p in schedule.trainer_positions(trainer) if p % ranks == rank]


def first_trainer_of(schedule: Schedule, ranks: int, rank: int) -> int:
    """The lowest trainer that reference rank `rank` (of `ranks`) sends scores to."""
    return next(t for t in range(schedule.trainers) if shared_positions(schedule, t, ranks, rank))


def length_grouped_batches(items: list[int], length: Callable[[int], int], batch_size: int) -> list[list[int]]:
    """Cut items into batches of similar length (sorted, longest first), to cut padding."""
    ordered = sorted(items, key=lambda i: -length(i))
    return [ordered[k : k + batch_size] for k in range(0, len(ordered), batch_size)]
