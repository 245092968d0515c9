"""DMPO: Direct Multi-turn Preference Optimization (Shi et al. 2024).

DPO over whole trajectories, with each agent turn's log-ratio weighted by a discount
φ(t, T) that decays with the turn index and is normalised by the trajectory's own length
(eq. 16). Turns are indexed t = 0 … T-1, T = that trajectory's number of agent turns.

Deliberate deviation from the printed paper: we use

    φ(t, T) = γ^t (1 - γ^(T-t)) / (1 - γ^T),        φ(t, T) = (T - t) / T at γ = 1,

the weight of the authors' released code (`swt-user/DMPO`, `dmpo_trainer_efficient.py`) and the
one eq. (14) + eq. (15) actually give: with log d^π(s_t, a_t) = Σ_{k≤t} log π(a_k|s_k) + (terms
that cancel against the reference), the coefficient of turn k's log-ratio is
(1-γ)/(1-γ^T) · Σ_{t=k}^{T-1} γ^t = γ^k (1-γ^(T-k)) / (1-γ^T). The printed φ drops γ^t; with it,
γ → 0 would give plain trajectory DPO, contradicting the paper's own Corollary 4.0.2 (γ → 0
gives single-turn DPO on the first turn), which the form above satisfies.

End-of-turn tokens (`end_of_turn`): a turn's log-prob may come in two parts, its reply tokens and
its closing end-of-turn token(s) (`<|im_end|>`). 'turn' (default) weights the whole turn by φ(t, T),
as eq. (16) weights log π(a_t|s_t) and the agent's action ends with its decision to stop. 'one' is
the released trainer's convention (`swt-user/DMPO`, `get_batch_loss_metrics`): its coefficient is
φ on each reply's tokens only, and the separator after each reply (`</s>`), which is in the
labels, keeps coefficient 1. Its round 0 (the instruction and the agent's "OK") is prompt: ours
too, when ETO-format data is imported (`rl_agents.trajectory`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from algorithms.losses.dpo import check_beta, pair_metrics
from rl_agents.train.objective import Metrics, Objective

__all__ = ["DMPOObjective", "DMPORewards", "check_end_of_turn", "check_gamma", "dmpo_loss", "dmpo_rewards",
           "dmpo_turn_weights"]


# ─────────────────────────────── loss (pure tensor math) ───────────────────────────────


def check_gamma(gamma: float) -> None:
    """Raise ValueError unless 0 < γ ≤ 1 (γ = 0 is the DPO limit of Corollary 4.0.2, not a valid weight)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma: must be in (0, 1], got {gamma!r}")


def dmpo_turn_weights(turn_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-turn DMPO weights φ(t, T), Shi et al. 2024, eq. (16), with the released code's φ.

    turn_mask: (B, T_max) 0/1 (bool, int or float), 1 for the real agent turns, left-aligned
    (turn t = 0 in column 0). T = turn_mask[b].sum(), so each row uses its own length.
    Returns (B, T_max) float64 weights, exactly 0 on masked turns and on rows with no turns.

    Evaluated as φ = exp(t·lnγ) · expm1((T-t)·lnγ) / expm1(T·lnγ), which keeps full relative
    precision for γ close to 1 (1-γ^k would cancel catastrophically) and cannot overflow for tiny γ
    (γ^t underflows to 0). γ = 1 uses the exact limit (T - t) / T.
    """
    check_gamma(gamma)
    if turn_mask.dim() != 2:
        raise ValueError(f"turn_mask must be (B, T), got shape {tuple(turn_mask.shape)}")
    real = turn_mask != 0  # (B, T_max) bool
    n = real.sum(dim=-1, keepdim=True).to(torch.float64)  # (B, 1) number of real turns T
    t = torch.arange(turn_mask.shape[-1], dtype=torch.float64, device=turn_mask.device)[None, :]  # (1, T_max)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))  # avoid 0/0 on empty rows (zeroed below)
    if gamma == 1.0:
        weights = (safe_n - t) / safe_n
    else:
        log_gamma = math.log(gamma)  # < 0, in double precision
        weights = torch.exp(t * log_gamma) * torch.expm1((safe_n - t) * log_gamma) / torch.expm1(safe_n * log_gamma)
    return torch.where(real & (n > 0), weights, torch.zeros_like(weights))


END_OF_TURN = ("turn", "one")


def check_end_of_turn(end_of_turn: str) -> None:
    if end_of_turn not in END_OF_TURN:
        raise ValueError(f"end_of_turn: must be one of {END_OF_TURN}, got {end_of_turn!r}")


def _weighted_logratio(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, gamma: float,
                       dtype: torch.dtype, end_of_turn: str) -> torch.Tensor:
    """Σ_t φ(t, T) (log πθ - log πref)_t over real turns: (B, T) -> (B,). Masked turns add exactly 0.

    (B, T, 2) log-probs are [reply, end-of-turn] parts: 'turn' weights both by φ, 'one' the second by 1."""
    if policy.shape != ref.shape or policy.shape[:2] != mask.shape or mask.dim() != 2 or policy.dim() not in (2, 3) \
            or (policy.dim() == 3 and policy.shape[2] != 2):
        raise ValueError("policy and ref of one side must both be (B, T) or (B, T, 2) and mask (B, T); got "
                         f"{tuple(policy.shape)}, {tuple(ref.shape)}, {tuple(mask.shape)}")
    check_end_of_turn(end_of_turn)
    if end_of_turn == "one" and policy.dim() != 3:
        raise ValueError("end_of_turn='one' needs the turns' log-probs in two parts, (B, T, 2): [reply, end-of-turn]")
    phi = dmpo_turn_weights(mask, gamma).to(dtype)  # (B, T)
    logratio = policy.to(dtype) - ref.to(dtype)  # (B, T) or (B, T, 2)
    if logratio.dim() == 3:
        eot_weight = torch.ones_like(phi) if end_of_turn == "one" else phi
        weights = torch.stack([phi, eot_weight], dim=-1)  # (B, T, 2)
        real = (mask != 0)[..., None].expand_as(logratio)
    else:
        weights, real = phi, mask != 0
    # `where`, not a product, so that non-finite values under the mask cannot leak in as NaN.
    weighted = torch.where(real, weights * logratio, torch.zeros_like(logratio))
    return weighted.flatten(1).sum(dim=-1)


class DMPORewards(NamedTuple):
    """Φ(τ) of DMPO eq. (17) for both sides ((B,) each, with their graph: detach them for metrics)."""

    chosen: torch.Tensor  # Σ_t β φ(t,T_w) Δ_t^w
    rejected: torch.Tensor  # Σ_t β φ(t,T_l) Δ_t^l
    margin: torch.Tensor  # chosen - rejected; the loss is -logσ(margin)


def dmpo_rewards(
    policy_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    chosen_turn_mask: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    rejected_turn_mask: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    end_of_turn: str = "turn",
) -> DMPORewards:
    """The weighted implicit rewards Φ(τ_w), Φ(τ_l) of eq. (17) and their margin, whose -logσ is the
    loss (`dmpo_loss`, same inputs)."""
    check_beta(beta)
    check_gamma(gamma)
    if policy_chosen_logps.shape[:1] != policy_rejected_logps.shape[:1]:
        raise ValueError(f"chosen and rejected batch sizes differ: {tuple(policy_chosen_logps.shape)} "
                         f"vs {tuple(policy_rejected_logps.shape)}")
    # Compute in at least float32 (bf16 log-prob sums lose whole nats on long trajectories).
    dtype = torch.promote_types(torch.promote_types(policy_chosen_logps.dtype, policy_rejected_logps.dtype),
                                torch.float32)
    chosen = beta * _weighted_logratio(policy_chosen_logps, ref_chosen_logps, chosen_turn_mask, gamma, dtype,
                                       end_of_turn)
    rejected = beta * _weighted_logratio(policy_rejected_logps, ref_rejected_logps, rejected_turn_mask, gamma, dtype,
                                         end_of_turn)
    return DMPORewards(chosen, rejected, chosen - rejected)


def dmpo_loss(
    policy_chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    chosen_turn_mask: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    rejected_turn_mask: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    end_of_turn: str = "turn",
) -> torch.Tensor:
    """DMPO loss, Shi et al. 2024, eq. (16), with the per-turn weight of the released code.

        loss = -log σ( Σ_t β φ(t,T_w) Δ_t^w - Σ_t β φ(t,T_l) Δ_t^l ),   Δ_t = log πθ(a_t|s_t) - log πref(a_t|s_t)

    policy_chosen_logps/ref_chosen_logps/chosen_turn_mask: (B, T_w) per-turn summed log-probs of
    the agent turns of the preferred trajectory and a 0/1 (bool/int/float) mask of its real turns,
    left-aligned; the rejected side is (B, T_l), and T_w may differ from T_l. φ is
    `dmpo_turn_weights` (see the module docstring for why it is not the printed one). The log-probs
    may be (B, T, 2), each turn's [reply, end-of-turn] tokens apart: `end_of_turn="turn"` weights
    both by φ(t, T) (the same as their sum), `"one"` the end-of-turn part by 1 (the released trainer).
    β > 0 and γ ∈ (0, 1], else ValueError. Returns (B,) per-pair losses, dtype at least float32.

    Identities (tested): one turn on each side gives `dpo_loss`; γ → 0 gives DPO on turn 0;
    masked turns contribute exactly 0.
    """
    return -F.logsigmoid(dmpo_rewards(policy_chosen_logps, ref_chosen_logps, chosen_turn_mask, policy_rejected_logps,
                                      ref_rejected_logps, rejected_turn_mask, beta=beta, gamma=gamma,
                                      end_of_turn=end_of_turn).margin)


# ─────────────────────────────── objective (what the trainer runs) ───────────────────────────────


@dataclass(frozen=True)
class DMPOObjective(Objective):
    """DMPO on per-turn log-prob sums, each turn's reply and end-of-turn apart (`dmpo_rewards`)."""

    beta: float = 0.1
    """β (DMPO 0.1; ETO 0.5 on ALFWorld)."""
    gamma: float = 0.7
    """Discount γ ∈ (0, 1] (released code 0.7)."""
    end_of_turn: Literal["turn", "one"] = "turn"
    """The weight of each agent turn's closing end-of-turn token: 'turn' its turn's φ(t, T), 'one' 1,
    as DMPO's released trainer (module docstring; docs/papers.md)."""
    name = "dmpo"
    paired = True

    def __post_init__(self):
        check_beta(self.beta)
        check_gamma(self.gamma)
        check_end_of_turn(self.end_of_turn)

    def check_reference(self, ref: list) -> None:
        if self.end_of_turn == "one" and any(isinstance(v, float) for c, r in ref for v in (*c, *r)):
            raise ValueError("end_of_turn='one' weights each turn's end-of-turn tokens apart: give the reference "
                             "per turn as [reply, end-of-turn] log-prob sums, not one number")

    def __call__(self, fwd, batch) -> tuple[torch.Tensor, Metrics]:
        ref_c, ref_r = fwd.reference(batch)
        pol_c, pol_r = fwd.pair_turn_logps(batch)
        mask_c, mask_r = batch.chosen.turn_mask(pol_c.shape[1]), batch.rejected.turn_mask(pol_r.shape[1])
        rewards = dmpo_rewards(pol_c, ref_c, mask_c, pol_r, ref_r, mask_r, beta=self.beta, gamma=self.gamma,
                               end_of_turn=self.end_of_turn)
        losses = -F.logsigmoid(rewards.margin)
        sums = (x.sum((1, 2)) for x in (pol_c, ref_c, pol_r, ref_r))
        return losses.mean(), pair_metrics("dmpo", losses, rewards, *sums)
