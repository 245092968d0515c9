"""StepAgent-implicit (Deng et al., WWW'25, Alg. 1 with the implicit reward): Step-DPO.

Inspection (`algorithms.stepagent.inspect_steps`, shared with StepAgent-inverse): cut each
expert trajectory before every action (`algorithms.data.step_prefixes`) and let the agent produce
its own action for that expert prefix (1–3 practice samples per step).
Reflection: where the agent's action differs from the expert's, train step DPO (eq. 6) with the
expert action as chosen and the agent's as rejected, same prefix, against the reference = the
policy at the start of the iteration. Iterate.

Agent actions are kept token-exact (the ids the engine generated); the prefix is the expert's
context encoded exactly as a rollout would have built it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from algorithms.base import Algorithm, AlgorithmConfig, register_algorithm
from algorithms.losses.dpo import StepDPOObjective
from algorithms.stepagent import Practice, agrees_with_expert, inspect_steps, reflection_train, write_inspection
from rl_agents.config import ConfigError
from rl_agents.train.config import TrainConfig


@dataclass
class StepDPOConfig(AlgorithmConfig):
    loss: StepDPOObjective = field(default_factory=StepDPOObjective)
    """Step DPO: `loss.beta`. StepAgent gives none; ETO App. C found step-level DPO stable only with
    a larger β (0.5) and lower lr (1e-7) — raise β if training collapses."""
    practice_samples: int = 1
    """Agent actions sampled per inspected step (StepAgent: up to 3)."""
    max_steps_per_task: int | None = None
    """Inspect at most this many steps of each expert trajectory (None = all)."""
    train: TrainConfig = field(default_factory=reflection_train)
    """Paper defaults (StepAgent reflection): lr 5e-7, batch 16, 1 epoch."""
    algo = "step_dpo"

    def __post_init__(self):
        super().__post_init__()
        if self.practice_samples < 1:
            raise ConfigError(f"practice_samples: must be >= 1, got {self.practice_samples}")


@register_algorithm
class StepDPO(Algorithm):
    config_class = StepDPOConfig

    def inspect(self) -> list[Practice]:
        """(expert trajectory, step prompt, agent action ids) for every practice sample."""
        return inspect_steps(self, self.config.practice_samples, self.config.max_steps_per_task)

    def training_step(self) -> dict[str, Any]:
        from algorithms.data import context_length, step_source, within_context
        from rl_agents.tokenization import encode_step

        seg = self.segmenter()
        samples = self.inspect()
        data, agrees, paired = [], [], []
        for practice in samples:
            expert, sp, agent_ids = practice
            agrees.append(agrees_with_expert(seg, practice))  # if so, nothing to contrast
            paired.append(not agrees[-1] and bool(agent_ids))
            if paired[-1]:
                data.append((encode_step(expert, sp.step, sp.expert_turn.text, seg),
                             encode_step(expert, sp.step, agent_ids, seg)))
        pos = [i for i, ok in enumerate(paired) if ok]  # data[j] came from samples[pos[j]]
        keep = within_context(data, [step_source(samples[i].expert, samples[i].prompt.step) for i in pos],
                              context_length(self.policy), what="step pairs")  # drops (and names) the too long
        kept = {pos[j] for j in keep}
        data, paired = [data[j] for j in keep], [i in kept for i in range(len(samples))]
        write_inspection(self, samples, agrees, paired=paired)
        metrics: dict[str, Any] = {"inspect/steps": len(samples),
                                   "inspect/expert_agreement": sum(agrees) / max(len(samples), 1), "data/pairs": len(data)}
        if data:
            metrics.update(self.update(data))
        return metrics
