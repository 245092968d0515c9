"""StepAgent (Deng et al., WWW'25): step-wise learning from an expert's trajectories.

Inspection (§4.1, eq. 4-5): cut each expert trajectory before each of its actions; from the
expert prefix ŝ_i the agent samples its own action a_i^θ (up to 3 practice samples per step, §7.4).
Reflection, two variants:

* implicit (§4.2.1, eq. 6): DPO on the step — expert action â_i preferred over a_i^θ, same prefix
  (`algorithms.losses.dpo.DPOObjective` on step pairs).
* inverse (§4.2.2, eq. 8-11, Alg. 1): GAIL. A discriminator D(s, a) learns to tell expert steps from
  agent steps (`gail_discriminator_loss`); PPO then maximises the per-step reward log D(s, a)
  (`gail_reward`, with `algorithms.losses.ppo.ppo_loss` / `step_advantages`).

Deviation — the discriminator's label convention. We define D(s, a) = σ(logit) = P(expert | s, a)
and train it with binary cross-entropy, expert = 1, agent = 0; the reward log D is then high when
the agent's action looks like the expert's. The paper (eq. 10-11, after Ho & Ermon 2016) writes the
same saddle point with the opposite convention, E_πθ[log D] + E_πe[log(1 − D)], i.e. D = P(agent),
under which GAIL's cost would be log D — but Alg. 1 line 12 then calls log D a *reward*, which taken
literally would push the agent away from the expert. With D = P(expert) the objective is the same
JS-divergence game and "reward = log D" means what the paper intends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gail_discriminator_loss", "gail_reward"]


# ─────────────────────────────── loss (pure tensor math) ───────────────────────────────


def gail_discriminator_loss(expert_logits: torch.Tensor, agent_logits: torch.Tensor) -> torch.Tensor:
    """GAIL discriminator loss, StepAgent eq. (10)-(11) in our label convention (module docstring).

        D = σ(logit) = P(expert | s, a)
        loss = ½ ( E_expert[-log D(s, a)] + E_agent[-log(1 - D(s, a))] )
             = ½ ( mean softplus(-expert_logits) + mean softplus(agent_logits) )

    expert_logits: (N_e,) or any shape, D's logits on expert steps (s = ŝ_i, a = â_i);
    agent_logits: (N_a,) or any shape, on the agent's steps (s = ŝ_i, a = a_i^θ). Returns a scalar.

    Each class is averaged on its own, as the two expectations of eq. (10) are, so several practice
    samples per expert step (N_a = 3 N_e) do not tilt D towards "agent". With N_e = N_a this equals
    binary cross-entropy on the pooled batch; at D = ½ everywhere it is log 2.
    """
    if expert_logits.numel() == 0 or agent_logits.numel() == 0:
        raise ValueError("need at least one expert and one agent step to train the discriminator")
    dtype = torch.promote_types(torch.promote_types(expert_logits.dtype, agent_logits.dtype), torch.float32)
    expert_term = F.softplus(-expert_logits.to(dtype)).mean()  # -log σ(x) = softplus(-x)
    agent_term = F.softplus(agent_logits.to(dtype)).mean()  # -log(1 - σ(x)) = softplus(x)
    return 0.5 * (expert_term + agent_term)


def gail_reward(agent_logits: torch.Tensor) -> torch.Tensor:
    """Per-step reward for PPO, StepAgent Alg. 1 line 12: r(s, a) = log D(s, a) = logsigmoid(logit).

    agent_logits: (B,) discriminator logits on the agent's steps. Returns (B,) rewards in (-∞, 0],
    detached (a reward is a constant for the policy step): near 0 when the action looks expert-like,
    very negative when D is sure it is the agent's.
    """
    return F.logsigmoid(agent_logits.detach().to(torch.promote_types(agent_logits.dtype, torch.float32)))
