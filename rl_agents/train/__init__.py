"""Training on Ray Train V2 `TorchTrainer` workers with DeepSpeed ZeRO (or DDP).

    from rl_agents.train import TrainConfig, train
    result = train(objective, pairs, TrainConfig(num_workers=2))  # pairs: [(chosen, rejected)] EncodedSequences
    # objective: an `Objective` with its hyperparameters, e.g. the algorithms layer's DPOObjective(beta=0.1)
    AutoModelForCausalLM.from_pretrained(result.checkpoint_path)

`train` is the driver: it validates the data against the objective, builds the `TorchTrainer`
(one Ray Train run under `<storage_path>/<name>/`, restarted from its latest complete checkpoint
on a worker failure, at most `max_failures` times) and returns the final checkpoint. A failure a
restart cannot fix is raised at once instead, as the worker raised it: a write into the run
directory that failed for want of space, quota or permission (`rl_agents.fileio.WriteError`,
"cannot write <path>: No space left on device (the disk is full: ...)") or a tampered checkpoint
(`rl_agents.train.checkpoint.UnsafeCheckpointError`). The worker side is `rl_agents.train.loop`,
checkpoints `rl_agents.train.checkpoint`, metrics `rl_agents.train.metrics`, the forward passes
`rl_agents.train.forward`; what is optimised is the `Objective` object the caller gives
(`rl_agents.train.objective`), with its own hyperparameters.
"""

from __future__ import annotations

import numpy as np

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_agents import storage
from rl_agents.batches import EncodedSequence
from rl_agents.train.config import DeepSpeedConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from rl_agents.train.metrics import read_metrics
from rl_agents.train.objective import Objective

__all__ = ["DeepSpeedConfig", "LoraConfig", "ModelConfig", "Objective", "OptimConfig", "TrainConfig",
           "TrainResult", "train"]

REF_MODES = ("precompute", "adapter", "none")
WRITE_FAULT_ENV = "RL_AGENTS_TEST_WRITE_FAULT"
"""Testing hook: "<global step>:<errno name>" makes that checkpoint's copy into the run directory fail
(`rl_agents.train.loop._write_fault`)."""
# Tries of a worker group's start beyond the first (Ray's FailureConfig.controller_failure_limit, whose
# default -1 retries forever: after an OOM kill left the CPUs held, a benchmark waited on it for good).
START_RETRIES = 2
STARTUP_ERRORS = ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError")  # Ray's, by name (internal)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint_path: str
    """Final checkpoint: HF layout (`AutoModelForCausalLM.from_pretrained`) or, with LoRA, a peft
    adapter (`PeftModel.from_pretrained(base, path)`); `trainer/` inside holds the resume state. A
    URI when `storage_path` is one: `rl_agents.models.resolve_model(uri)` gives a local copy."""
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
        per_token = isinstance(ex.advantage, (list, tuple))
        if per_token and len(ex.advantage) != len(ex.sequence):
            raise ValueError(f"data[{i}].advantage: expected one number or {len(ex.sequence)} per-token values, "
                             f"got {len(ex.advantage)}")
        advantages = ex.advantage if per_token else [ex.advantage]
        if not (all(math.isfinite(a) for a in advantages) and math.isfinite(ex.reward)):
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
    def turns(values) -> list:  # per turn: a number (the whole turn) or [reply, end-of-turn]
        return [float(v) if np.ndim(v) == 0 else [float(x) for x in v] for v in values]

    ref = [(turns(c), turns(r)) for c, r in ref]
    if len(ref) != n:
        raise ValueError(f"ref has {len(ref)} entries for {n} examples")
    objective.check_reference(ref)
    return ref


def train(objective: Objective, data: Sequence, cfg: TrainConfig, ref: str | Sequence | None = None) -> TrainResult:
    """Train `cfg.model` on `data` with `objective` on Ray Train workers; return the final checkpoint.

    objective: what to optimise, with its hyperparameters (`algorithms.losses`: `SFTObjective()`,
        `DPOObjective(beta=0.1)`, `DMPOObjective(beta, gamma)`, `PPOObjective(clip_eps, ...)`); it is
        pickled to every worker.
    data: `EncodedSequence`s (SFT), (chosen, rejected) pairs of them (preference objectives) or
        `PPOExample`s (PPO; their old log-probs are precomputed on the workers with the initial policy).
    ref: the reference policy of preference objectives — "precompute" (default without LoRA: one
        no-grad pass of the initial policy over each worker's shard, stored with the checkpoints),
        "adapter" (default with LoRA: the model with its adapter disabled, every step), or
        per-example `(chosen_per_turn, rejected_per_turn)` log-prob lists computed elsewhere.
    Uses the running Ray cluster (or starts a local one).

    Raises `WriteError` (disk full, read-only, no permission, quota: not retried) when writing the run
    directory fails, `UnsafeCheckpointError` for a checkpoint that would unpickle code; other worker
    failures are retried `cfg.max_failures` times, then Ray's `WorkerGroupError` is raised. A worker
    group that cannot start (the resources never free up) is tried `START_RETRIES` + 1 times, then
    Ray's `ControllerError` is raised: Ray's own default retries it forever, so a run hung.
    """
    import ray
    from ray.train import (CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError,
                           WorkerGroupError)
    from ray.train.torch import TorchConfig, TorchTrainer

    from rl_agents.models import resolve_model
    from rl_agents.ray_utils import init_ray
    from rl_agents.train.loop import train_loop_per_worker

    if not isinstance(objective, Objective):
        raise TypeError(f"objective: expected an rl_agents.train.Objective (e.g. algorithms.losses.DPOObjective(beta=0.1)), "
                        f"got {type(objective).__name__} {objective!r}")
    _check_data(objective, data, cfg)
    ref_mode = _resolve_ref(objective, cfg, ref, len(data))
    name = cfg.name or f"{objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    store = storage.normalize(cfg.storage_path)  # a path, or a URI every node reaches by itself
    run_dir = storage.join(store, name)
    # A URI model is copied by each worker's node (`resolve_model`); a local one must be there already.
    model_dir = cfg.model.path if storage.is_uri(cfg.model.path) else os.path.abspath(resolve_model(cfg.model.path))
    if storage.is_uri(store):
        ray_fs, ray_path = storage.filesystem(store)
    else:
        ray_fs, ray_path = None, store
        _set_aside_torn_snapshot(Path(run_dir))
    init_ray()
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}), **cfg.resources_per_worker}
    resources.update(_pin_to_driver_node(cfg, store, model_dir))
    loop_config = {"cfg": cfg, "objective": objective, "data": ray.put(list(data)), "ref": ref_mode,
                   "run_dir": run_dir, "model_dir": model_dir, "write_fault": os.environ.get(WRITE_FAULT_ENV)}
    failures = 0
    while True:
        # Ray Train retries every worker error (FailureConfig.max_failures), so restarts are ours: a
        # new `fit` of the same run resumes from its latest checkpoint, like Ray's own restart.
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
            run_config=RunConfig(name=name, storage_path=ray_path, storage_filesystem=ray_fs,
                                 failure_config=FailureConfig(max_failures=0,
                                                              controller_failure_limit=START_RETRIES),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        )
        try:
            result = _fit(trainer)
            break
        except TrainingFailedError as e:
            fatal = _fatal_error(e, run_dir)
            if fatal is not None:
                raise fatal from None
            if not isinstance(e, WorkerGroupError):
                if type(getattr(e, "controller_failure", None)).__name__ in STARTUP_ERRORS:
                    e.add_note(f"rl_agents: run {run_dir} asked for {cfg.num_workers} worker(s) × {resources}; "
                               f"a start is tried {START_RETRIES + 1} times, each waiting "
                               f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s; raise it where nodes "
                               f"take longer to join)")
                raise
            if failures >= cfg.max_failures:
                raise
            failures += 1
            logger.warning("run %s: worker failure %d of at most %d, restarting from its latest checkpoint: %s",
                           run_dir, failures, cfg.max_failures, e)
            if ray_fs is None:
                _set_aside_torn_snapshot(Path(run_dir))
    history = read_metrics(storage.join(run_dir, "metrics.jsonl"))
    if result.checkpoint is not None:  # its path in Ray's filesystem: as a path or URI of ours
        return TrainResult(checkpoint_path=storage.join(run_dir, storage.name(result.checkpoint.path)),
                           metrics=dict(result.metrics or {}), history=history, run_dir=run_dir)
    # Nothing reported: a finished run, re-run after its Ray snapshot was set aside (resumed at its end).
    from rl_agents.train.checkpoint import latest_complete

    final = latest_complete(run_dir)
    if final is None:
        raise RuntimeError(f"run {run_dir} finished without a checkpoint")
    last = {k: v for k, v in (history or [{}])[-1].items() if k != "step"}
    return TrainResult(checkpoint_path=str(final), metrics=last, history=history, run_dir=run_dir)


def _pin_to_driver_node(cfg: TrainConfig, store: str, model_dir: str) -> dict[str, float]:
    """On a multi-node cluster where some node cannot read the storage path or the model (a node-local
    run directory), the workers' extra resource that keeps them on this (the driver's) node, where
    both are; {} otherwise (URIs: every node reaches them). `ConfigError` if that node cannot hold them."""
    from rl_agents.cluster import alive_nodes, multi_node, node_id, unreadable_nodes
    from rl_agents.config import ConfigError
    from rl_agents.models import MODEL_ALIASES

    if not multi_node():
        return {}
    blind = set()
    if not storage.is_uri(store):
        os.makedirs(store, exist_ok=True)
        blind |= set(unreadable_nodes(store))
    if str(cfg.model.path).lower() not in MODEL_ALIASES and not storage.is_uri(model_dir):  # an alias is built on every node
        blind |= set(unreadable_nodes(model_dir, probe=False))
    if not blind:
        return {}
    node = next(n for n in alive_nodes() if n["NodeID"] == node_id())
    ip, has = node["NodeManagerAddress"], node.get("Resources", {})
    need = {"CPU": cfg.cpus_per_worker * cfg.num_workers, "GPU": cfg.num_workers if cfg.use_gpu else 0}
    short = [k for k, v in need.items() if v and has.get(k, 0) < v]
    if short:
        raise ConfigError(
            f"train.storage_path: {store} (or the model {model_dir}) is not readable on {len(blind)} node(s), so "
            f"training must run on the driver's node {ip}, which has {', '.join(f'{has.get(k, 0):g} {k}' for k in short)} "
            f"for {', '.join(f'{need[k]:g} {k}' for k in short)}: put run_dir on storage every node mounts (docs/cluster.md)")
    logger.info("train: %d node(s) cannot read %s or %s; training workers stay on the driver's node %s "
                "(put train.storage_path on shared storage to let them go anywhere)", len(blind), store, model_dir, ip)
    return {f"node:{ip}": 0.001}


def _fit(trainer):
    """`trainer.fit()`, with Ctrl-C ending in `KeyboardInterrupt` as everywhere else.

    During `fit` Ray Train installs its own SIGINT handler (it aborts the run gracefully, then
    returns, or exits the process with status 0) and leaves it installed afterwards. We wrap that
    handler to note the interrupt, let Ray abort the run, restore the previous handler, and raise
    `KeyboardInterrupt`, so that the CLI can say where the run stopped (exit 130) and the
    checkpoints written so far are what the next run resumes from."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(trainer, "_register_sigint_handler"):
        return trainer.fit()  # Tune trials run in threads: Ray installs no handler there either
    previous = signal.getsignal(signal.SIGINT)
    interrupted: list[int] = []
    register = trainer._register_sigint_handler

    def register_and_wrap(controller):
        register(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            interrupted.append(signum)
            if callable(ray_handler):
                ray_handler(signum, frame)
        signal.signal(signal.SIGINT, on_sigint)

    trainer._register_sigint_handler = register_and_wrap
    try:
        result = trainer.fit()
    except (SystemExit, Exception):
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _fatal_error(e: Exception, run_dir: Path) -> Exception | None:
    """The error of a failed `fit` that a restart cannot fix (it would redo the work, then fail the
    same way), as the worker (or the controller) raised it; None for any other failure."""
    from rl_agents.fileio import WriteError, write_error
    from rl_agents.train.checkpoint import FATAL_WRITE_ERRNOS, UnsafeCheckpointError

    causes = list(getattr(e, "worker_failures", {}).values())  # WorkerGroupError: {rank: error}
    if getattr(e, "controller_failure", None) is not None:  # ControllerError (e.g. its snapshot write)
        causes.append(e.controller_failure)
    for cause in causes:
        base = getattr(cause, "_base_exc", cause)  # Ray wraps a worker's exception with its traceback text
        if isinstance(base, UnsafeCheckpointError):
            return base
        if isinstance(base, OSError) and base.errno in FATAL_WRITE_ERRNOS:
            return base if isinstance(base, WriteError) else write_error(base.filename or run_dir, base)
    return None


def _set_aside_torn_snapshot(run_dir: Path) -> None:
    """Ray Train's controller rewrites `checkpoint_manager_snapshot.json` in place at every checkpoint;
    a full disk can leave it torn, and Ray then fails to start the run again (an `ActorDiedError` of
    its controller). Move such a file aside: the workers then resume from the newest complete
    checkpoint of the run directory (`rl_agents.train.checkpoint.resume_dir`)."""
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        json.loads(snapshot.read_text())
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError):
        aside = snapshot.with_name(f"{snapshot.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(snapshot, aside)
        logger.warning("Ray Train's snapshot of %s was torn (a failed write?): moved to %s; resuming from the "
                       "newest complete checkpoint", run_dir, aside.name)
