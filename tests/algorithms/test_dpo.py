"""Trajectory DPO (ETO eq. 11) against hand-computed values."""

import math

import pytest
import torch

from algorithms import dpo_loss, dpo_rewards

f64 = torch.float64


def test_dpo_loss_hand_value():
    """β = 0.1; pair 0: log πθ(e_w) = -10, log πref(e_w) = -12, log πθ(e_l) = -15, log πref(e_l) = -14.

    Δ_w = -10 - (-12) = 2, Δ_l = -15 - (-14) = -1, z = 0.1 · (2 - (-1)) = 0.3,
    loss = log(1 + e^-0.3) = log(1 + 0.7408182) = log(1.7408182) = 0.5543552.
    Pair 1: identical policy and reference, z = 0, loss = log 2 = 0.6931472.
    """
    loss = dpo_loss(torch.tensor([-10.0, -7.0], dtype=f64), torch.tensor([-12.0, -7.0], dtype=f64),
                    torch.tensor([-15.0, -9.0], dtype=f64), torch.tensor([-14.0, -9.0], dtype=f64), beta=0.1)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([0.5543552, math.log(2)], dtype=f64), atol=1e-7, rtol=0)


def test_dpo_gradient_hand_value():
    """Same pair 0 as above. d loss / d log πθ(e_w) = -β σ(-z) = -0.1 · 1/(1 + e^0.3) = -0.1 · 0.4255575
    = -0.04255575, and d loss / d log πθ(e_l) = +0.04255575."""
    pc = torch.tensor([-10.0], dtype=f64, requires_grad=True)
    pr = torch.tensor([-15.0], dtype=f64, requires_grad=True)
    dpo_loss(pc, torch.tensor([-12.0], dtype=f64), pr, torch.tensor([-14.0], dtype=f64), beta=0.1).sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.04255575], dtype=f64), atol=1e-8, rtol=0)
    torch.testing.assert_close(pr.grad, torch.tensor([0.04255575], dtype=f64), atol=1e-8, rtol=0)


def test_dpo_numerically_stable_at_large_margins():
    """β = 1, z = ±1000: -logσ(-1000) = 1000 exactly in float32 (log(σ) would give inf), -logσ(1000) = 0."""
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = dpo_loss(pc, torch.tensor([1000.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1000.0]), beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([1000.0, 0.0]))
    loss.sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_dpo_rewards_hand_value():
    """Pair 0 above: chosen reward 0.1 · 2 = 0.2, rejected 0.1 · (-1) = -0.1, margin 0.3 = z; -logσ(margin)
    is the loss, so the rewards keep their graph (the objective detaches them for its metrics)."""
    pc = torch.tensor([-10.0], dtype=f64, requires_grad=True)
    r = dpo_rewards(pc, torch.tensor([-12.0], dtype=f64), torch.tensor([-15.0], dtype=f64),
                    torch.tensor([-14.0], dtype=f64), beta=0.1)
    torch.testing.assert_close(torch.stack([r.chosen, r.rejected, r.margin]).squeeze(1),
                               torch.tensor([0.2, -0.1, 0.3], dtype=f64))
    assert r.margin.requires_grad
    torch.testing.assert_close(-torch.nn.functional.logsigmoid(r.margin), dpo_loss(
        pc, torch.tensor([-12.0], dtype=f64), torch.tensor([-15.0], dtype=f64), torch.tensor([-14.0], dtype=f64), beta=0.1))


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_dpo_rejects_bad_beta(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1)
