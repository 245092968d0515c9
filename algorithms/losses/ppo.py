"""PPO for LLM agents: the policy step of StepAgent-inverse and the PPO baseline.

Clipped surrogate of Schulman et al. 2017 (eq. 7), applied per agent token with a per-sequence
advantage, plus the entropy bonus λH of StepAgent eq. (8)/(10) and an optional KL penalty to the
reference policy (k3 estimator, Schulman 2020 "Approximating KL divergence").

StepAgent-inverse (Deng et al. 2025, Alg. 1 line 12) takes "a policy step with PPO rule and reward
function log D(s, a)". Each inspected step is a one-step episode — an expert prefix ŝ_i and one
sampled agent action a_i^θ — so the return is the step's reward and no GAE is needed: the
advantage is reward − baseline (`step_advantages`). The paper does not say which baseline; we use
the mean reward of the samples drawn for the same expert prefix (StepAgent draws up to 3 practice
samples per step, §7.4), falling back to the batch mean. This is a value-free baseline (as in
RLOO/GRPO without std scaling): no value head to train for one-step episodes, and the group mean
removes the prefix-dependent part of the reward, which a batch mean would leave in as noise.
The PPO baseline of ETO/StepAgent uses the final environment reward instead (StepAgent §6.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rl_agents.train.objective import Metrics, Objective, agent_tokens

__all__ = ["LOSS_AGG", "PPOObjective", "check_ppo_coefs", "ppo_loss", "step_advantages"]

LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""How per-token terms become the loss (verl's names): the mean over all agent tokens of the batch
(DAPO, Yu et al. 2025, eq. 8; every token weighs the same); the mean over sequences of each
sequence's token mean (GRPO, Shao et al. 2024, eq. 3: a long episode's tokens weigh less); the
mean over sequences of each sequence's token sum divided by a constant `norm_tokens` (Dr. GRPO,
Liu et al. 2025: no length bias either way)."""


def check_ppo_coefs(clip_eps: float, entropy_coef: float = 0.0, kl_coef: float = 0.0, *,
                    clip_high: float | None = None, loss_agg: str = "token-mean", norm_tokens: int = 1) -> None:
    """Raise ValueError naming the field unless ε (and ε_high) are finite > 0, both coefficients
    finite >= 0, `loss_agg` one of `LOSS_AGG` and `norm_tokens` an integer >= 1."""
    def real(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not (real(clip_eps) and clip_eps > 0):
        raise ValueError(f"clip_eps: must be a finite number > 0, got {clip_eps!r}")
    if clip_high is not None and not (real(clip_high) and clip_high > 0):
        raise ValueError(f"clip_high: must be a finite number > 0 (or null: = clip_eps), got {clip_high!r}")
    for name, value in (("entropy_coef", entropy_coef), ("kl_coef", kl_coef)):
        if not (real(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    if loss_agg not in LOSS_AGG:
        raise ValueError(f"loss_agg: must be one of {', '.join(LOSS_AGG)}, got {loss_agg!r}")
    if not (isinstance(norm_tokens, int) and not isinstance(norm_tokens, bool) and norm_tokens >= 1):
        raise ValueError(f"norm_tokens: must be an integer >= 1, got {norm_tokens!r}")


# ─────────────────────────────── loss (pure tensor math) ───────────────────────────────


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask == True (all agent tokens of the batch); 0 when the mask is empty."""
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    count = mask.sum()
    return total / torch.where(count > 0, count, torch.ones_like(count)).to(x.dtype)


def mean_of(loss_agg: str) -> str:
    """The mean a metric takes under `loss_agg`: over tokens, or over sequences of their token means
    (the loop weighs micro-batches by the same units as the loss)."""
    return "token-mean" if loss_agg == "token-mean" else "seq-mean-token-mean"


def _aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str, norm_tokens: int) -> torch.Tensor:
    """Per-token values (B, L) -> one scalar, as `loss_agg` says (`LOSS_AGG`); sequences without
    agent tokens do not count; 0 when there are none."""
    if loss_agg == "token-mean":
        return _masked_mean(x, mask)
    sums = torch.where(mask, x, torch.zeros_like(x)).sum(-1)  # (B,)
    counts = mask.sum(-1)  # (B,)
    if loss_agg == "seq-mean-token-mean":
        per_seq = sums / counts.clamp(min=1).to(x.dtype)
    else:  # seq-mean-token-sum-norm
        per_seq = sums / norm_tokens
    rows = counts > 0
    return per_seq[rows].sum() / rows.sum().clamp(min=1).to(x.dtype)


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_high: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    loss_agg: str = "token-mean",
    norm_tokens: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss (Schulman et al. 2017, eq. 7) + entropy bonus (StepAgent eq. 10) + KL.

        r_j   = exp(log πθ(a_j) - log π_old(a_j))                        per agent token j of sequence b
        L_pg  = agg_j -min(r_j A_j, clip(r_j, 1-ε, 1+ε_high) A_j)
        L     = L_pg - entropy_coef · agg_j H_j + kl_coef · agg_j k3_j,
        k3_j  = exp(ref_j - logp_j) - (ref_j - logp_j) - 1               (≥ 0, unbiased for KL(πθ‖πref))

    logps, old_logps: (B, L) per-token log-probs under the current and the sampling policy.
    advantages: (B,) one advantage per sequence, broadcast over its agent tokens, or (B, L) one per
        token (GiGPO: each agent turn its own).
    action_mask: (B, L) 1 on agent tokens (bool/int/float).
    clip_high: ε_high of DAPO's clip-higher (Yu et al. 2025, eq. 10); None = ε (symmetric).
    entropy: (B, L) per-token policy entropy, required when entropy_coef != 0.
    ref_logps: (B, L) reference log-probs, required when kl_coef != 0.
    loss_agg: `agg` above (`LOSS_AGG`): "token-mean" (default; every mean over all agent tokens of
        the batch, as `sft_loss`), "seq-mean-token-mean" or "seq-mean-token-sum-norm" (token sums
        divided by `norm_tokens`).
    old_logps, advantages and ref_logps are constants of the step: they are detached here.

    Returns (loss scalar, metrics): `loss/policy` (L_pg), `loss/entropy` (agg of the agent-token
    entropies, 0 without `entropy`), `kl/ref` (agg of k3, 0 without `ref_logps`), `ppo/clip_frac`
    (share of agent tokens where the clipped term is the smaller one, i.e. whose gradient the clip
    removes) and `ppo/ratio_mean` (mean r_j): token means, or sequence means of token means when
    `loss_agg` is a sequence mean.
    """
    check_ppo_coefs(clip_eps, entropy_coef, kl_coef, clip_high=clip_high, loss_agg=loss_agg, norm_tokens=norm_tokens)
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token `entropy`")
    if kl_coef != 0 and ref_logps is None:
        raise ValueError("kl_coef != 0 needs `ref_logps`")
    shape = logps.shape
    others = {"old_logps": old_logps, "action_mask": action_mask, "entropy": entropy, "ref_logps": ref_logps}
    for name, x in others.items():
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like logps")
    if logps.dim() != 2 or advantages.shape not in (shape[:1], shape):
        raise ValueError(f"expected logps (B, L) and advantages (B,) or (B, L), got {tuple(shape)} and "
                         f"{tuple(advantages.shape)}")

    dtype = torch.promote_types(logps.dtype, torch.float32)
    mask = action_mask != 0  # (B, L) bool
    zeros = torch.zeros(shape, dtype=dtype, device=logps.device)
    logps = logps.to(dtype)
    # Off-action positions get log-ratio 0 (ratio 1), so garbage there cannot overflow exp().
    log_ratio = torch.where(mask, logps - old_logps.detach().to(dtype), zeros)  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    adv = advantages.detach().to(dtype)
    adv = adv if adv.dim() == 2 else adv[:, None]  # (B, L) or (B, 1)
    surr = ratio * adv  # (B, L)
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + (clip_eps if clip_high is None else clip_high)) * adv  # (B, L)
    agg = lambda x: _aggregate(x, mask, loss_agg, norm_tokens)  # noqa: E731
    policy_loss = agg(-torch.minimum(surr, surr_clipped))
    loss = policy_loss

    mean_entropy = zeros.sum()
    if entropy is not None:
        mean_entropy = agg(entropy.to(dtype))
        loss = loss - entropy_coef * mean_entropy

    kl = zeros.sum()
    if ref_logps is not None:
        diff = torch.where(mask, ref_logps.detach().to(dtype) - logps, zeros)  # log(πref/πθ) per token
        kl = agg(torch.exp(diff) - diff - 1.0)
        loss = loss + kl_coef * kl

    with torch.no_grad():
        metrics = {
            "loss/policy": policy_loss.item(),
            "loss/entropy": mean_entropy.item(),
            "kl/ref": kl.item(),
            "ppo/clip_frac": _aggregate((surr_clipped < surr).to(dtype), mask, mean_of(loss_agg), 1).item(),
            "ppo/ratio_mean": _aggregate(ratio, mask, mean_of(loss_agg), 1).item(),
        }
    return loss, metrics


def step_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    scale: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages: A_i = r_i − baseline, detached, (B,) like `rewards`.

    rewards: (B,) per-sample rewards (StepAgent: `algorithms.stepagent.gail_reward` of one-step
        episodes; GRPO/PPO: final episode rewards).
    group_ids: optional (B,) integer id of the group each sample belongs to (the expert prefix, the
        task). With it, the baseline is the mean reward of the sample's group (leave-in mean; a
        group of one sample gets advantage 0 — no comparison, no signal); without it, the mean of
        the whole batch.
    scale: divide by the group's standard deviation + eps (GRPO, Shao et al. 2024, §4.1.2: the
        unbiased std, as DeepSeekMath's, verl's and TRL's code take it; a group of one gets 0).
        Off by default: it rescales the step size per group and favours groups whose rewards
        barely differ (Dr. GRPO, Liu et al. 2025, §3.1).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got {tuple(rewards.shape)}")
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if group_ids is None:
        group_ids = [0] * len(rewards)
    ids = torch.as_tensor(group_ids, device=rewards.device)
    if ids.shape != rewards.shape:
        raise ValueError(f"group_ids {tuple(ids.shape)} must match rewards {tuple(rewards.shape)}")
    _, inverse = torch.unique(ids, return_inverse=True)  # (B,) group index 0..G-1
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    counts = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards))
    centred = rewards - (sums / counts)[inverse]
    if not scale:
        return centred
    squares = torch.zeros_like(sums).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(squares / (counts - 1).clamp(min=1))  # (G,) unbiased; 0 for a group of one
    return centred / (std[inverse] + eps)


# ─────────────────────────────── objective (what the trainer runs) ───────────────────────────────


@dataclass(frozen=True)
class PPOObjective(Objective):
    """PPO-clip + entropy bonus + optional k3 KL (`ppo_loss`), aggregated over the agent tokens as
    `loss_agg` says, one advantage per sequence or per token. The old log-probs are the policy's
    the update starts from, precomputed by the training loop through the same forward (so the
    first step's ratio is exactly 1). The KL reference is the batch's `ref_logps` or, without
    them, those old log-probs."""

    clip_eps: float = 0.2
    """Clip range ε of the ratio (Schulman et al. 2017: 0.2); the lower one (DAPO's ε_low) when
    `clip_high` is set."""
    clip_high: float | None = None
    """DAPO's ε_high (clip-higher, Yu et al. 2025: 0.28); None = `clip_eps`."""
    entropy_coef: float = 0.0
    """Entropy bonus λ (StepAgent eq. 8/10); 0 = plain PPO-clip."""
    kl_coef: float = 0.0
    """k3 KL penalty coefficient to the reference; 0 = off."""
    loss_agg: str = "token-mean"
    """"token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (`LOSS_AGG`)."""
    norm_tokens: int = 1024
    """The constant that "seq-mean-token-sum-norm" divides each sequence's token sum by (Dr. GRPO:
    the generation budget)."""
    name = "ppo"
    on_policy = True

    def __post_init__(self):
        check_ppo_coefs(self.clip_eps, self.entropy_coef, self.kl_coef, clip_high=self.clip_high,
                        loss_agg=self.loss_agg, norm_tokens=self.norm_tokens)

    def units(self, example) -> int:
        # the batch mean's weight of one example: its agent tokens, or 1 per sequence
        return agent_tokens(example.sequence) if self.loss_agg == "token-mean" else 1

    def __call__(self, fwd, batch) -> tuple[torch.Tensor, Metrics]:
        logps, entropy = fwd.sequence_logps_and_entropy(batch.tokens, entropy_grad=self.entropy_coef != 0)
        ref = batch.ref_logps if batch.ref_logps is not None else batch.old_logps
        loss, metrics = ppo_loss(logps, batch.old_logps, batch.advantages, batch.tokens.action_mask,
                                 clip_eps=self.clip_eps, clip_high=self.clip_high, entropy=entropy,
                                 entropy_coef=self.entropy_coef, ref_logps=ref, kl_coef=self.kl_coef,
                                 loss_agg=self.loss_agg, norm_tokens=self.norm_tokens)
        return loss, {"loss/ppo": loss.detach(), **{k: torch.tensor(v) for k, v in metrics.items()}}
