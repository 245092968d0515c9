"""GRPO and GiGPO: group-relative policy optimisation of the whole multi-turn episode.

GRPO (Shao et al. 2024, DeepSeekMath §4.1; `algo: grpo`). Per iteration: explore every train task
`rollout.samples_per_task` (G ≥ 2) times from identical resets with the current policy, give each
episode the advantage

    A_i = (R_i − mean_j R_j) / (std_j R_j + 1e-6)        over the task's G episodes  (`step_advantages`)

(`scale_rewards: false` drops the division: Dr. GRPO, Liu et al. 2025), put it on every agent
token of the episode (observation tokens carry none: `action_mask`), and take PPO-clip steps
(`algorithms.losses.PPOObjective`: `loss.clip_eps`/`loss.clip_high` (DAPO's clip-higher),
`loss.loss_agg` token-mean (DAPO) / seq-mean-token-mean (GRPO) / seq-mean-token-sum-norm
(Dr. GRPO), optional `loss.kl_coef`). `zero_variance: drop` leaves out the tasks whose episodes
all got advantage 0 (DAPO's dynamic-sampling filter, without its re-sampling: for GRPO, the tasks
whose G episodes got the same reward; GiGPO keeps such a task while its step groups still tell
its actions apart): they only dilute the loss's mean and the entropy/KL terms. An update whose
every advantage is 0, with no entropy or KL term, would not move the policy and is skipped
(`train/skipped` = 1).

GiGPO (Feng et al. 2025; `algo: gigpo`): the same episode groups, plus step groups: the steps of
one task's G episodes taken in the same anchor state. Each step's advantage is the episode's plus
ω times its discounted return relative to its step group (`algorithms.losses.gigpo`, eqs. 3-8).
The anchor state (`anchor`) is the env's exact state key where the env gives one
(`info["state_key"]`, e.g. ALFWorld's PDDL facts), else the observation text the action answered
(the paper's choice): "Nothing happens." after different failed commands is one text but many states.

The PPO baseline (`algo: ppo`, `algorithms.ppo`) is this algorithm with `scale_rewards: false`,
every task kept and the token-mean loss.

Deviations (docs/papers.md): the episode is one training sequence with per-turn advantages (the
authors' verl-agent trains each step as its own prompt, a window of recent history + the current
observation; with the full history as context the per-token terms are the same); no invalid-action
penalty (our envs answer an unparsable action like any other); the KL term, when on, is to the
policy the update starts from, not to the SFT reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from algorithms.base import Algorithm, AlgorithmConfig, explore_metrics, register_algorithm
from algorithms.losses.ppo import PPOObjective
from algorithms.stepagent import reflection_train
from rl_agents.config import ConfigError
from rl_agents.rollout_group import RolloutSection
from rl_agents.train.config import TrainConfig
from rl_agents.trajectory import Trajectory

logger = logging.getLogger(__name__)
ZERO_VARIANCE = ("keep", "drop")
ZERO = 1e-9
"""|advantage| at or below this counts as 0 (a group mean of equal rewards can differ from them by rounding)."""
ANCHORS = ("auto", "observation", "state")


@dataclass
class GRPOConfig(AlgorithmConfig):
    loss: PPOObjective = field(default_factory=lambda: PPOObjective(loss_agg="seq-mean-token-mean"))
    """PPO-clip without a critic: `loss.clip_eps` (0.2) and `loss.clip_high` (DAPO: 0.28),
    `loss.loss_agg` (GRPO's seq-mean-token-mean by default), `loss.entropy_coef`, `loss.kl_coef`
    (DeepSeekMath: 0.04 to the SFT model; 0 here, as DAPO and Dr. GRPO)."""
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(samples_per_task=8))
    """`samples_per_task` = G ≥ 2, the episode group (GiGPO's ALFWorld/WebShop runs: 8)."""
    train: TrainConfig = field(default_factory=reflection_train)
    """StepAgent's reflection-stage settings (lr 5e-7, batch 16, 1 epoch), as the PPO baseline."""
    scale_rewards: bool = True
    """Divide each advantage by its group's reward std (GRPO); false = mean only (Dr. GRPO)."""
    zero_variance: str = "keep"
    """"keep" | "drop" the tasks whose every advantage is 0 (GRPO: the same reward on all G episodes;
    DAPO drops them)."""
    algo = "grpo"

    def __post_init__(self):
        super().__post_init__()
        if self.rollout.samples_per_task < 2:
            raise ConfigError(f"rollout.samples_per_task: the baseline is the mean reward of a task's episodes, "
                              f"needs >= 2, got {self.rollout.samples_per_task}")
        if self.zero_variance not in ZERO_VARIANCE:
            raise ConfigError(f"zero_variance: must be one of {', '.join(ZERO_VARIANCE)}, got {self.zero_variance!r}")
        if not isinstance(self.scale_rewards, bool):
            raise ConfigError(f"scale_rewards: must be true or false, got {self.scale_rewards!r}")


@register_algorithm
class GRPO(Algorithm):
    config_class = GRPOConfig

    def advantages(self, trajs: list[Trajectory], groups: list[int]) -> tuple[list[float | list[float]], dict]:
        """One advantage per episode (GRPO; GiGPO gives one per agent turn), and metrics."""
        import torch

        from algorithms.losses.ppo import step_advantages

        rewards = torch.tensor([float(t.reward) for t in trajs], dtype=torch.float64)
        return step_advantages(rewards, groups, scale=self.config.scale_rewards).tolist(), {}

    def training_step(self) -> dict[str, Any]:
        from rl_agents.batches import PPOExample
        from rl_agents.tokenization import encode_trajectory

        explored = self.explore()
        usable = [t for t in explored if not t.metadata.get("error") and t.agent_turns]
        metrics: dict[str, Any] = explore_metrics(explored)
        tasks: dict[str, int] = {}
        groups = [tasks.setdefault(t.task_id, len(tasks)) for t in usable]  # group = task
        by_task: dict[int, set[float]] = {}
        for t, g in zip(usable, groups):
            by_task.setdefault(g, set()).add(t.reward)
        metrics["data/zero_variance_groups"] = sum(len(r) == 1 for r in by_task.values())
        advantages, extra = self.advantages(usable, groups) if usable else ([], {})
        metrics.update(extra)
        if self.config.zero_variance == "drop":  # tasks none of whose advantages differ from 0
            signal = {g for g, a in zip(groups, advantages) if any(abs(x) > ZERO for x in _as_list(a, 1))}
            usable, advantages = ([x for x, g in zip(xs, groups) if g in signal] for xs in (usable, advantages))
        metrics["data/ppo_examples"] = len(usable)
        if not usable:
            return metrics
        seg = self.segmenter()
        data = []
        for t, a in zip(usable, advantages):
            seq = encode_trajectory(t, seg)
            if isinstance(a, list):  # one per agent turn -> one per token (turn_index: agent turn or -1)
                a = [a[i] if i >= 0 else 0.0 for i in seq.turn_index]
            data.append(PPOExample(seq, a, float(t.reward)))
        per_episode = [[x for x, m in zip(_as_list(e.advantage, len(e.sequence)), e.sequence.action_mask) if m]
                       for e in data]  # each episode's advantages on its agent tokens
        metrics.update({"reward/mean": sum(t.reward for t in usable) / len(usable),
                        "advantage/abs_mean": sum(sum(map(abs, a)) / len(a) for a in per_episode) / len(data),
                        "data/zero_advantage_frac": sum(all(abs(x) <= ZERO for x in a) for a in per_episode) / len(data)})
        loss, tc = self.config.loss, self.config.train
        why = None
        if metrics["data/zero_advantage_frac"] == 1 and loss.entropy_coef == 0 and loss.kl_coef == 0:
            why = "every advantage is 0 and there is no entropy or KL term"
        elif len(data) < tc.optim.micro_batch_size * tc.num_workers:
            why = f"{len(data)} episodes are fewer than one micro-batch per worker"
        if why:
            logger.warning("%s iteration %d: no update (%s)", self.config.algo, self.iteration, why)
            return {**metrics, "train/skipped": 1}
        metrics.update(self.update(data))
        return metrics


def _as_list(advantage, n: int) -> list[float]:
    return advantage if isinstance(advantage, list) else [advantage] * n


@dataclass
class GiGPOConfig(GRPOConfig):
    loss: PPOObjective = field(default_factory=lambda: PPOObjective(loss_agg="token-mean"))
    """As GRPO's; token-mean (verl-agent's default aggregation)."""
    scale_rewards: bool = False
    """F_norm of eqs. 3 and 7: false = 1 (the "mean_norm" of the authors' runs), true = the group std."""
    gamma: float = 0.95
    """γ of the step returns (eq. 5; the authors' 0.95)."""
    step_weight: float = 1.0
    """ω of eq. 8 (the authors' 1.0)."""
    anchor: str = "auto"
    """"auto" (the env's state key when it gives one, else the observation), "observation" or "state"."""
    algo = "gigpo"

    def __post_init__(self):
        super().__post_init__()
        for name, lo, hi in (("gamma", 0.0, 1.0), ("step_weight", 0.0, float("inf"))):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi):
                raise ConfigError(f"{name}: must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if self.anchor not in ANCHORS:
            raise ConfigError(f"anchor: must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")


def anchor_states(traj: Trajectory, anchor: str = "auto") -> list:
    """The anchor state of each agent turn: the env's `metadata["state_keys"]` (one per agent turn,
    the state the action was taken in) or the text of the observation the action answered (the
    user turn before it; the first action answers the task)."""
    keys = traj.metadata.get("state_keys")
    if anchor == "state" or (anchor == "auto" and keys is not None):
        if keys is None or len(keys) < traj.num_steps:
            raise ValueError(f"trajectory {traj.id or traj.task_id}: anchor 'state' needs one env state key per agent "
                             f"turn in metadata['state_keys'] (the env's info['state_key']), got "
                             f"{None if keys is None else len(keys)} for {traj.num_steps} turns")
        return [("state", k) for k in keys[:traj.num_steps]]
    out, last = [], None
    for turn in traj.turns:
        if turn.role == "user":
            last = turn.text
        elif turn.is_agent:
            out.append(("text", last))
    return out


@register_algorithm
class GiGPO(GRPO):
    config_class = GiGPOConfig

    def advantages(self, trajs: list[Trajectory], groups: list[int]) -> tuple[list[float | list[float]], dict]:
        from algorithms.losses.gigpo import gigpo_advantages

        c = self.config
        step_rewards = [[turn.reward for turn in t.agent_turns] for t in trajs]
        anchors = [anchor_states(t, c.anchor) for t in trajs]
        return gigpo_advantages(groups, [t.reward for t in trajs], step_rewards, anchors, gamma=c.gamma,
                                step_weight=c.step_weight, scale=c.scale_rewards)
