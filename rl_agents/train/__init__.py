"""Training on Ray Train V2 `TorchTrainer` workers with DeepSpeed ZeRO (or DDP), DESIGN §8.

    from rl_agents.train import TrainConfig, train
    result = train("dpo", pairs, TrainConfig(num_workers=2))   # pairs: [(chosen, rejected)] EncodedSequences
    AutoModelForCausalLM.from_pretrained(result.checkpoint_path)

`train` is the driver: it validates the data against the objective, builds the `TorchTrainer`
(one Ray Train run under `<storage_path>/<name>/`, restarted from its latest checkpoint on a
worker failure) and returns the final checkpoint. The worker side is `rl_agents.train.loop`,
checkpoints `rl_agents.train.checkpoint`, metrics `rl_agents.train.metrics`, objectives
`algorithms.objectives`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_agents.batches import EncodedSequence
from rl_agents.train.config import (DeepSpeedConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig,
                                    TrainConfig)
from rl_agents.train.metrics import read_metrics

__all__ = ["DeepSpeedConfig", "LoraConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "TrainResult", "train"]

REF_MODES = ("precompute", "adapter", "none")


@dataclass
class TrainResult:
    checkpoint_path: str
    """Final checkpoint: HF layout (`AutoModelForCausalLM.from_pretrained`) or, with LoRA, a peft
    adapter (`PeftModel.from_pretrained(base, path)`); `trainer/` inside holds the resume state."""
    metrics: dict[str, Any]
    """Metrics of the last step."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every row of `<run_dir>/metrics.jsonl`, one per optimizer step trained (across restarts)."""
    run_dir: str = ""


def _check_data(objective, data: Sequence, cfg: TrainConfig) -> None:
    if len(data) < cfg.optim.batch_size:
        raise ValueError(f"{len(data)} examples are fewer than optim.batch_size={cfg.optim.batch_size}: "
                         "no optimizer step would run")
    if objective.on_policy:
        _check_ppo_data(objective, data)
        return
    for i, ex in enumerate(data):
        seqs = ex if objective.paired else (ex,)
        if objective.paired and not (isinstance(ex, (tuple, list)) and len(ex) == 2):
            raise TypeError(f"data[{i}]: objective {objective.name!r} takes (chosen, rejected) pairs of "
                            f"EncodedSequence, got {type(ex).__name__}")
        for s in seqs:
            if not isinstance(s, EncodedSequence):
                raise TypeError(f"data[{i}]: expected EncodedSequence, got {type(s).__name__}")
            if not any(s.action_mask[1:]):
                raise ValueError(f"data[{i}]: a sequence without agent tokens carries no loss")


def _check_ppo_data(objective, data: Sequence) -> None:
    import math

    from rl_agents.batches import PPOExample

    for i, ex in enumerate(data):
        if not isinstance(ex, PPOExample) or not isinstance(ex.sequence, EncodedSequence):
            raise TypeError(f"data[{i}]: objective {objective.name!r} takes PPOExample(sequence=EncodedSequence, "
                            f"advantage, reward), got {type(ex).__name__}")
        if not any(ex.sequence.action_mask[1:]):
            raise ValueError(f"data[{i}]: a sequence without agent tokens carries no loss")
        if not (math.isfinite(ex.advantage) and math.isfinite(ex.reward)):
            raise ValueError(f"data[{i}]: advantage and reward must be finite, got {ex.advantage}, {ex.reward}")
        for name in ("old_logps", "ref_logps"):
            values = getattr(ex, name)
            if values is not None and len(values) != len(ex.sequence):
                raise ValueError(f"data[{i}].{name}: expected {len(ex.sequence)} per-token values, got {len(values)}")


def _resolve_ref(objective, cfg: TrainConfig, ref, n: int):
    if not objective.paired:
        return "none"
    if ref is None:
        return "adapter" if cfg.lora.enabled else "precompute"
    if isinstance(ref, str):
        if ref not in REF_MODES or ref == "none":
            raise ValueError(f"ref for {objective.name!r} must be 'precompute', 'adapter' or per-example "
                             f"reference lists, got {ref!r}")
        if ref == "adapter" and not cfg.lora.enabled:
            raise ValueError("ref='adapter' needs lora.enabled (the reference is the adapter-disabled model)")
        return ref
    ref = [(list(map(float, c)), list(map(float, r))) for c, r in ref]
    if len(ref) != n:
        raise ValueError(f"ref has {len(ref)} entries for {n} examples")
    return ref


def train(objective: str, data: Sequence, cfg: TrainConfig, ref: str | Sequence | None = None) -> TrainResult:
    """Train `cfg.model` on `data` with `objective` on Ray Train workers; return the final checkpoint.

    objective: a name in `algorithms.objectives.OBJECTIVES` ("sft", "dpo", "dmpo", "step_dpo", "ppo").
    data: `EncodedSequence`s (SFT), (chosen, rejected) pairs of them (preference objectives) or
        `PPOExample`s (PPO; their old log-probs are precomputed on the workers with the initial policy).
    ref: the reference policy of preference objectives — "precompute" (default without LoRA: one
        no-grad pass of the initial policy over each worker's shard, stored with the checkpoints),
        "adapter" (default with LoRA: the model with its adapter disabled, every step), or
        per-example `(chosen_per_turn, rejected_per_turn)` log-prob lists computed elsewhere.
    Uses the running Ray cluster (or starts a local one).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from algorithms.objectives import get_objective
    from rl_agents.models import resolve_model
    from rl_agents.ray_utils import init_ray
    from rl_agents.train.loop import train_loop_per_worker

    obj = get_objective(objective)
    _check_data(obj, data, cfg)
    ref_mode = _resolve_ref(obj, cfg, ref, len(data))
    name = cfg.name or f"{objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = os.path.abspath(os.path.expanduser(cfg.storage_path))
    run_dir = Path(storage) / name
    model_dir = os.path.abspath(resolve_model(cfg.model.path))
    init_ray()
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "objective": objective, "data": ray.put(list(data)), "ref": ref_mode,
                           "run_dir": str(run_dir), "model_dir": model_dir},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_dir} finished without a checkpoint")
    return TrainResult(checkpoint_path=result.checkpoint.path, metrics=dict(result.metrics or {}),
                       history=read_metrics(run_dir / "metrics.jsonl"), run_dir=str(run_dir))
