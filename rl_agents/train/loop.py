"""The training loop one Ray Train worker runs.

Every worker holds the whole (small: token ids) dataset and derives the same deterministic plan:
per epoch, `length_grouped_batches` (seeded by `seed + epoch`) gives global batches; each is
sorted by length and cut into `num_workers × grad_accum` micro-batches, micro-batch k going to
rank k % W as accumulation slot k // W. So 1 worker × 2 accumulation steps and 2 workers × 1
see the very same micro-batches (same padding, same loss), and the data position is just the
global step: a resume restarts at the step after the checkpoint, none repeated or skipped. The
last, incomplete global batch of each epoch is dropped.

Micro-batch losses (means over their units: pairs, or agent tokens for SFT) are weighted by
units_m · W · G / units_global before backward; DeepSpeed/DDP divide by G and average over W, so
the gradient is exactly that of the global-batch mean.

On-policy objectives (PPO): before the first step, every rank computes the old per-token log-probs
of the examples it trains on in epoch 0 with the initial policy, on exactly those micro-batches and
through the loss's own forward (`Forward.sequence_logps`), then all ranks exchange them. So the ratio is
exactly 1 on every micro-batch of the first optimizer step. They are saved with the checkpoints
(like the DPO reference) and reused on resume.

Model wrapping: `deepspeed.initialize` with a torch AdamW as client optimizer (no JIT-compiled
DeepSpeed optimizer ops) and ZeRO 0-3, or torch DistributedDataParallel. Never `prepare_model`.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import math
import os
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from rl_agents import storage
from rl_agents.batches import PairBatch, PPOBatch, PPOExample
from rl_agents.collate import collate_pairs, collate_ppo, collate_sequences, length_grouped_batches
from rl_agents.models import resolve_model
from rl_agents.train.checkpoint import (load_state, publish_checkpoint, reported_checkpoint_dir, resume_dir, save_hf,
                                        save_state, staging_error)
from rl_agents.train.config import TrainConfig
from rl_agents.train.forward import Forward, unwrap
from rl_agents.train.metrics import MetricsLogger, StepMetrics
from rl_agents.train.objective import Objective


# ---- data plan ---------------------------------------------------------------------------------
def example_length(example) -> int:
    """Padded length an example occupies (a pair shares one length for its concatenated pass)."""
    return max(len(example[0]), len(example[1])) if isinstance(example, (tuple, list)) else len(example)


def example_ids(example) -> list[int]:
    """The token ids that order an example within its batch (a pair: its chosen sequence)."""
    if isinstance(example, (tuple, list)):
        example = example[0]
    return example.sequence.input_ids if isinstance(example, PPOExample) else example.input_ids


def batch_keys(examples, cfg: TrainConfig) -> list[int] | None:
    """How examples are grouped into batches and cut into micro-batches: with `share_prefixes`,
    step-level data (prefixes shared across examples: StepAgent's steps and samples) by
    lexicographic rank (`rl_agents.packing.sort_keys`), so a global batch holds the steps of a few
    expert trajectories and each micro-batch runs its shared prefix once; None = by length (the
    length-grouped batches of `length_grouped_batches`: least padding). Either way every example is
    used once per epoch and the batch order is shuffled."""
    from rl_agents.packing import sort_keys

    return sort_keys([example_ids(e) for e in examples]) if cfg.share_prefixes else None


def epoch_plan(lengths: list[int], cfg: TrainConfig, epoch: int, keys: list[int] | None = None) -> list[list[list[int]]]:
    """Steps of one epoch; each step is the list of W·G micro-batches (lists of example indices).
    Batches are grouped (`length_grouped_batches`) and sorted by `keys` (`batch_keys`), or by
    length, then cut."""
    bs, mb = cfg.optim.batch_size, cfg.optim.micro_batch_size
    order = keys if keys is not None else lengths
    steps = []
    for batch in length_grouped_batches(order, bs, seed=cfg.seed + epoch):
        if len(batch) < bs:
            continue  # the epoch's incomplete last batch
        batch = sorted(batch, key=lambda i: (order[i], i))
        steps.append([batch[k:k + mb] for k in range(0, bs, mb)])
    return steps


def steps_per_epoch(num_examples: int, cfg: TrainConfig) -> int:
    return num_examples // cfg.optim.batch_size


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up over ceil(ratio · total) steps (no step at lr 0), then cosine decay towards 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


# ---- model -------------------------------------------------------------------------------------
def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.optim.batch_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "steps_per_print": 10**9,
    }


def build_model(cfg: TrainConfig, model_dir: str) -> tuple[torch.nn.Module, object]:
    """-> (model, keep-alive handle). Under ZeRO-3 the model is built already partitioned
    (`HfDeepSpeedConfig` makes `from_pretrained` use `deepspeed.zero.Init`), so no rank ever holds
    the full weights; transformers keeps only a weak reference to that config, hence the handle."""
    from rl_agents.models import load_model

    handle = None
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # joins Ray's process group
        handle = HfDeepSpeedConfig(deepspeed_config(cfg))
    model = load_model(model_dir, dtype=getattr(torch, cfg.model.dtype))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                 lora_dropout=cfg.lora.dropout,
                                                 target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    model.config.use_cache = False
    return model, handle


def wrap(model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device):
    """-> (model to call, optimizer, scheduler). DeepSpeed engine or DDP."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio))
    if cfg.deepspeed.enabled:
        import deepspeed

        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
        return engine, ds_optimizer, ds_scheduler
    model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cfg.use_gpu else None)
    return ddp, optimizer, scheduler


def _setup_worker(cfg: TrainConfig) -> None:
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(cfg.threads_per_worker or cfg.cpus_per_worker)
        if cfg.deepspeed.enabled:
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~60 s) at init; it serves
            # only inference all-reduces, never training collectives (gloo), so we skip building it.
            # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm re-exports it.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank


# ---- reference ---------------------------------------------------------------------------------
def precompute_reference(fwd: Forward, examples, cfg: TrainConfig, pad_id: int, rank: int, world: int,
                         device: torch.device) -> list[tuple[list[list[float]], list[list[float]]]]:
    """Per-turn [reply, end-of-turn] reference log-probs of every pair (`Forward.pair_turn_logps`), from the
    initial policy: each rank scores a shard
    (length-sorted micro-batches, chunk c on rank c % W), then all ranks exchange their shards."""
    keys = batch_keys(examples, cfg)
    order = sorted(range(len(examples)), key=lambda i: (keys[i] if keys else example_length(examples[i]), i))
    mb = cfg.optim.micro_batch_size
    chunks = [order[k:k + mb] for k in range(0, len(order), mb)]
    mine: dict[int, tuple[list[float], list[float]]] = {}
    model = fwd.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for c in range(rank, len(chunks), world):
            idx = chunks[c]
            batch = collate_pairs([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id)
            ref_c, ref_r = fwd.pair_turn_logps(batch.to(device))
            for k, i in enumerate(idx):
                mine[i] = (ref_c[k, :examples[i][0].num_turns].tolist(), ref_r[k, :examples[i][1].num_turns].tolist())
    model.train(was_training)
    shards: list = [None] * world
    dist.all_gather_object(shards, mine)
    merged = {i: v for shard in shards for i, v in shard.items()}
    return [merged[i] for i in range(len(examples))]


def precompute_old_logps(fwd: Forward, examples, lengths: list[int], cfg: TrainConfig, pad_id: int, rank: int,
                         world: int, device: torch.device) -> list[list[float]]:
    """Per-token log-probs (aligned with each sequence, 0 off the agent tokens) of every PPO example
    under the initial policy. Each rank scores the micro-batches it trains on in epoch 0 — the same
    collation and forward as the loss, so the first step's ratio is exactly 1 — plus a share of the
    examples epoch 0 drops (the incomplete last batch); then all ranks exchange their values.
    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    plan = epoch_plan(lengths, cfg, 0, batch_keys(examples, cfg))
    mine: list[list[int]] = [step[g * world + rank] for step in plan for g in range(cfg.grad_accum)]
    planned = {i for step in plan for micro in step for i in micro}
    left = sorted((i for i in range(len(examples)) if i not in planned), key=lambda i: (lengths[i], i))
    mb = cfg.optim.micro_batch_size
    chunks = [left[k:k + mb] for k in range(0, len(left), mb)]
    rounds = -(-len(chunks) // world)
    mine += [chunks[c] if c < len(chunks) else [] for c in range(rank, rounds * world, world)]
    out: dict[int, list[float]] = {}
    model = fwd.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in mine:
            scored = idx or chunks[0]  # a rank without a chunk of its own repeats one (same number of passes)
            batch = collate_sequences([examples[i].sequence for i in scored], pad_id).to(device)
            logps = fwd.sequence_logps(batch).float().cpu()  # (B, L)
            for k, i in enumerate(idx):
                out[i] = logps[k, :len(examples[i].sequence)].tolist()
    model.train(was_training)
    shards: list = [None] * world
    if world > 1:
        dist.all_gather_object(shards, out)
    else:
        shards = [out]
    merged = {i: v for shard in shards for i, v in shard.items()}
    return [merged[i] for i in range(len(examples))]


# ---- the loop ----------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: cfg (TrainConfig), objective (an `Objective`), data (examples or an
    ObjectRef to them), ref ('precompute' | 'adapter' | 'none' | per-example reference lists),
    run_dir, model_dir."""
    import ray
    import ray.train

    cfg: TrainConfig = config["cfg"]
    objective: Objective = config["objective"]
    _setup_worker(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    examples = config["data"]
    if isinstance(examples, ray.ObjectRef):
        examples = ray.get(examples)
    run_dir = storage.normalize(config["run_dir"])  # a path, or a URI (`rl_agents.storage`)
    model_dir = resolve_model(config["model_dir"])  # a URI: this node's copy of it

    model, _zero3_init = build_model(cfg, model_dir)  # noqa: F841 (kept alive on purpose)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    lengths = [example_length(e) for e in examples]
    keys = batch_keys(examples, cfg)
    per_epoch = steps_per_epoch(len(examples), cfg)
    total_steps = per_epoch * cfg.optim.epochs
    model, optimizer, scheduler = wrap(model, cfg, total_steps, device)
    model.train()
    fwd = Forward(model, share_prefixes=cfg.share_prefixes)
    ds = cfg.deepspeed.enabled

    start_step, reference = 0, None
    checkpoint = ray.train.get_checkpoint()
    with reported_checkpoint_dir(checkpoint) as reported:  # not Ray's as_directory: a race on S3
        ckpt_dir = resume_dir(reported, run_dir)  # a partial checkpoint is never resumed from
        if ckpt_dir is not None:
            with storage.as_local_dir(ckpt_dir) as local:  # Ray's fallback on a URI: a temporary copy
                state, reference = load_state(local, model=model, optimizer=optimizer, scheduler=scheduler,
                                              deepspeed=ds, lora=cfg.lora.enabled, rank=rank)
    if ckpt_dir is not None:
        if state["total_steps"] != total_steps or state["num_examples"] != len(examples):
            raise RuntimeError(f"checkpoint in {run_dir} is from a different run ({state['total_steps']} steps over "
                               f"{state['num_examples']} examples, now {total_steps} over {len(examples)}); "
                               "use another run name")
        start_step = state["global_step"]
        if rank == 0:
            name = storage.name(checkpoint.path if checkpoint is not None and str(ckpt_dir) == str(reported) else ckpt_dir)
            print(f"rl_agents.train: resuming {run_dir} at step {start_step} (checkpoint {name})", flush=True)
    ref_mode, t_ref, c_ref = config["ref"], time.perf_counter(), time.process_time()
    if objective.paired and reference is None:
        if isinstance(ref_mode, (list, tuple)):
            reference = list(ref_mode)
        elif ref_mode == "precompute":
            reference = precompute_reference(fwd, examples, cfg, pad_id, rank, world, device)
    if objective.on_policy:  # old log-probs: the initial policy's, or the checkpoint's on resume
        if reference is None:
            reference = precompute_old_logps(fwd, examples, lengths, cfg, pad_id, rank, world, device)
        examples = [dataclasses.replace(e, old_logps=old) for e, old in zip(examples, reference)]
    reference_s, reference_cpu_s = time.perf_counter() - t_ref, time.process_time() - c_ref

    def collate(idx: list[int]):
        if objective.on_policy:
            return collate_ppo([examples[i] for i in idx], pad_id).to(device)
        if not objective.paired:
            return collate_sequences([examples[i] for i in idx], pad_id).to(device)
        refs = [reference[i] for i in idx] if reference is not None else None
        return collate_pairs([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id,
                             ref_chosen=[r[0] for r in refs] if refs else None,
                             ref_rejected=[r[1] for r in refs] if refs else None).to(device)

    def checkpoint_and_report(step: int, metrics: dict) -> None:
        trainer_state = {"global_step": step + 1, "epoch": (step + 1) // max(per_epoch, 1),
                         "step_in_epoch": (step + 1) % max(per_epoch, 1), "steps_per_epoch": per_epoch,
                         "total_steps": total_steps, "num_examples": len(examples), "objective": objective.name}
        name = f"checkpoint_{step + 1:06d}"

        def upload(staged, dir_name: str):
            # Our own copy into the run directory (not Ray's): a failure names the file and its cause,
            # and the checkpoint gets its COMPLETE marker only once every rank's files are in place.
            dest = storage.join(run_dir, dir_name)
            publish_checkpoint(staged.path, dest, rank=rank, world=world, note=f"{dir_name}: {world} ranks\n",
                               fault=_write_fault(config, step + 1, rank, world, run_dir))
            fs = ray.train.get_context().get_storage().storage_filesystem
            return ray.train.Checkpoint(path=storage.filesystem(dest)[1], filesystem=fs)

        with tempfile.TemporaryDirectory(prefix="rl_agents_ckpt_") as tmp:
            try:
                save_hf(unwrap(model), tmp, source_dir=model_dir, lora=cfg.lora.enabled, rank=rank)
                save_state(tmp, model=model, optimizer=optimizer, scheduler=scheduler, deepspeed=ds,
                           lora=cfg.lora.enabled, rank=rank, trainer_state=trainer_state,
                           reference=reference)
            except (OSError, RuntimeError) as e:
                err = staging_error(tmp, e)
                if err is e:
                    raise
                raise err from None
            logger.sync()  # a URI run directory gets the metrics so far with each checkpoint
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload)
        # The controller registers a checkpoint when it has collected the report of every rank; a rank
        # dying before that loses it, and the restart would repeat steps. So wait for the commit.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    logger = MetricsLogger(run_dir, total_steps, start_step, enabled=rank == 0)
    trainable = [p for p in unwrap(model).parameters() if p.requires_grad]
    grad_accum = cfg.grad_accum
    plan_epoch, plan = -1, []
    try:
        for step in range(start_step, total_steps):
            epoch, k = divmod(step, per_epoch)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, epoch_plan(lengths, cfg, epoch, keys)
            _maybe_inject_fault(cfg, step, rank, world, run_dir)
            t0, c0 = time.perf_counter(), time.process_time()
            micro = plan[k]
            units_global = sum(objective.units(examples[i]) for m in micro for i in m)
            acc = StepMetrics()
            forward_tokens = fwd.tokens
            lr = scheduler.get_last_lr()[0]
            for g in range(grad_accum):
                idx = micro[g * world + rank]
                batch = collate(idx)
                units = sum(objective.units(examples[i]) for i in idx)
                sync = nullcontext() if ds or g == grad_accum - 1 else model.no_sync()
                with sync:
                    loss, metrics = objective(fwd, batch)
                    scaled = loss * (units * world * grad_accum / max(units_global, 1))
                    if ds:
                        model.backward(scaled)
                        model.step()  # DeepSpeed steps the optimizer and scheduler only at the boundary
                    else:
                        (scaled / grad_accum).backward()
                acc.add(metrics, units, *_token_counts(batch))
            if ds:
                grad_norm = model.get_global_grad_norm()
            else:
                max_norm = cfg.optim.max_grad_norm or float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            out = acc.reduce()
            elapsed = time.perf_counter() - t0
            out.update({"train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "train/lr": lr, "train/epoch": epoch, "perf/step_s": elapsed,
                        "perf/step_cpu_s": time.process_time() - c0,  # this rank's CPU time, all threads
                        "perf/tokens_per_s": out["perf/real_tokens"] / elapsed,
                        # positions the forward passes computed: padded rows, or fewer when packed
                        "perf/forward_tokens": fwd.tokens - forward_tokens})
            if step == start_step:  # the reference pass before this attempt's first step
                out.update({"perf/reference_s": reference_s, "perf/reference_cpu_s": reference_cpu_s})
            logger.log(step, out)
            last = step == total_steps - 1
            if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                checkpoint_and_report(step, out)
    finally:
        logger.close()


def _token_counts(batch) -> tuple[int, int]:
    """(real, computed) tokens of a micro-batch's forward pass (a pair batch runs 2B rows)."""
    if isinstance(batch, PPOBatch):
        batch = batch.tokens
    sides = (batch.chosen, batch.rejected) if isinstance(batch, PairBatch) else (batch,)
    return sum(int(t.attention_mask.sum()) for t in sides), sum(t.attention_mask.numel() for t in sides)


def _write_fault(config: dict, global_step: int, rank: int, world: int, run_dir: str):
    """Testing hook (`config["write_fault"]`, set by `train` from `$RL_AGENTS_TEST_WRITE_FAULT`,
    "<global step>:<errno name>", e.g. "3:ENOSPC"): the last rank's copy of that checkpoint into
    the run directory fails half-way with that OSError, on every attempt; each firing appends a
    line to `<run_dir>/.write_fault_fired`. None = no fault here."""
    spec = config.get("write_fault")
    if not spec or rank != world - 1:
        return None
    at, _, name = spec.partition(":")
    if int(at) != global_step:
        return None
    code = getattr(errno, name or "ENOSPC")

    def fault(target) -> None:
        marker = storage.join(run_dir, ".write_fault_fired")
        before = storage.read_text(marker) if storage.exists(marker) else ""
        storage.write_text(marker, before + f"rank {rank} checkpoint {global_step} {name or 'ENOSPC'}\n")
        raise OSError(code, os.strerror(code), str(target))
    return fault


def _maybe_inject_fault(cfg: TrainConfig, step: int, rank: int, world: int, run_dir: str) -> None:
    """Testing hook (`fault_injection_step`): the last rank dies once at the start of that step."""
    if step != cfg.fault_injection_step or rank != world - 1:
        return
    marker = storage.join(run_dir, ".fault_injected")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} exited at step {step}\n")
    os._exit(1)
