"""The PoFT and SFT objectives on per-sample scores.

A sample's score under a model is the mean log-probability of its response tokens
(`poft_ds.scoring`). PoFT trains the target to beat the aligned models on every sample
(Bradley-Terry):

    L = -log sigmoid(beta * (s_target - s_ref) + gamma)

whose gradient is SFT's with a per-sample weight in (0, beta):

    dL/ds_target = -beta * sigmoid(beta * (s_ref - s_target) - gamma)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aggregate_reference_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the K aligned models' scores of each sample into s_ref.

    Args:
        scores: [batch, K] per-model scores.
        how: "mean" (the paper), "min" or "max".

    Returns:
        [batch] reference scores.
    """
    if how == "mean":
        return scores.mean(dim=1)
    if how == "min":
        return scores.min(dim=1).values
    if how == "max":
        return scores.max(dim=1).values
    raise ValueError(f"unknown aggregation {how!r}")


def poft_loss(
    s_target: torch.Tensor, s_ref: torch.Tensor, beta: float = 1.0, gamma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """PoFT loss per sample and the per-sample SFT weight it implies.

    Args:
        s_target: [batch] target-model scores (differentiable).
        s_ref: [batch] reference scores (constants).
        beta: Scale of the score margin.
        gamma: Offset added to the scaled margin.

    Returns:
        (loss, weight): both [batch]; `weight = sigmoid(beta * (s_ref - s_target) - gamma)` is
        detached and is what the method multiplies each sample's SFT gradient by (before beta).
    """
    margin = beta * (s_target - s_ref.to(s_target.dtype)) + gamma
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    loss = -F.logsigmoid(margin)
    weight = torch.sigmoid(-margin).detach()
    return loss, weight
