"""The PoFT, SFT and DPO objectives on per-sample scores.

A sample's score under a model is the mean log-probability of its response tokens
(`poft_ds.scoring`). PoFT trains the target to beat the aligned models on every sample
(Bradley-Terry):

    L = -log sigmoid(beta * (s_target - s_ref) + gamma)

whose gradient is SFT's with a per-sample weight in (0, beta):

    dL/ds_target = -beta * sigmoid(beta * (s_ref - s_target) - gamma)

DPO (Rafailov et al., 2023) trains on preference pairs against a frozen reference policy, from
log-probabilities of the chosen and rejected responses (sums over response tokens), with
h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected):

    sigmoid: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
    ipo:     L = (h - 1 / (2 beta))^2   (on mean log-probabilities, as TRL computes it)
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


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair, and the implicit rewards of the chosen and rejected responses.

    Args:
        policy_chosen: [pairs] the policy's log-probabilities of the chosen responses (differentiable).
        policy_rejected: [pairs] the same for the rejected responses.
        ref_chosen: [pairs] the frozen reference's log-probabilities of the chosen responses.
        ref_rejected: [pairs] the same for the rejected responses.
        beta: Strength of the pull towards the reference (TRL's default 0.1).
        loss_type: "sigmoid" (the DPO paper, with optional label smoothing: conservative DPO) or
            "ipo" (Azar et al., 2023; pass mean log-probabilities).
        label_smoothing: Assumed probability that a pair's preference is flipped (sigmoid only).

    Returns:
        (loss, chosen_rewards, rejected_rewards), each [pairs]; the rewards are
        `beta * (policy - ref)`, detached (TRL's rewards/chosen and rewards/rejected).
    """
    dtype = policy_chosen.dtype
    chosen = policy_chosen - ref_chosen.to(dtype)
    rejected = policy_rejected - ref_rejected.to(dtype)
    h = chosen - rejected
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return loss, (beta * chosen).detach(), (beta * rejected).detach()
