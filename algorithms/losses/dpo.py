"""Trajectory DPO: the loss of ETO (Song et al. 2024) and the plain-DPO baseline.

ETO pairs an expert trajectory with a failed exploration of the same task and trains on them
with the DPO loss over whole trajectories (ETO eq. 11), where log π(e|u) is the sum of the
log-probs of the agent's tokens only (ETO eq. 5: instruction and observations are masked).
No deviation from the paper. Step-level DPO (StepAgent eq. 6) reuses this loss on one step
(StepAgent-implicit: `StepDPOObjective`); DMPO generalises it per turn
(`algorithms.losses.dmpo`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rl_agents.train.objective import Metrics, Objective

__all__ = ["DPOObjective", "DPORewards", "StepDPOObjective", "check_beta", "dpo_loss", "dpo_rewards", "pair_metrics"]


# ─────────────────────────────── loss (pure tensor math) ───────────────────────────────


def check_beta(beta: float) -> None:
    """Raise ValueError unless β is a finite number > 0 (β ≤ 0 flips or removes the preference)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}")


def _check_pair_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or any(t.shape != shape for t in tensors):
        raise ValueError(f"expected four (B,) tensors of equal shape, got {[tuple(t.shape) for t in tensors]}")


class DPORewards(NamedTuple):
    """Implicit rewards of DPO ((B,) each, with their graph: detach them for metrics)."""

    chosen: torch.Tensor  # β (log πθ(e_w) - log πref(e_w))
    rejected: torch.Tensor  # β (log πθ(e_l) - log πref(e_l))
    margin: torch.Tensor  # chosen - rejected; the loss is -logσ(margin), accuracy = mean(margin > 0)


def dpo_rewards(
    policy_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> DPORewards:
    """The implicit rewards r = β log(πθ/πref) of ETO eq. (9) (up to β log Z) for both sides and their
    margin, whose -logσ is the loss (`dpo_loss`).

    policy_*/ref_*: (B,) summed log-probs of the agent tokens of the chosen (e_w) and rejected
    (e_l) sequences under the trained policy and the frozen reference. Returns (B,) tensors.
    """
    check_beta(beta)
    _check_pair_shapes(policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return DPORewards(chosen, rejected, chosen - rejected)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Trajectory DPO loss, Song et al. 2024 (ETO), eq. (11); Rafailov et al. 2023, eq. (7).

        loss = -log σ( β [ (log πθ(e_w) - log πref(e_w)) - (log πθ(e_l) - log πref(e_l)) ] )

    Same inputs as `dpo_rewards`. Returns (B,) per-pair losses; reduce them yourself (ETO takes the
    mean). Computed with `logsigmoid`, so it stays finite for any finite margin (no log(σ(z))
    underflow at large negative z).
    """
    return -F.logsigmoid(dpo_rewards(policy_chosen_logps, ref_chosen_logps, policy_rejected_logps,
                                     ref_rejected_logps, beta=beta).margin)


# ─────────────────────────────── objective (what the trainer runs) ───────────────────────────────


def pair_metrics(name: str, losses: torch.Tensor, rewards, pc, rc, pr, rr) -> Metrics:
    """Metrics of the preference objectives: `loss/<name>`, `reward/{chosen,rejected,margin,accuracy}`
    (the implicit rewards), `kl/{chosen,rejected}` (the summed log-ratio log πθ/πref over the agent
    tokens of the data's chosen/rejected sequences: a data-side KL estimate, 0 at step 0),
    `logps/{chosen,rejected}`; pc, rc, pr, rr: (B,) summed policy/reference log-probs."""
    d = lambda x: x.detach().float().mean()  # noqa: E731
    return {f"loss/{name}": d(losses), "reward/chosen": d(rewards.chosen), "reward/rejected": d(rewards.rejected),
            "reward/margin": d(rewards.margin), "reward/accuracy": d(rewards.margin > 0),
            "kl/chosen": d(pc - rc), "kl/rejected": d(pr - rr), "logps/chosen": d(pc), "logps/rejected": d(pr)}


@dataclass(frozen=True)
class DPOObjective(Objective):
    """Trajectory DPO (ETO eq. 11) on summed agent-token log-probs."""

    beta: float = 0.1
    """β (ETO: 0.1 on WebShop and ScienceWorld, 0.5 on ALFWorld)."""
    name = "dpo"
    paired = True

    def __post_init__(self):
        check_beta(self.beta)

    def __call__(self, fwd, batch) -> tuple[torch.Tensor, Metrics]:
        ref_c, ref_r = fwd.reference(batch)
        pol_c, pol_r = fwd.pair_turn_logps(batch)
        pc, rc, pr, rr = (x.sum((1, 2)) for x in (pol_c, ref_c, pol_r, ref_r))  # (B,) each: whole sequences
        rewards = dpo_rewards(pc, rc, pr, rr, beta=self.beta)
        losses = -F.logsigmoid(rewards.margin)
        return losses.mean(), pair_metrics(self.name, losses, rewards, pc, rc, pr, rr)


@dataclass(frozen=True)
class StepDPOObjective(DPOObjective):
    """StepAgent-implicit's step DPO (eq. 6): the same loss on step pairs (one expert prefix, the
    expert's action chosen, the agent's rejected). StepAgent gives no β; ETO App. C found step-level
    DPO stable only with a larger β (0.5) and a lower lr (1e-7): raise β if training collapses."""

    name = "step_dpo"
