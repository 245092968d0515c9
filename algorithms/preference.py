"""ETO, DMPO and the DPO baseline: explore, pair with experts, preference update.

ETO (Song et al. 2024, Alg. 1): per iteration, explore the train tasks with the current policy,
pair each trajectory with the expert trajectory of its task by final reward (pairs with equal
rewards dropped), train with trajectory DPO (eq. 11) against the reference = the policy at the
start of the iteration, repeat.

DMPO (Shi et al. 2024): the same pairs (expert = win, the SFT agent's trajectory = lose) with the
DMPO loss (eq. 16, released-code turn weight). `setting="noisy"` keeps degenerate lose
trajectories (repeated actions, meaningless text), `"clean"` filters them (§5); with
`iterations > 1` it is the DMPO loss inside the ETO loop.

DPO baseline: pairs built once from the starting policy and reused (no re-exploration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from algorithms.base import Algorithm, AlgorithmConfig, explore_metrics, register_algorithm
from algorithms.data import is_noisy, trajectory_pairs
from algorithms.losses.dmpo import DMPOObjective
from algorithms.losses.dpo import DPOObjective
from rl_agents.config import ConfigError
from rl_agents.train.config import OptimConfig, TrainConfig
from rl_agents.trajectory import Pair, TrajectoryFormatError, read_pairs, require_agent_turns, write_pairs


def load_pairs_file(path: str, env_id: str) -> list[Pair]:
    """`pairs_file`'s pairs (either format), checked before any work: errors name file:line and field."""
    pairs = read_pairs(path, env_id=env_id)
    for chosen, rejected in pairs:
        for side in (chosen, rejected):
            require_agent_turns([side])
            if not side.env_id:
                side.env_id = env_id
    if not pairs:
        raise TrajectoryFormatError(f"{path}: no pairs")
    return pairs


def _pref_train() -> TrainConfig:
    # ETO §4.1: DPO lr 1e-6, batch 32, 3 epochs, cosine with 3% warm-up.
    return TrainConfig(num_workers=1, optim=OptimConfig(lr=1e-6, batch_size=32, epochs=3, warmup_ratio=0.03))


@dataclass
class ETOConfig(AlgorithmConfig):
    loss: DPOObjective = field(default_factory=DPOObjective)
    """Trajectory DPO: `loss.beta` (ETO: 0.1 on WebShop and ScienceWorld, 0.5 on ALFWorld)."""
    max_rejected_steps: int | None = None
    """Cap the lose trajectory at this many agent turns (ETO's released code caps it); None = no cap."""
    iterations: int = 2
    """Explore-train rounds (ETO: 2 on WebShop/ScienceWorld, 1 on ALFWorld)."""
    pairs_file: str | None = None
    """Preference pairs that stand in for the first iteration's exploration and pairing: ETO's pair
    format (`{"id", "prompt", "chosen", "rejected"}`, as its construct_preference.py writes them) or
    ours (an earlier run's `trajectories/pairs_iter0.jsonl`). Later iterations explore as usual
    (DMPO's `setting: clean` still filters the rejected side). None = explore and pair."""
    train: TrainConfig = field(default_factory=_pref_train)
    """Paper defaults (ETO): lr 1e-6, batch 32, 3 epochs, 3% warm-up, cosine."""
    algo = "eto"

    def __post_init__(self):
        super().__post_init__()
        if self.max_rejected_steps is not None and self.max_rejected_steps < 1:
            raise ConfigError(f"max_rejected_steps: must be >= 1 or null (no cap), got {self.max_rejected_steps}")
        if self.pairs_file is not None and not (isinstance(self.pairs_file, str) and self.pairs_file.strip()):
            raise ConfigError(f"pairs_file: must be a file or null, got {self.pairs_file!r}")


@register_algorithm
class ETO(Algorithm):
    config_class = ETOConfig

    def pairs(self) -> tuple[list, dict[str, Any]]:
        if self.config.pairs_file and self.iteration == 0:
            return load_pairs_file(self.config.pairs_file, self.config.env.env_id), {}
        explored = self.explore()
        pairs = trajectory_pairs(explored, self.experts(), max_rejected_steps=self.config.max_rejected_steps)
        return pairs, explore_metrics(explored)

    def training_step(self) -> dict[str, Any]:
        from algorithms.data import context_length, encode_pairs

        pairs, metrics = self.pairs()
        metrics["data/pairs"] = len(pairs)
        # What this iteration trained on; `rl-agents data convert ... --to conversation` gives ETO's format.
        write_pairs(self.run_dir / "trajectories" / f"pairs_iter{self.iteration}.jsonl", pairs)
        if not pairs:  # nothing to contrast: the policy matched the experts everywhere
            return metrics
        seg = self.segmenter()
        data = encode_pairs(pairs, seg, context_length(self.policy))  # drops (and names) pairs over the context
        metrics.update(self.update(data))
        return metrics


@dataclass
class DMPOConfig(ETOConfig):
    loss: DMPOObjective = field(default_factory=DMPOObjective)
    """The DMPO loss: `loss.beta`, `loss.gamma` (released code: 0.7; the paper sweeps 0.1 … 0.99),
    `loss.end_of_turn` ('turn': each turn's end-of-turn token weighted by its turn's φ; 'one': by 1,
    as the released trainer)."""
    setting: Literal["noisy", "clean"] = "noisy"
    """noisy: keep degenerate lose trajectories; clean: drop them (DMPO §5)."""
    iterations: int = 1
    """DMPO trains once from the SFT agent's trajectories; > 1 = the DMPO loss inside the ETO loop."""
    algo = "dmpo"


@register_algorithm
class DMPO(ETO):
    config_class = DMPOConfig

    def pairs(self):
        pairs, metrics = super().pairs()
        if self.config.setting == "clean":
            kept = [(c, r) for c, r in pairs if not is_noisy(r)]
            metrics["data/noisy_pairs_dropped"] = len(pairs) - len(kept)
            pairs = kept
        return pairs, metrics


@dataclass
class DPOConfig(ETOConfig):
    iterations: int = 1
    algo = "dpo"


@register_algorithm
class DPO(ETO):
    """Plain trajectory DPO on fixed pairs: exploration happens once, with the starting policy."""

    config_class = DPOConfig

    def pairs(self):
        if not hasattr(self, "_fixed"):
            self._fixed = super().pairs()
        return self._fixed
