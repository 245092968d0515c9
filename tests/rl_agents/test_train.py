"""Ray Train + DeepSpeed training runs on CPU (tiny random Llama, SmolLM2's real tokenizer).

Eight short runs (4 optimizer steps each, 8 multi-turn pairs or 8 SFT sequences) shared by the tests:

    A  DPO, ZeRO-2, 2 workers × micro-batch 2 (no accumulation)
    B  DPO, DDP,    2 workers × micro-batch 1 × 2 accumulation steps (other padding than A)
    C  DPO, ZeRO-2, 1 worker  × micro-batch 2 × 2 accumulation steps (A's very micro-batches)
    D  A, but the last rank os._exit(1)s at the start of step 2; Ray restarts from checkpoint 2
    E  SFT, ZeRO-3, bf16, 2 workers
    F  DMPO, LoRA, ZeRO-3, reference = adapter disabled, 2 workers × 2 accumulation steps
    G  A with a checkpoint every step, whose copy of checkpoint 3 into the run directory fails on
       rank 1 with ENOSPC (the disk is full); then the same train() again once there is space
    S  D with `train.storage_path` an S3 URI (moto's S3 server): checkpoints, metrics and the
       resume all go through S3

Tolerances (fp32), on every step's loss, summed log-probs and gradient norm: C vs A share every
micro-batch, so they agree to float rounding (rel 1e-5); B vs A differ in padding, accumulation
and the reduction path (DDP all-reduce vs ZeRO reduce-scatter): rel 1e-4 over 4 Adam steps at
lr 1e-2. Final weights: the difference is at most 1e-4 (C) / 1e-3 (B) of the norm of the update
itself, per tensor (Adam's g/√v can blow a 1e-7 difference of a near-zero gradient up in a single
element). D and S vs A resume from an exact checkpoint: 1e-6 absolute. Padding alone (in-process, in
test_train_units.py): 1e-6 absolute on the loss.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from algorithms.losses import DMPOObjective, DPOObjective, SFTObjective
from rl_agents.trajectory import Trajectory, Turn

pytestmark = pytest.mark.slow

WORDS = ("go to the kitchen open fridge take apple look inventory drawer red blue table shelf put "
         "examine cabinet 1 2 3 heat cool clean mug knife in on with from").split()
PAIR_KEYS = ("logps/chosen", "logps/rejected", "train/grad_norm")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_trajectory(rng: random.Random, task: str, steps: int, reward: float) -> Trajectory:
    turns = [Turn("user", f"Task {task}: {_text(rng, rng.randint(6, 14))}")]
    for _ in range(steps):
        turns.append(Turn("assistant", f"Thought: {_text(rng, rng.randint(2, 9))}\nAction: {_text(rng, rng.randint(1, 4))}"))
        turns.append(Turn("user", f"Observation: {_text(rng, rng.randint(3, 15))}"))
    return Trajectory(task_id=task, env_id="test", turns=turns, reward=reward, success=reward >= 1)


def make_pairs(segmenter, n: int, seed: int = 0):
    """(expert, failed) encoded pairs of different numbers of turns and lengths."""
    from rl_agents.tokenization import encode_trajectory

    rng = random.Random(seed)
    return [(encode_trajectory(make_trajectory(rng, str(i), rng.randint(1, 3), 1.0), segmenter),
             encode_trajectory(make_trajectory(rng, str(i), rng.randint(1, 4), 0.0), segmenter)) for i in range(n)]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):  # the S3 server's credentials are in the environment before the workers start
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, s3_server, segmenter, tiny_model_dir, tmp_path_factory):
    """Lazily run (and cache) the runs of the module docstring."""
    from rl_agents.train import DeepSpeedConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, train
    from rl_agents.train.metrics import read_metrics

    storage = tmp_path_factory.mktemp("runs")
    pairs = make_pairs(segmenter, 8)
    seqs = [c for c, _ in pairs]

    def cfg(name, *, stage=2, ds=True, workers=2, mb=2, **kw):
        return TrainConfig(model=ModelConfig(path=str(tiny_model_dir)),
                           deepspeed=DeepSpeedConfig(enabled=ds, zero_stage=stage, bf16=kw.pop("bf16", False)),
                           optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, epochs=2, batch_size=4, micro_batch_size=mb),
                           lora=kw.pop("lora", LoraConfig()), num_workers=workers,
                           storage_path=kw.pop("storage_path", str(storage)),
                           name=name, **kw)

    specs = {
        "A": lambda: train(DPOObjective(), pairs, cfg("A")),
        "B": lambda: train(DPOObjective(), pairs, cfg("B", ds=False, mb=1)),
        "C": lambda: train(DPOObjective(), pairs, cfg("C", workers=1)),
        "D": lambda: train(DPOObjective(), pairs, cfg("D", checkpoint_every=1, fault_injection_step=2, max_failures=1)),
        "S": lambda: train(DPOObjective(), pairs, cfg("S", checkpoint_every=1, fault_injection_step=2, max_failures=1,
                                                      storage_path=s3_server("train"))),
        "E": lambda: train(SFTObjective(), seqs, cfg("E", stage=3, bf16=True)),
        "F": lambda: train(DMPOObjective(), pairs, cfg("F", stage=3, mb=1, lora=LoraConfig(enabled=True, r=4, alpha=8))),
    }
    def disk_full_then_resume():
        from rl_agents.fileio import WriteError
        from rl_agents.train import WRITE_FAULT_ENV

        g = cfg("G", checkpoint_every=1, max_failures=1)
        os.environ[WRITE_FAULT_ENV] = "3:ENOSPC"  # read by train() on the driver
        try:
            train(DPOObjective(), pairs, g)
            error = None
        except WriteError as e:
            error = e
        finally:
            del os.environ[WRITE_FAULT_ENV]
        run_dir = storage / "G"
        dirs = [d for d in run_dir.glob("checkpoint_*") if d.is_dir()]  # not checkpoint_manager_snapshot.json
        after_failure = {"fired": (run_dir / ".write_fault_fired").read_text().splitlines(),
                         "checkpoints": sorted(d.name for d in dirs),
                         "incomplete": sorted(d.name for d in dirs if not (d / "trainer" / "COMPLETE").exists()),
                         "history": [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]}
        return error, after_failure, train(DPOObjective(), pairs, g)

    specs["G"] = disk_full_then_resume
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = specs[name]()
        return cache[name]
    return get


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _series(result, key):
    return [row[key] for row in sorted(result.history, key=lambda r: r["step"])]


def _assert_every_weight_changed_and_loss_fell(result, init_dir, loss_key):
    init, final = _weights(init_dir), _weights(result.checkpoint_path)
    assert set(final) == set(init)
    unchanged = [n for n in init if torch.equal(init[n].to(final[n].dtype), final[n])]  # in the saved dtype
    assert not unchanged, f"parameters not updated: {unchanged}"
    losses = _series(result, loss_key)
    assert len(losses) == 4
    assert sum(losses[2:]) < sum(losses[:2]) - 0.05, losses  # epoch 2 below epoch 1


def test_zero2_dpo_trains_every_weight_logs_and_saves_hf(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    a = runs("A")
    _assert_every_weight_changed_and_loss_fell(a, tiny_model_dir, "loss/dpo")
    assert [r["step"] for r in a.history] == [0, 1, 2, 3]
    row = a.history[-1]
    for key in ("loss/dpo", "reward/margin", "reward/accuracy", "reward/chosen", "kl/chosen", "kl/rejected",
                "train/grad_norm", "train/lr", "perf/tokens_per_s", "perf/real_token_frac"):
        assert math.isfinite(row[key]), key
    assert a.history[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert row["reward/accuracy"] > 0.5 and 0 < row["perf/real_token_frac"] <= 1
    assert list(Path(a.run_dir, "tensorboard").glob("events.out.tfevents.*"))
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint_path)  # plain HF layout
    final = _weights(a.checkpoint_path)
    assert torch.equal(model.state_dict()["model.norm.weight"], final["model.norm.weight"])


def test_ddp_and_zero_agree_and_accumulation_matches_workers(runs, tiny_model_dir):
    """B (DDP, micro 1 × accum 2, less padding) ≈ A (ZeRO-2, micro 2); C (1 worker × accum 2) == A."""
    a, b, c = runs("A"), runs("B"), runs("C")
    for key in ("loss/dpo", *PAIR_KEYS):
        assert _series(b, key) == pytest.approx(_series(a, key), rel=1e-4, abs=1e-6), key
        assert _series(c, key) == pytest.approx(_series(a, key), rel=1e-5, abs=1e-6), key
    # Weights: Adam's g/sqrt(v) can turn a 1e-7 difference in a near-zero gradient into a visible one
    # in a single element, so compare each tensor's difference with the size of its update.
    w0, wa = _weights(tiny_model_dir), _weights(a.checkpoint_path)
    for other, rel in ((b, 1e-3), (c, 1e-4)):
        wo = _weights(other.checkpoint_path)
        for name in wa:
            update = (wa[name] - w0[name]).norm()
            assert (wo[name] - wa[name]).norm() <= rel * update + 1e-6, (other.run_dir, name)


def test_killed_worker_resumes_at_next_step(runs):
    """D: rank 1 dies at the start of step 2 (after checkpoint 2); the restarted group resumes at step 2."""
    a, d = runs("A"), runs("D")
    assert Path(d.run_dir, ".fault_injected").exists()  # the failure really happened
    trained = [(r["train/epoch"], r["step"]) for r in d.history]
    assert sorted(trained) == [(0, 0), (0, 1), (1, 2), (1, 3)] and len(set(trained)) == len(trained)
    assert _series(d, "loss/dpo") == pytest.approx(_series(a, "loss/dpo"), abs=1e-6)
    # The reference was restored from the checkpoint, not recomputed from the updated policy.
    assert Path(d.checkpoint_path, "trainer", "reference.pt").exists()
    assert d.history[2]["perf/reference_s"] < 1e-3 < d.history[0]["perf/reference_s"]
    wa, wd = _weights(a.checkpoint_path), _weights(d.checkpoint_path)
    for name in wa:
        torch.testing.assert_close(wd[name], wa[name], rtol=0, atol=1e-6)


def test_s3_storage_killed_worker_resumes_from_the_s3_checkpoint(runs, tiny_model_dir):
    """S: D's run with `train.storage_path` an S3 URI (a real S3 API, moto's server): no local run
    directory; rank 1 dies at the start of step 2 and the restarted group resumes at step 2 from the
    checkpoint on S3. Losses and final weights are A's; metrics and TensorBoard events are on S3;
    Ray keeps the last 2 checkpoints there."""
    import pyarrow.fs

    from rl_agents import storage
    from rl_agents.models import resolve_model
    from rl_agents.train.metrics import read_metrics

    a, s = runs("A"), runs("S")
    assert s.run_dir.startswith("s3://rl-agents/train-") and s.checkpoint_path == storage.join(s.run_dir, "checkpoint_000004")
    assert storage.exists(storage.join(s.run_dir, ".fault_injected"))  # the failure really happened
    trained = [(r["train/epoch"], r["step"]) for r in s.history]
    assert sorted(trained) == [(0, 0), (0, 1), (1, 2), (1, 3)] and len(set(trained)) == len(trained)
    assert s.history == read_metrics(storage.join(s.run_dir, "metrics.jsonl"))
    assert _series(s, "loss/dpo") == pytest.approx(_series(a, "loss/dpo"), abs=1e-6)
    assert s.history[2]["perf/reference_s"] < 1e-3 < s.history[0]["perf/reference_s"]  # restored from S3
    assert [d for d in storage.list_dirs(s.run_dir) if d.startswith("checkpoint_")] == ["checkpoint_000003",
                                                                                        "checkpoint_000004"]
    fs, root = storage.filesystem(s.run_dir)
    names = [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/tensorboard"))]
    assert any(n.startswith("events.out.tfevents.") for n in names)
    wa, ws = _weights(a.checkpoint_path), _weights(resolve_model(s.checkpoint_path))
    assert set(ws) == set(wa)
    for name in wa:
        torch.testing.assert_close(ws[name], wa[name], rtol=0, atol=1e-6)


def test_full_disk_fails_once_cleanly_and_the_rerun_resumes(runs):
    """G: one clean error naming the file and ENOSPC, no restart, no partial checkpoint; the rerun
    resumes from checkpoint 2 and ends where A does, with one metrics row per step."""
    a, (error, after, g) = runs("A"), runs("G")
    assert error is not None and error.errno == errno.ENOSPC
    ckpt3 = Path(g.run_dir, "checkpoint_000003")
    assert str(error).startswith(f"cannot write {ckpt3}/")  # the message alone (fileio.WriteError)
    assert "No space left on device (the disk is full" in str(error)
    assert after["fired"] == ["rank 1 checkpoint 3 ENOSPC"]  # one attempt: a restart would have fired again
    assert after["checkpoints"] == ["checkpoint_000001", "checkpoint_000002"] and not after["incomplete"]
    assert after["history"] == [0, 1, 2]  # the failed attempt trained step 2, then failed to checkpoint it
    assert [r["step"] for r in g.history] == [0, 1, 2, 3]  # step 2 again after the resume, once in the file
    assert Path(g.checkpoint_path, "trainer", "COMPLETE").exists()
    assert g.history[2]["perf/reference_s"] < 1e-3  # resumed (reference from checkpoint 2), not restarted
    assert _series(g, "loss/dpo") == pytest.approx(_series(a, "loss/dpo"), abs=1e-6)
    wa, wg = _weights(a.checkpoint_path), _weights(g.checkpoint_path)
    for name in wa:
        torch.testing.assert_close(wg[name], wa[name], rtol=0, atol=1e-6)


def test_zero3_bf16_sft_trains_every_weight(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    e = runs("E")
    _assert_every_weight_changed_and_loss_fell(e, tiny_model_dir, "loss/sft")
    assert all(t.dtype == torch.bfloat16 for t in _weights(e.checkpoint_path).values())
    assert json.loads(Path(e.checkpoint_path, "config.json").read_text())["dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(e.checkpoint_path)


def test_lora_trains_only_the_adapter_and_loads_with_peft(runs, tiny_model_dir):
    from peft import PeftModel

    from rl_agents.models import load_model

    f = runs("F")
    assert f.history[0]["loss/dmpo"] == pytest.approx(math.log(2), abs=1e-6)  # adapter starts at 0: policy == ref
    assert _series(f, "loss/dmpo")[-1] < math.log(2)
    adapter = _weights(f.checkpoint_path)
    assert adapter and all("lora_" in n for n in adapter)
    assert all(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero
    assert not list(Path(f.checkpoint_path).glob("model*.safetensors"))  # no full weights
    base = load_model(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 400, 500, 600, 700]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(load_model(tiny_model_dir), f.checkpoint_path)
        assert not torch.allclose(peft(input_ids=ids).logits, base_logits, atol=1e-4)
        with peft.disable_adapter():
            torch.testing.assert_close(peft(input_ids=ids).logits, base_logits)


@pytest.mark.timeout(180)  # Ray's default (controller_failure_limit -1) retries the start forever: a hang fails here
def test_a_worker_group_that_cannot_start_fails_instead_of_hanging(ray_cluster, segmenter, tiny_model_dir, tmp_path):
    """Both CPUs held by an actor (as by a leftover after an OOM kill): the 1-worker run's start times out
    START_RETRIES + 1 times, then train() raises Ray's ControllerError with a note naming what it asked for."""
    import time

    import ray
    from ray.train import ControllerError

    from rl_agents.train import START_RETRIES, DeepSpeedConfig, ModelConfig, OptimConfig, TrainConfig, train

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "2"  # propagated to Ray Train's controller
    cfg = TrainConfig(model=ModelConfig(path=str(tiny_model_dir)), deepspeed=DeepSpeedConfig(enabled=False),
                      optim=OptimConfig(lr=1e-2, epochs=1, batch_size=2, micro_batch_size=2), num_workers=1,
                      storage_path=str(tmp_path), name="never-starts")
    start = time.monotonic()
    try:
        with pytest.raises(ControllerError) as info:
            train(DPOObjective(), make_pairs(segmenter, 2), cfg)
    finally:
        del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]
        ray.kill(holder)
    assert "timed out" in str(info.value)
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert f"asked for 1 worker(s) × {{'CPU': {cfg.cpus_per_worker}" in note  # (+ the driver's node, for local storage)
    assert f"tried {START_RETRIES + 1} times" in note
    assert time.monotonic() - start < 150
