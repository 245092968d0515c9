"""What the trainer optimises: an `Objective` object, built by the algorithm, shipped to every worker.

    class MyObjective(Objective):            # a frozen dataclass: picklable, its fields are its hyperparameters
        name = "mine"
        def __call__(self, fwd, batch):      # fwd: rl_agents.train.forward.Forward on this worker's model
            logps = fwd.sequence_logps(batch)
            loss = ...
            return loss, {"loss/mine": loss.detach()}

    train(MyObjective(), data, TrainConfig())

The trainer knows nothing of β, γ or ε: they are fields of the objective (`algorithms.losses`:
`SFTObjective`, `DPOObjective`, `DMPOObjective`, `PPOObjective`), set once by the algorithm from
its config. `__call__(fwd, batch) -> (loss, metrics)`: `batch` is a `TokenBatch` (single
sequences), a `PairBatch` (`paired`) or a `PPOBatch` (`on_policy`); `loss` a scalar, the mean
over the micro-batch's units (`units`: agent tokens for SFT and PPO, pairs otherwise). The loop
re-weights micro-batches so that each step's gradient is exactly that of the global-batch mean.
`metrics` are detached scalars, means over the same units, keyed `group/name`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

Metrics = dict[str, torch.Tensor]


class Objective:
    """Base of every objective (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    """Names the run (`<name>-<timestamp>`) and the checkpoints' trainer state."""
    paired: ClassVar[bool] = False
    """Examples are (chosen, rejected) pairs of `EncodedSequence` (else single sequences)."""
    on_policy: ClassVar[bool] = False
    """Examples are `PPOExample`s whose old per-token log-probs the training loop precomputes with
    the policy it starts from (same micro-batches as the first epoch)."""

    def units(self, example: Any) -> int:
        """Weight of one example in the batch mean (default 1: one per pair)."""
        return 1

    def check_reference(self, ref: list) -> None:
        """Per-example reference log-probs given to `train(..., ref=[...])`: raise ValueError if this
        objective cannot use them (each turn is a number, or a [reply, end-of-turn] pair)."""

    def __call__(self, fwd, batch) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError


def agent_tokens(example) -> int:
    """Agent tokens of an `EncodedSequence` that carry loss (position 0 never does)."""
    return sum(1 for m in example.action_mask[1:] if m)
