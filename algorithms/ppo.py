"""PPO on the final environment reward: the baseline of ETO §4.1 and StepAgent §6.2.

Per iteration: explore every train task `rollout.samples_per_task` (≥ 2) times with the current
policy (temperature sampling), give each trajectory the advantage

    A = R − mean(R of the same task's samples)                       (`step_advantages`, group = task)

and take PPO-clip steps (`algorithms.losses.PPOObjective`: `ppo_loss` with the entropy bonus and an
optional k3 KL) over all agent tokens of the trajectory, one advantage per sequence, token mean
over the batch. Old log-probs are recomputed by the training loop with the policy it starts from.

Choices the papers leave open (none of them reports PPO settings): no value network — the group
mean of the task's own samples is the baseline (as in RLOO/GRPO without std scaling; a critic
would need its own training on sparse final rewards); no discounting inside the trajectory (the
only reward is final, so every turn's return is R); a task whose samples all got the same reward
gives advantage 0 (its tokens still count in the entropy/KL means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from algorithms.base import Algorithm, AlgorithmConfig, explore_metrics, register_algorithm
from algorithms.losses.ppo import PPOObjective
from algorithms.stepagent import reflection_train
from rl_agents.config import ConfigError
from rl_agents.rollout_group import RolloutSection
from rl_agents.train.config import TrainConfig


@dataclass
class PPOConfig(AlgorithmConfig):
    loss: PPOObjective = field(default_factory=lambda: PPOObjective(entropy_coef=1e-3))
    """PPO-clip: `loss.clip_eps` (Schulman et al. 2017: 0.2; ETO/StepAgent report none),
    `loss.entropy_coef` (1e-3 as in verl's PPO defaults — Schulman et al.'s Atari 0.01 inflates token
    entropies over a 49k vocabulary), `loss.kl_coef` (k3 KL to the policy each update starts from;
    0 = off, no paper uses one)."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(samples_per_task=4))
    """`samples_per_task` ≥ 2: the per-task group the baseline is the mean of."""
    train: TrainConfig = field(default_factory=reflection_train)
    """No paper reports PPO settings: StepAgent's reflection stage (§6.4: lr 5e-7, batch 16, 1 epoch),
    the stage PPO stands in for in its comparison."""
    algo = "ppo"

    def __post_init__(self):
        super().__post_init__()
        if self.rollout.samples_per_task < 2:
            raise ConfigError(f"rollout.samples_per_task: PPO's baseline is the mean reward of a task's samples, "
                              f"needs >= 2, got {self.rollout.samples_per_task}")


@register_algorithm
class PPO(Algorithm):
    config_class = PPOConfig

    def training_step(self) -> dict[str, Any]:
        import torch

        from algorithms.losses.ppo import step_advantages
        from rl_agents.batches import PPOExample
        from rl_agents.tokenization import encode_trajectory

        explored = self.explore()
        usable = [t for t in explored if not t.metadata.get("error") and t.agent_turns]
        metrics: dict[str, Any] = {**explore_metrics(explored), "data/ppo_examples": len(usable)}
        if not usable:
            return metrics
        tasks: dict[str, int] = {}
        groups = [tasks.setdefault(t.task_id, len(tasks)) for t in usable]  # group = task
        rewards = torch.tensor([float(t.reward) for t in usable], dtype=torch.float32)  # (N,) final rewards
        advantages = step_advantages(rewards, groups)  # (N,) reward − the task's mean
        seg = self.segmenter()
        data = [PPOExample(encode_trajectory(t, seg), a, r)
                for t, a, r in zip(usable, advantages.tolist(), rewards.tolist())]
        metrics.update({"reward/mean": rewards.mean().item(), "advantage/abs_mean": advantages.abs().mean().item(),
                        "data/zero_advantage_frac": (advantages == 0).float().mean().item()})
        metrics.update(self.update(data))
        return metrics
