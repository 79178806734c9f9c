"""The PoFT loss and its gradient against their closed forms."""

import pytest
import torch

from poft_ds.loss import aggregate_reference_scores, dpo_loss, poft_loss


@pytest.mark.parametrize("seed", range(5))
def test_poft_loss_and_gradient_match_closed_forms(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s_target = (-5 * torch.rand(64, generator=g, dtype=torch.float64)).requires_grad_()
    s_ref = -5 * torch.rand(64, generator=g, dtype=torch.float64)
    beta = float(torch.empty(1, dtype=torch.float64).uniform_(0.1, 3.0, generator=g))
    gamma = float(torch.empty(1, dtype=torch.float64).uniform_(-2.0, 2.0, generator=g))

    loss, weight = poft_loss(s_target, s_ref, beta, gamma)
    loss.sum().backward()

    expected_loss = -torch.log(1 / (1 + torch.exp(-(beta * (s_target.detach() - s_ref) + gamma))))
    expected_weight = 1 / (1 + torch.exp(-(beta * (s_ref - s_target.detach()) - gamma)))
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-12, atol=1e-12)
    # dL/ds_target = -beta * sigmoid(beta * (s_ref - s_target) - gamma)
    torch.testing.assert_close(s_target.grad, -beta * expected_weight, rtol=1e-12, atol=1e-12)


def test_poft_loss_is_finite_for_extreme_margins() -> None:
    s_target = torch.tensor([-200.0, 0.0, 200.0], requires_grad=True)
    loss, weight = poft_loss(s_target, torch.zeros(3), beta=5.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s_target.grad).all()
    assert weight[0] > 0.999 and weight[2] < 1e-6  # samples the target already beats are damped


def test_paper_defaults_reduce_to_log_sigmoid_of_the_margin() -> None:
    s_target, s_ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])
    loss, _ = poft_loss(s_target, s_ref)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(s_ref - s_target))


def test_reference_aggregation() -> None:
    scores = torch.tensor([[-1.0, -3.0, -2.0], [-4.0, -0.5, -1.5]])
    torch.testing.assert_close(aggregate_reference_scores(scores, "mean"), torch.tensor([-2.0, -2.0]))
    torch.testing.assert_close(aggregate_reference_scores(scores, "min"), torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(aggregate_reference_scores(scores, "max"), torch.tensor([-1.0, -0.5]))
    with pytest.raises(ValueError, match="median"):
        aggregate_reference_scores(scores, "median")


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_and_gradient_match_closed_forms(loss_type: str, label_smoothing: float) -> None:
    g = torch.Generator().manual_seed(3)
    pc, pr = ((-10 * torch.rand(32, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(2))
    rc, rr = (-10 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.3
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    loss.sum().backward()

    h = (pc.detach() - rc) - (pr.detach() - rr)
    p = 1 / (1 + torch.exp(-beta * h))  # the model's probability that the chosen response is preferred
    if loss_type == "sigmoid":
        expected = -(1 - label_smoothing) * torch.log(p) - label_smoothing * torch.log(1 - p)
        # dL/dh = -beta * ((1 - eps) * (1 - p) - eps * p)
        dh = -beta * ((1 - label_smoothing) * (1 - p) - label_smoothing * p)
    else:
        expected = (h - 1 / (2 * beta)) ** 2
        dh = 2 * (h - 1 / (2 * beta))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pc.grad, dh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pr.grad, -dh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chosen_rewards, beta * (pc.detach() - rc))
    torch.testing.assert_close(rejected_rewards, beta * (pr.detach() - rr))
