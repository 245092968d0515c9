"""`TrainConfig`: everything the Ray Train loop needs, as nested dataclasses validated on creation.

Errors are `ConfigError`s naming the dotted field (`optim.batch_size: ...`), raised before any
worker starts. Loadable from YAML with `key=value` overrides through `rl_agents.config.load_config`.
Defaults follow the papers where they have one (quoted per field); the algorithm configs
(ETO, DMPO, StepAgent) override them. The loss's own hyperparameters (β, γ, ε, ...) are not here:
they are fields of the objective (`rl_agents.train.objective`), set by the algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rl_agents import storage
from rl_agents.config import ConfigError


def _check(ok: bool, key: str, msg: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}, got {value!r}")


@dataclass
class ModelConfig:
    path: str = "tiny-llama"
    """Local Hugging Face checkpoint directory, a directory at a filesystem URI (`s3://...`: each
    worker's node copies it once), or an alias `rl_agents.models.resolve_model` knows
    (`smollm2-135m`, `tiny-llama`). Never downloaded from the hub."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype the weights are loaded and trained in without DeepSpeed (DDP: pure bf16 if `bfloat16`).
    With DeepSpeed keep float32 (the master weights) and set `deepspeed.bf16` for bf16 compute."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a peft LoRA adapter instead of all weights; checkpoints then hold the adapter only."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (peft `target_modules`) that get adapters; Llama attention projections by default."""

    def __post_init__(self):
        _check(self.r > 0, "lora.r", "must be > 0", self.r)
        _check(self.alpha > 0, "lora.alpha", "must be > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)", self.dropout)
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module",
               self.target_modules)


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    """Wrap the model with `deepspeed.initialize` (ZeRO); off = torch DistributedDataParallel."""
    zero_stage: int = 2
    """ZeRO stage 0-3: 1 shards optimizer states, 2 also gradients, 3 also the weights."""
    bf16: bool = False
    """DeepSpeed bf16 mixed precision: bf16 weights/activations, fp32 master weights in the optimizer."""

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3", self.zero_stage)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW. Papers: SFT 1e-5…2e-5, ETO/DMPO 1e-6, StepAgent 5e-7."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps with linear warm-up, then cosine decay to 0 (ETO SFT: 3%)."""
    epochs: int = 1
    """Passes over the data (ETO: 3 for SFT and DPO; StepAgent reflection: 1)."""
    batch_size: int = 32
    """Global batch: examples (sequences or pairs) per optimizer step, summed over workers and
    accumulation steps (ETO: 64 for SFT, 32 for DPO; StepAgent: 16)."""
    micro_batch_size: int = 1
    """Examples per forward/backward pass on one worker (a pair counts once; its two sides share a pass)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self):
        _check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "must be a finite number > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(0.0 <= self.warmup_ratio < 1.0, "optim.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(self.epochs > 0, "optim.epochs", "must be > 0", self.epochs)
        _check(self.batch_size > 0, "optim.batch_size", "must be > 0", self.batch_size)
        _check(self.micro_batch_size > 0, "optim.micro_batch_size", "must be > 0", self.micro_batch_size)
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 = no clipping)", self.max_grad_norm)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "must be two numbers in [0, 1)", self.betas)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which weights to train and in which dtype."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """peft LoRA adapter (off: full fine-tuning)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO settings (off: plain DDP)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, cosine schedule with warm-up, batch sizes, clipping."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; off = CPU and gloo."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker; on CPU also the torch thread count of each worker (unless
    `threads_per_worker` is set)."""
    threads_per_worker: int | None = None
    """torch intra-op threads of each CPU worker (None = `cpus_per_worker`). On one machine the
    rollout actors sit idle during an update, so an update may use more cores than it reserves
    (the demo: 1 reserved CPU, 2 threads on a 2-core laptop)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also needs, e.g. `{"trainer": 1}` for nodes started with
    `ray start --resources '{"trainer": 1}'` (CPU/GPU come from the fields above)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray Train places the workers over the nodes: packed (fewest nodes: fast all-reduce) by
    default."""
    storage_path: str = "~/rl_agents_runs"
    """Where Ray Train writes the run (`<storage_path>/<name>/`: checkpoints, metrics.jsonl,
    tensorboard/): a local or shared filesystem path, or a pyarrow filesystem URI (`s3://bucket/runs`,
    `gs://...`, S3 options in its query string: `rl_agents.storage`), which every node reaches by
    itself. On a multi-node cluster, where some node cannot read a path (or the model), the workers
    are all placed on the driver's node, which then needs room for them; shared storage or a URI
    lets them go anywhere."""
    name: str = ""
    """Run name; empty = `<objective>-<timestamp>`. Re-running with an existing name resumes that run."""
    seed: int = 0
    """Seeds the data order (shuffle per epoch) and torch."""
    share_prefixes: bool = True
    """Run the shared prefixes of a micro-batch once (tree attention, `rl_agents.packing`): step
    pairs and several samples per prefix (StepAgent) cost about their prefix once, not per row;
    step-level data is then batched by trajectory (a global batch holds the steps and samples of a
    few expert trajectories, not steps of similar length from many) so that such rows share
    micro-batches. Same log-probs and gradients per row; needs sdpa or eager attention (others
    run unpacked). Off: length-grouped batches, padded rows."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more compute)."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every this many optimizer steps (0 = only at the end). A killed
    run re-run with the same command resumes at the step after its last checkpoint."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints Ray keeps."""
    max_failures: int = 1
    """Worker-group restarts Ray Train attempts after a failure (each resumes from the latest checkpoint)."""
    fault_injection_step: int = -1
    """Testing hook: the last rank calls `os._exit(1)` at the start of this optimizer step, once per
    run (a marker file in the run directory stops it from firing again after the restart). -1 = off."""

    def __post_init__(self):
        _check(self.num_workers > 0, "num_workers", "must be > 0", self.num_workers)
        _check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _check(self.threads_per_worker is None or self.threads_per_worker > 0, "threads_per_worker",
               "must be > 0 or null", self.threads_per_worker)
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = only at the end)",
               self.checkpoint_every)
        _check(self.keep_checkpoints > 0, "keep_checkpoints", "must be > 0", self.keep_checkpoints)
        _check(self.max_failures >= 0, "max_failures", "must be >= 0", self.max_failures)
        _check(bool(self.storage_path), "storage_path", "must not be empty", self.storage_path)
        try:
            storage.check_uri(self.storage_path)
        except ValueError as e:
            raise ConfigError(f"storage_path: {e}") from None
        _check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "placement_strategy",
               "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD", self.placement_strategy)
        _check(all(isinstance(v, (int, float)) and v >= 0 for v in self.resources_per_worker.values()),
               "resources_per_worker", "must map resource names to amounts >= 0", self.resources_per_worker)
        per_step = self.optim.micro_batch_size * self.num_workers
        if self.optim.batch_size % per_step:
            raise ConfigError(f"optim.batch_size: must be a multiple of optim.micro_batch_size × num_workers "
                              f"= {per_step}, got {self.optim.batch_size}")
        if self.deepspeed.enabled and self.model.dtype != "float32":
            raise ConfigError(f"model.dtype: with DeepSpeed load float32 master weights and set deepspeed.bf16=true "
                              f"for bf16 compute, got {self.model.dtype!r}")

    @property
    def grad_accum(self) -> int:
        """Micro-batches each worker accumulates per optimizer step (derived)."""
        return self.optim.batch_size // (self.optim.micro_batch_size * self.num_workers)
