"""Resume state without unpickling code, checkpoints that are complete or not there at all, and
metrics.jsonl after a resume: in-process (DeepSpeed ZeRO 0/2/3 on one CPU rank, gloo)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import types
from pathlib import Path

import pytest
import torch

from rl_agents.fileio import WriteError
from rl_agents.train.checkpoint import (COMPLETE, DDP_WEIGHTS, UnsafeCheckpointError, latest_complete, load_state,
                                        publish_checkpoint, reported_checkpoint_dir, resume_dir, save_state)
from rl_agents.train.loop import lr_lambda
from rl_agents.train.metrics import MetricsLogger, read_metrics

TRAINER_STATE = {"global_step": 2, "total_steps": 10, "num_examples": 8}


class Payload:
    """Unpickling it runs `os.mkdir(marker)`: what an attacker with write access to the run dir would plant."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a torch.save'd dict holding the payload (after checking it is live)."""
    probe = marker.with_name(marker.name + "_probe")
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.is_dir()  # the payload does run when unpickled without restrictions
    assert path.exists(), path
    torch.save({"optimizer": Payload(marker), "module": {}}, path)


def _ddp(seed: int):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0.2))
    return types.SimpleNamespace(module=module), optimizer, scheduler


def _step(module, optimizer, scheduler, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    module(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ---- without DeepSpeed ---------------------------------------------------------------------------
def test_ddp_state_round_trips_from_safetensors_and_weights_only_files(tmp_path):
    model, opt, sched = _ddp(0)
    for s in range(3):
        _step(model.module, opt, sched, s)
    reference = [([-1.5, -2.0], [-3.0])]
    save_state(tmp_path, model=model, optimizer=opt, scheduler=sched, deepspeed=False, lora=False, rank=0,
               trainer_state=TRAINER_STATE, reference=reference)
    rng = torch.get_rng_state()
    assert (tmp_path / DDP_WEIGHTS).exists()
    saved = torch.load(tmp_path / "trainer" / "ddp.pt", weights_only=True)  # plain data only
    assert set(saved) == {"optimizer", "scheduler"} and saved["scheduler"]["lr_lambdas"] == [None]

    torch.rand(5)  # move the RNG on
    model2, opt2, sched2 = _ddp(1)
    state, ref = load_state(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, deepspeed=False, lora=False,
                            rank=0)
    assert state == TRAINER_STATE and ref == reference
    assert torch.equal(torch.get_rng_state(), rng)
    for (n, p), (_, q) in zip(model.module.named_parameters(), model2.module.named_parameters()):
        assert torch.equal(p, q), n
    assert sched2.state_dict() == sched.state_dict()
    # Same optimizer state: one more identical step keeps both models identical.
    _step(model.module, opt, sched, 7)
    _step(model2.module, opt2, sched2, 7)
    for p, q in zip(model.module.parameters(), model2.module.parameters()):
        assert torch.equal(p, q)


def test_ddp_checkpoint_of_the_old_layout_still_loads(tmp_path):
    """Before the weights moved to safetensors, ddp.pt held them too (tensors only: weights_only loads it)."""
    model, opt, sched = _ddp(0)
    _step(model.module, opt, sched, 0)
    (tmp_path / "trainer").mkdir()
    torch.save({"model": {n: p.detach().clone() for n, p in model.module.named_parameters()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "trainer" / "ddp.pt")
    (tmp_path / "trainer" / "state.json").write_text(json.dumps(TRAINER_STATE))
    model2, opt2, sched2 = _ddp(1)
    load_state(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, deepspeed=False, lora=False, rank=0)
    assert all(torch.equal(p, q) for p, q in zip(model.module.parameters(), model2.module.parameters()))


@pytest.mark.parametrize("name", ["ddp.pt", "rng_rank0.pt", "reference.pt"])
def test_ddp_resume_refuses_a_planted_pickle_without_running_it(tmp_path, name):
    model, opt, sched = _ddp(0)
    save_state(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, deepspeed=False, lora=False, rank=0,
               trainer_state=TRAINER_STATE, reference=[([0.0], [0.0])])
    marker = tmp_path / "pwned"
    plant(tmp_path / "ckpt" / "trainer" / name, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load .*trainer/{name}.*posix\.mkdir") as e:
        load_state(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, deepspeed=False, lora=False,
                   rank=0)
    assert isinstance(e.value, pickle.UnpicklingError)
    assert not marker.exists()


# ---- DeepSpeed (one CPU rank) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepspeed_rank():
    """A one-rank gloo process group and DeepSpeed's CPU accelerator, for this module only."""
    import importlib
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build (loop.py)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _engine(deepspeed, stage: int, seed: int, bf16: bool = False):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0.2))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "steps_per_print": 10**9}
    engine, ds_opt, _, ds_sched = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=config)
    return engine, ds_opt, ds_sched


def _ds_step(engine, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, generator=g).to(next(engine.module.parameters()).dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _full_weights(engine) -> dict[str, torch.Tensor]:
    from rl_agents.train.checkpoint import iter_gathered

    out = {}
    for shard in iter_gathered(engine.module, trainable_only=False, max_shard_bytes=1 << 30, rank=0):
        out.update({k: v.float() for k, v in shard.items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,bf16", [(0, False), (2, False), (2, True), (3, False)])
def test_deepspeed_state_round_trips_through_the_weights_only_loader(deepspeed_rank, tmp_path, stage, bf16):
    engine, opt, sched = _engine(deepspeed_rank, stage, 0, bf16)
    for s in range(3):
        _ds_step(engine, s)
    save_state(tmp_path, model=engine, optimizer=opt, scheduler=sched, deepspeed=True, lora=False, rank=0,
               trainer_state=TRAINER_STATE, reference=None)
    engine2, opt2, sched2 = _engine(deepspeed_rank, stage, 1, bf16)
    state, ref = load_state(tmp_path, model=engine2, optimizer=opt2, scheduler=sched2, deepspeed=True, lora=False,
                            rank=0)
    assert state == TRAINER_STATE and ref is None
    assert sched2.state_dict() == sched.state_dict() and engine2.global_steps == engine.global_steps == 3
    w1, w2 = _full_weights(engine), _full_weights(engine2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # Restored optimizer state (Adam moments, fp32 master weights): the next step is the same.
    assert _ds_step(engine2, 9) == _ds_step(engine, 9)
    w1, w2 = _full_weights(engine), _full_weights(engine2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.slow
@pytest.mark.parametrize("stage,pattern", [(2, "mp_rank_00_model_states.pt"), (2, "*optim_states.pt"),
                                           (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_deepspeed_resume_refuses_a_planted_pickle_without_running_it(deepspeed_rank, tmp_path, stage, pattern):
    engine, opt, sched = _engine(deepspeed_rank, stage, 0)
    _ds_step(engine, 0)
    save_state(tmp_path / "ckpt", model=engine, optimizer=opt, scheduler=sched, deepspeed=True, lora=False, rank=0,
               trainer_state=TRAINER_STATE, reference=None)
    (target,) = (tmp_path / "ckpt" / "trainer" / "deepspeed" / "state").glob(pattern)
    marker = tmp_path / "pwned"
    plant(target, marker)
    engine2, opt2, sched2 = _engine(deepspeed_rank, stage, 1)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load .*{target.name}.*posix\.mkdir"):
        load_state(tmp_path / "ckpt", model=engine2, optimizer=opt2, scheduler=sched2, deepspeed=True, lora=False,
                   rank=0)
    assert not marker.exists()
    assert "load" not in vars(engine2.checkpoint_engine)  # DeepSpeed's own loader is back


# ---- complete checkpoints ------------------------------------------------------------------------
def _staged(root: Path) -> Path:
    for rel in ("config.json", "model.safetensors", "trainer/state.json", "trainer/deepspeed/state/a.pt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_publish_copies_then_marks_complete(tmp_path):
    dest = tmp_path / "run" / "checkpoint_000002"
    publish_checkpoint(_staged(tmp_path / "staged"), dest, rank=0, world=1, note="checkpoint_000002: 1 ranks\n")
    assert (dest / "trainer" / "deepspeed" / "state" / "a.pt").read_text() == "trainer/deepspeed/state/a.pt"
    assert (dest / COMPLETE).read_text() == "checkpoint_000002: 1 ranks\n"
    assert oct((dest / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_copy_names_the_file_and_leaves_no_partial_checkpoint(tmp_path):
    dest = tmp_path / "run" / "checkpoint_000003"
    dest.mkdir(parents=True)
    (dest / "stale").write_text("from a killed attempt")

    def disk_full(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    with pytest.raises(WriteError) as e:
        publish_checkpoint(_staged(tmp_path / "staged"), dest, rank=0, world=1, fault=disk_full)
    assert e.value.errno == errno.ENOSPC
    assert f"cannot write {dest}/" in str(e.value) and "No space left on device (the disk is full" in str(e.value)
    assert not dest.exists()


def test_resume_skips_a_checkpoint_without_its_marker(tmp_path, caplog):
    run = tmp_path / "run"
    for step, complete in ((1, True), (2, True), (3, False)):
        d = run / f"checkpoint_{step:06d}"
        (d / "trainer").mkdir(parents=True)
        if complete:
            (d / COMPLETE).write_text("complete\n")
    (run / "checkpoint_000009.tmp" / "trainer").mkdir(parents=True)  # not a checkpoint name
    assert latest_complete(run) == run / "checkpoint_000002"
    assert resume_dir(None, tmp_path / "new_run") is None  # a new run
    assert resume_dir(None, run) == run / "checkpoint_000002"  # Ray knows none (its snapshot set aside)
    assert resume_dir(run / "checkpoint_000001", run) == run / "checkpoint_000001"  # complete: Ray's choice
    assert resume_dir(run / "checkpoint_000003", run) == run / "checkpoint_000002"
    assert "checkpoint_000003 has no trainer/COMPLETE" in caplog.text
    for d in run.glob("checkpoint_00000[12]"):
        (d / COMPLETE).unlink()
    assert resume_dir(run / "checkpoint_000003", run) is None and resume_dir(None, run) is None
    assert "training starts over from step 0" in caplog.text


def test_a_remote_checkpoint_is_a_private_copy_per_holder(tmp_path):
    """Two ranks of one node hold Ray's reported checkpoint on remote storage at once; the first to
    leave must not delete the second's files. Ray's `as_directory` shares one directory between them
    and the first one out removes it (the CI failure of stop 29); ours gives each its own copy."""
    import pyarrow.fs
    from ray.train import Checkpoint

    src = tmp_path / "bucket" / "run" / "checkpoint_000002"
    (src / "trainer").mkdir(parents=True)
    (src / COMPLETE).write_text("complete\n")
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())  # not local
    ckpt = Checkpoint(path="run/checkpoint_000002", filesystem=remote)
    with reported_checkpoint_dir(ckpt) as a:
        with reported_checkpoint_dir(ckpt) as b:
            assert a != b and Path(a, COMPLETE).read_text() == Path(b, COMPLETE).read_text() == "complete\n"
        assert not Path(b).exists() and Path(a, COMPLETE).is_file()  # b's exit left a's copy alone
        assert resume_dir(a, tmp_path / "bucket" / "run") == Path(a)
    assert not Path(a).exists() and (src / COMPLETE).is_file()  # the checkpoint itself untouched
    local = Checkpoint(path=str(src))
    with reported_checkpoint_dir(local) as c:
        assert Path(c) == src  # a local checkpoint is read in place
    with reported_checkpoint_dir(None) as none:
        assert none is None


def test_driver_raises_non_transient_write_errors_and_retries_the_rest(tmp_path):
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from rl_agents.fileio import write_error
    from rl_agents.train import _fatal_error

    full = write_error(tmp_path / "checkpoint_000003" / "model.safetensors",
                       OSError(errno.ENOSPC, "No space left on device"))
    full = pickle.loads(pickle.dumps(full))  # as it reaches the driver
    group = WorkerGroupError("...", {0: UserExceptionWithTraceback(RuntimeError("gloo: connection reset"), "tb"),
                                     1: UserExceptionWithTraceback(full, "tb")})
    assert _fatal_error(group, tmp_path) is full
    unsafe = pickle.loads(pickle.dumps(UnsafeCheckpointError("refusing to load x")))
    assert _fatal_error(WorkerGroupError("...", {0: UserExceptionWithTraceback(unsafe, "tb")}), tmp_path) is unsafe
    readonly = _fatal_error(ControllerError(OSError(errno.EROFS, "Read-only file system")), tmp_path)
    assert isinstance(readonly, WriteError) and f"cannot write {tmp_path}: Read-only file system" in str(readonly)
    transient = WorkerGroupError("...", {0: UserExceptionWithTraceback(OSError(errno.EIO, "I/O error"), "tb"),
                                         1: UserExceptionWithTraceback(RuntimeError("killed"), "tb")})
    assert _fatal_error(transient, tmp_path) is None


# ---- metrics.jsonl -------------------------------------------------------------------------------
def test_metrics_of_a_resumed_run_have_one_row_per_step_in_order(tmp_path):
    first = MetricsLogger(tmp_path, total_steps=6, initial_step=0, enabled=True)
    for step in range(5):  # the failed attempt got to step 4; its last checkpoint is at step 3
        first.log(step, {"loss/x": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/x"')  # torn by the kill
    resumed = MetricsLogger(tmp_path, total_steps=6, initial_step=3, enabled=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    for step in range(3, 6):
        resumed.log(step, {"loss/x": 10.0 + step})
    resumed.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["loss/x"] for r in rows] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]
    MetricsLogger(tmp_path, total_steps=6, initial_step=0, enabled=True).close()  # started over
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_a_torn_ray_snapshot_is_set_aside(tmp_path, caplog):
    """Ray's controller would die on start over it; the workers then resume from a complete checkpoint."""
    from rl_agents.train import _set_aside_torn_snapshot

    _set_aside_torn_snapshot(tmp_path)  # none: nothing to do
    good = tmp_path / "checkpoint_manager_snapshot.json"
    good.write_text('{"checkpoint_results": []}')
    _set_aside_torn_snapshot(tmp_path)
    assert good.exists()
    good.write_text('{"checkpoint_results": [{"checkpoint_dir_na')
    _set_aside_torn_snapshot(tmp_path)
    assert not good.exists() and len(list(tmp_path.glob("checkpoint_manager_snapshot.json.torn-*"))) == 1
    assert "snapshot of" in caplog.text and "was torn" in caplog.text
