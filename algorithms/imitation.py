"""SFT (behaviour cloning) and RFT (rejection-sampling fine-tuning): the imitation algorithms.

SFT (ETO §3.1, eq. 5): masked NLL on the agent turns of expert trajectories — the base agent of
every other algorithm. RFT (the ETO/StepAgent baseline): explore with the current policy, add
the trajectories that reached full reward to the expert data, fine-tune again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from algorithms.base import Algorithm, AlgorithmConfig, explore_metrics, register_algorithm
from algorithms.data import context_length, encode_trajectories, successful
from algorithms.losses.sft import SFTObjective
from rl_agents.train.config import OptimConfig, TrainConfig


def _sft_train() -> TrainConfig:
    # ETO §4.1 / App. B: SFT lr 1e-5, batch 64, 3 epochs, 3% warm-up, cosine.
    return TrainConfig(num_workers=1, optim=OptimConfig(lr=1e-5, batch_size=64, epochs=3, warmup_ratio=0.03))


@dataclass
class SFTConfig(AlgorithmConfig):
    loss: SFTObjective = field(default_factory=SFTObjective)
    """Masked token-mean NLL on the agent tokens (no hyperparameters)."""
    train: TrainConfig = field(default_factory=_sft_train)
    """Paper defaults (ETO): lr 1e-5, batch 64, 3 epochs, 3% warm-up, cosine decay."""
    algo = "sft"


@dataclass
class RFTConfig(SFTConfig):
    """As SFT (ETO's RFT baseline fine-tunes on expert + successful own trajectories)."""

    algo = "rft"


@register_algorithm
class SFT(Algorithm):
    config_class = SFTConfig

    def training_step(self) -> dict[str, Any]:
        experts = list(self.experts().values())
        data = encode_trajectories(experts, self.segmenter(), context_length(self.policy), what="expert trajectories")
        metrics = self.update(data)
        metrics["data/sft_examples"] = len(data)
        return metrics


@register_algorithm
class RFT(Algorithm):
    config_class = RFTConfig

    def training_step(self) -> dict[str, Any]:
        explored = self.explore()
        own = successful(explored)
        data = encode_trajectories(list(self.experts().values()) + own, self.segmenter(), context_length(self.policy))
        metrics = self.update(data)
        metrics.update({"data/sft_examples": len(data), "data/own_successes": len(own), **explore_metrics(explored)})
        return metrics
