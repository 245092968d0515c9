"""SFT (behaviour cloning) on the agent turns of expert trajectories; also the RFT baseline.

ETO eq. (3)-(5) and StepAgent eq. (2)-(3): teacher-forced negative log-likelihood of the agent's
tokens (thought + action), with the instruction, observations and chat scaffolding masked out.
RFT (Yuan et al. 2023, the ETO/DMPO/StepAgent baseline) is the same loss on the expert data
augmented with the agent's own successful trajectories.

Deviation (a correction of a typo): ETO eq. (3)/(5) and StepAgent eq. (2)/(3) print the loss as
-E[π(e|u)] with π(e|u) := -Σ log π(t_k) — i.e. without the log and with a double sign. We minimise
the NLL the text describes (and every released SFT script computes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_agents.train.objective import Metrics, Objective, agent_tokens

__all__ = ["SFTObjective", "sft_loss"]


# ─────────────────────────────── loss (pure tensor math) ───────────────────────────────


def sft_loss(
    policy_token_logps: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked NLL over agent tokens, ETO eq. (5) / StepAgent eq. (3), as a token mean.

        loss = - Σ_{b,j} m[b,j] · log πθ(x[b,j] | x[b,<j]) / Σ_{b,j} m[b,j]

    policy_token_logps: (B, L) per-token log-probs (`rl_agents.batches.token_logps`).
    action_mask: (B, L) 1 on agent tokens (bool, int or float; fractional values act as token weights).
    num_tokens: optional denominator replacing Σ m — pass the agent-token count of the whole
        global batch when gradient-accumulating or data-parallel, so that the micro-batch losses
        add up to exactly the full-batch token mean.
    Returns a scalar (dtype at least float32).

    Why the mean over all agent tokens of the batch rather than a mean of per-sequence means:
    it is the maximum-likelihood objective of eq. (3) for the dataset (each token counts once,
    long expert trajectories carry proportionally more signal) and it is what FastChat/HF
    causal-LM training — the papers' SFT code — computes (mean over non-ignored labels). A
    per-sequence mean would up-weight the tokens of short trajectories. A batch without any
    agent token gives 0 (no gradient), not NaN.
    """
    if policy_token_logps.shape != action_mask.shape:
        raise ValueError(f"policy_token_logps {tuple(policy_token_logps.shape)} and action_mask "
                         f"{tuple(action_mask.shape)} must have the same shape")
    dtype = torch.promote_types(policy_token_logps.dtype, torch.float32)
    logps = policy_token_logps.to(dtype)
    mask = action_mask.to(dtype)
    # `where`, not a product: non-agent positions may hold anything (even -inf) without leaking NaN.
    nll = -torch.where(mask != 0, logps * mask, torch.zeros_like(logps)).sum()
    if num_tokens is not None:
        return nll / num_tokens
    denom = mask.sum()
    return nll / torch.where(denom > 0, denom, torch.ones_like(denom))


# ─────────────────────────────── objective (what the trainer runs) ───────────────────────────────


@dataclass(frozen=True)
class SFTObjective(Objective):
    """Masked token-mean NLL on agent tokens (`sft_loss`); the batch mean is over agent tokens."""

    name = "sft"

    def units(self, example) -> int:
        return agent_tokens(example)

    def __call__(self, fwd, batch) -> tuple[torch.Tensor, Metrics]:
        loss = sft_loss(fwd.sequence_logps(batch), batch.action_mask)
        return loss, {"loss/sft": loss.detach()}
