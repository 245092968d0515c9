"""PPO on the final environment reward: the baseline of ETO §4.1 and StepAgent §6.2.

Per iteration: explore every train task `rollout.samples_per_task` (≥ 2) times with the current
policy (temperature sampling), give each trajectory the advantage

    A = R − mean(R of the same task's samples)                       (`step_advantages`, group = task)

and take PPO-clip steps (`algorithms.losses.PPOObjective`: `ppo_loss` with the entropy bonus and an
optional k3 KL) over all agent tokens of the trajectory, one advantage per sequence, token mean
over the batch. Old log-probs are recomputed by the training loop with the policy it starts from.

This is one configuration of `algorithms.grpo.GRPO` (the same explore → advantage → PPO-clip
step): `scale_rewards: false`, `zero_variance: keep`, `loss.loss_agg: token-mean`, and an entropy
bonus.

Choices the papers leave open (none of them reports PPO settings): no value network — the group
mean of the task's own samples is the baseline (as in RLOO/GRPO without std scaling; a critic
would need its own training on sparse final rewards); no discounting inside the trajectory (the
only reward is final, so every turn's return is R); a task whose samples all got the same reward
gives advantage 0 (its tokens still count in the entropy/KL means).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from algorithms.base import register_algorithm
from algorithms.grpo import GRPO, GRPOConfig
from algorithms.losses.ppo import PPOObjective
from rl_agents.rollout_group import RolloutSection


@dataclass
class PPOConfig(GRPOConfig):
    loss: PPOObjective = field(default_factory=lambda: PPOObjective(entropy_coef=1e-3))
    """PPO-clip: `loss.clip_eps` (Schulman et al. 2017: 0.2; ETO/StepAgent report none),
    `loss.entropy_coef` (1e-3 as in verl's PPO defaults — Schulman et al.'s Atari 0.01 inflates token
    entropies over a 49k vocabulary), `loss.kl_coef` (k3 KL to the policy each update starts from;
    0 = off, no paper uses one)."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(samples_per_task=4))
    """`samples_per_task` ≥ 2: the per-task group the baseline is the mean of."""
    scale_rewards: bool = False
    """The baseline is subtracted, nothing divided."""
    algo = "ppo"


@register_algorithm
class PPO(GRPO):
    config_class = PPOConfig
