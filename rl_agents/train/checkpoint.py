"""Checkpoints: HF-layout weights for serving, plus the state a resume needs (docs/design.md §6).

One checkpoint directory `<run_dir>/checkpoint_<step>/`. Each rank writes its own files into a
local staging directory, then copies them into the run directory itself (`publish_checkpoint`,
the `checkpoint_upload_fn` of `ray.train.report`); rank 0 writes `trainer/COMPLETE` once every
rank's copy succeeded, before reporting, so a directory without it is partial:

    config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index), tokenizer files
        full fine-tuning: loadable by `AutoModelForCausalLM.from_pretrained(dir)` and vLLM;
    adapter_config.json, adapter_model.safetensors
        LoRA: loadable by `PeftModel.from_pretrained(base, dir)`;
    trainer/state.json          step, epoch, position in the epoch, run facts (rank 0);
    trainer/reference.pt        the precomputed reference log-probs (rank 0), reused on resume;
    trainer/rng_rank{r}.pt      torch RNG of each rank (LoRA dropout);
    trainer/deepspeed/...       `engine.save_checkpoint`: weights, optimizer, scheduler (every rank);
    trainer/ddp_model.safetensors  without DeepSpeed: the trainable weights (rank 0);
    trainer/ddp.pt              without DeepSpeed: optimizer and scheduler state (rank 0);
    trainer/COMPLETE            written last (rank 0): every rank's files are in place.

Resuming unpickles nothing but tensors and plain containers: every `.pt` is read with
`torch.load(weights_only=True)` (`safe_load`), DeepSpeed's files too (its checkpoint engine's
loader is swapped for the duration of `load_checkpoint`, allowing only the three DeepSpeed
classes its ZeRO files hold: `deepspeed_safe_globals`). A file holding anything else raises
`UnsafeCheckpointError` naming it, without running any of it: run directories live on shared
storage, and whoever can write there must not be able to run code in the next resume.

A failed write into the run directory raises `rl_agents.fileio.WriteError` naming the file and
the cause; the partial directory is removed. `FATAL_WRITE_ERRNOS` (disk full, read-only, no
permission, quota) are not retried: the driver (`rl_agents.train.train`) raises them at once.

ZeRO-3 weights are gathered a shard at a time (`deepspeed.zero.GatheredParameters` over at most
`max_shard_bytes` of parameters), so no rank ever holds more than one shard of the full model.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from rl_agents import storage
from rl_agents.fileio import WriteError, write_error

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_NOT_COPIED = {"config.json", "generation_config.json", "rl_agents_model.json", "adapter_config.json"}


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: list[torch.nn.Parameter]):
    """Context in which ZeRO-3 partitioned `params` hold their full values on every rank."""
    if any(_is_zero3_param(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    from contextlib import nullcontext

    return nullcontext()


def _tensors(module: torch.nn.Module, trainable_only: bool) -> list[tuple[str, torch.Tensor]]:
    """Named parameters (tied weights once, under their first name) and persistent buffers."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        keys = set(module.state_dict().keys())
        named += [(n, b) for n, b in module.named_buffers() if n in keys]
    return named


def iter_gathered(module: torch.nn.Module, *, trainable_only: bool, max_shard_bytes: int, rank: int):
    """Yield dicts {name: cpu tensor} of at most ~max_shard_bytes (full tensors on rank 0, {} elsewhere).

    Collective under ZeRO-3: every rank must iterate it to the end.
    """
    named = _tensors(module, trainable_only)
    start = 0
    while start < len(named):
        end, size = start, 0
        while end < len(named) and (end == start or size + _nbytes(named[end][1]) <= max_shard_bytes):
            size += _nbytes(named[end][1])
            end += 1
        chunk = named[start:end]
        params = [t for _, t in chunk if isinstance(t, torch.nn.Parameter)]
        with _gathered(params):
            yield {n: t.detach().to("cpu", copy=True).contiguous() for n, t in chunk} if rank == 0 else {}
        start = end


def _nbytes(t: torch.Tensor) -> int:
    numel = t.ds_numel if _is_zero3_param(t) else t.numel()
    return numel * t.element_size()


def save_hf(model: torch.nn.Module, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike, lora: bool,
            rank: int, max_shard_bytes: int = 2 << 30) -> None:
    """Write HF-layout weights (or the peft adapter) of the unwrapped `model` into `out_dir` on rank 0.

    Collective: call on every rank (ZeRO-3 gathers need all of them).
    """
    out = Path(out_dir)
    if lora:
        state = {}
        for shard in iter_gathered(model, trainable_only=True, max_shard_bytes=max_shard_bytes, rank=rank):
            state.update(shard)
        if rank == 0:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        return
    from safetensors.torch import save_file

    files: list[tuple[str, list[str], int]] = []  # (temporary file, tensor names, bytes)
    dtypes = set()
    for k, shard in enumerate(iter_gathered(model, trainable_only=False, max_shard_bytes=max_shard_bytes, rank=rank)):
        if rank == 0:
            name = f".shard-{k:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append((name, list(shard), sum(t.numel() * t.element_size() for t in shard.values())))
            dtypes |= {t.dtype for t in shard.values() if t.is_floating_point()}
    if rank != 0:
        return
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for k, (tmp, names, nbytes) in enumerate(files):
            final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(out / tmp, out / final)
            weight_map.update({n: final for n in names})
            total += nbytes
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if len(dtypes) == 1:  # e.g. DeepSpeed bf16 trains (and saves) bf16 weights of a float32 checkpoint
        model.config.dtype = dtypes.pop()
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    copy_tokenizer_files(source_dir, out)


def copy_tokenizer_files(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Tokenizer and chat-template files of the source checkpoint (everything but weights/config)."""
    for f in Path(source_dir).iterdir():
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, Path(out_dir) / f.name)


# ---- resume state ------------------------------------------------------------------------------
COMPLETE = "trainer/COMPLETE"
DDP_WEIGHTS = "trainer/ddp_model.safetensors"
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT})
"""Write failures that a restart cannot fix (it would fail the same way after redoing the work)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's ZeRO 0-3 checkpoint files (fp32 and bf16) pickle besides tensors and
    plain containers, found by saving them (`torch.serialization.get_unsafe_globals_in_checkpoint`).
    Each is plain data without code run on unpickling: `weights_only` rebuilds them only through
    `__new__` plus an attribute update (no `__setstate__`/`__reduce__` of theirs), or, for the int
    enum, by value lookup."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # static loss scale: cur_scale, dynamic
    from deepspeed.runtime.zero.config import ZeroStageEnum  # int enum 0-3
    from deepspeed.utils.tensor_fragment import fragment_address  # dataclass (numel, start)

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, *, map_location="cpu", allowed: list | tuple = ()):
    """`torch.load(path, weights_only=True)`, also allowing the `allowed` classes; a file holding any
    other global raises `UnsafeCheckpointError` naming it, before anything in it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: a generic paragraph, then what it refused ("Trying to load unsupported GLOBAL ...")
        found = [line.strip() for line in str(e).splitlines() if line.strip()
                 and not line.startswith(("Weights only load failed", "Check the documentation"))]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain containers "
            f"({'; '.join(found) or e}); a checkpoint written by rl_agents never does, so the file may "
            "have been tampered with (nothing in it was run)") from None


@contextmanager
def _safe_deepspeed_loads(engine):
    """Make `engine.load_checkpoint` read every file through `safe_load` (DeepSpeed's own
    `TorchCheckpointEngine.load` unpickles with `weights_only=False`)."""
    ckpt_engine = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()
    had_own = "load" in vars(ckpt_engine)
    previous = vars(ckpt_engine).get("load")
    ckpt_engine.load = lambda path, map_location=None: safe_load(path, map_location=map_location, allowed=allowed)
    try:
        yield
    finally:
        if had_own:
            ckpt_engine.load = previous
        else:
            del ckpt_engine.load


def save_state(out_dir: str | os.PathLike, *, model, optimizer, scheduler, deepspeed: bool, lora: bool, rank: int,
               trainer_state: dict, reference: list | None) -> None:
    """Everything a resume needs, under `out_dir/trainer/`. Collective with DeepSpeed."""
    tdir = Path(out_dir) / "trainer"
    tdir.mkdir(parents=True, exist_ok=True)
    if deepspeed:
        # Frozen base weights are not state: with LoRA only the adapter is saved.
        model.save_checkpoint(str(tdir / "deepspeed"), tag="state", exclude_frozen_parameters=lora)
    elif rank == 0:
        from safetensors.torch import save_file

        trainable = {n: p.detach().cpu().contiguous() for n, p in model.module.named_parameters() if p.requires_grad}
        save_file(trainable, str(Path(out_dir) / DDP_WEIGHTS))
        # AdamW's and LambdaLR's state dicts are tensors, numbers and plain containers (LambdaLR
        # keeps None for a function lr_lambda): loadable with weights_only=True.
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tdir / "ddp.pt")
    torch.save(torch.get_rng_state(), tdir / f"rng_rank{rank}.pt")
    if rank == 0:
        (tdir / "state.json").write_text(json.dumps(trainer_state, indent=2))
        if reference is not None:
            torch.save(reference, tdir / "reference.pt")


def load_state(ckpt_dir: str | os.PathLike, *, model, optimizer, scheduler, deepspeed: bool, lora: bool,
               rank: int) -> tuple[dict, list | None]:
    """Restore weights, optimizer, scheduler and RNG; return (trainer_state, reference or None).

    Unpickles nothing but tensors and plain containers (`safe_load`): `UnsafeCheckpointError` otherwise."""
    tdir = Path(ckpt_dir) / "trainer"
    if deepspeed:
        with _safe_deepspeed_loads(model):
            path, _ = model.load_checkpoint(str(tdir / "deepspeed"), tag="state", load_module_strict=not lora)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tdir / 'deepspeed'}")
    else:
        saved = safe_load(tdir / "ddp.pt")
        weights_file = Path(ckpt_dir) / DDP_WEIGHTS
        if weights_file.exists():
            from safetensors.torch import load_file

            weights = load_file(str(weights_file))
        else:  # checkpoints written before the weights moved to safetensors
            weights = saved["model"]
        params = dict(model.module.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    rng = tdir / f"rng_rank{rank}.pt"
    if rng.exists():
        torch.set_rng_state(safe_load(rng))
    trainer_state = json.loads((tdir / "state.json").read_text())
    ref_path = tdir / "reference.pt"
    reference = safe_load(ref_path) if ref_path.exists() else None
    return trainer_state, reference


# ---- writing a checkpoint into the run directory ------------------------------------------------
def staging_error(path: str | os.PathLike, e: BaseException) -> BaseException:
    """What to raise for a failure writing the local staging copy under `path`: a `WriteError` for an
    OSError, or for torch's RuntimeError ("file write failed") when its file system is full."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError):
        return write_error(path, e)
    try:
        st = os.statvfs(path)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full:
        return write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return e


def _copy_tree(src: Path, dest: Path, fault=None) -> None:
    """Copy every file under `src` into `dest` (merged into what other ranks copy there). Files and
    directories get the umask's modes. `fault()` (testing hook) runs half-way through."""
    files = sorted(f for f in src.rglob("*") if f.is_file())
    for k, f in enumerate(files):
        target = dest / f.relative_to(src)
        try:
            if fault is not None and k == len(files) // 2:
                fault(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        except OSError as e:
            raise write_error(target, e) from None


def publish_checkpoint(local_dir: str | os.PathLike, dest: str | os.PathLike, *, rank: int, world: int,
                       note: str = "", fault=None) -> None:
    """Copy this rank's staged checkpoint files into `dest` (in the run directory: a path, or a URI
    of `rl_agents.storage`); once every rank's copy succeeded, rank 0 writes `dest/trainer/COMPLETE`.
    Collective (every rank, same `dest`).

    A failed copy on any rank raises the same `WriteError` on every rank (naming the file and the
    cause) and removes `dest`; a stale `dest` from a killed attempt is removed first."""
    import torch.distributed as dist

    uri = storage.is_uri(dest)
    dest = str(dest) if uri else Path(dest)
    collective = world > 1 and dist.is_available() and dist.is_initialized()
    if rank == 0:
        try:
            storage.delete_dir(dest)
        except OSError as e:  # never before the barrier: the other ranks would wait for rank 0 forever
            logger.warning("could not remove the stale %s first (%s); writing over it", dest, e)
    if collective:
        dist.barrier()
    error = None
    try:
        if uri:
            storage.upload(local_dir, dest, fault)
        else:
            _copy_tree(Path(local_dir), dest, fault)
    except WriteError as e:
        error = e
    errors = [error]
    if collective:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if error is None and rank == 0:
        try:
            storage.write_text(storage.join(dest, COMPLETE), note or "complete\n")
        except WriteError as e:
            error = e  # the other ranks report; the checkpoint is never registered without rank 0's
    if error is not None:
        if rank == 0:
            try:
                storage.delete_dir(dest)
            except OSError as e:
                logger.warning("could not remove the partial %s (%s): it has no %s, so no resume uses it",
                               dest, e, COMPLETE)
        raise error


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    return storage.is_file(storage.join(ckpt_dir, COMPLETE))


def latest_complete(run_dir: str | os.PathLike) -> Path | str | None:
    """The `checkpoint_*` directory of `run_dir` with the highest step that has `trainer/COMPLETE`
    (a Path; a URI string when `run_dir` is a URI)."""
    found = []
    for name in storage.list_dirs(run_dir):
        m = re.fullmatch(r"checkpoint_(\d+)", name)
        if m and is_complete(d := storage.join(run_dir, name)):
            found.append((int(m.group(1)), d))
    if not found:
        return None
    best = max(found)[1]
    return best if storage.is_uri(run_dir) else Path(best)


@contextmanager
def reported_checkpoint_dir(checkpoint):
    """Ray's reported checkpoint (`ray.train.get_checkpoint()`, or None) as a local directory of this
    process for the duration: its own path on a local filesystem, else a private download.

    Not `Checkpoint.as_directory`: on remote storage (S3, GCS) every rank of a node downloads into one
    shared directory under one file lock, and a rank that leaves its `with` block first deletes it.
    A rank that is still waiting for the lock then finds no directory and raises `RuntimeError:
    Checkpoint directory ... does not exist, even though it should have been created by another
    process` (Ray 2.60; seen in CI after a worker restart, which spent the run's last retry). The cost
    of a private copy: each rank of a node downloads the checkpoint once."""
    if checkpoint is None:
        yield None
        return
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="rl_agents_resume_") as tmp:
        yield checkpoint.to_directory(tmp)


def resume_dir(reported: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | str | None:
    """Where to resume from: Ray's latest reported checkpoint if it is complete; otherwise (none
    reported, e.g. Ray's snapshot was torn and set aside, or one without `trainer/COMPLETE`) the
    newest complete `checkpoint_*` of the run directory; None: start at step 0."""
    if reported is not None and is_complete(reported):
        return reported if storage.is_uri(reported) else Path(reported)
    fallback = latest_complete(run_dir)
    if reported is None:
        if fallback is not None:
            logger.warning("Ray reports no checkpoint for %s, which holds complete ones: resuming from %s",
                           run_dir, fallback)
    elif fallback is not None:
        logger.warning("checkpoint %s has no %s (partial, or written by an older rl_agents): resuming from %s",
                       reported, COMPLETE, fallback)
    else:
        logger.warning("checkpoint %s has no %s (partial, or written by an older rl_agents) and %s holds no "
                       "complete checkpoint: training starts over from step 0", reported, COMPLETE, run_dir)
    return fallback
