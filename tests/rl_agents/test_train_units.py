"""Fast, in-process tests of the training building blocks: config, data plan, schedule, objectives,
the LM-head-on-agent-tokens optimisation, padding invariance, the LoRA reference, HF export."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from algorithms.losses import DMPOObjective, DPOObjective, SFTObjective
from algorithms.losses.dpo import StepDPOObjective
from rl_agents.batches import EncodedSequence, token_logps
from rl_agents.collate import collate_pairs, collate_sequences
from rl_agents.config import ConfigError, from_dict
from rl_agents.train import OptimConfig, TrainConfig, train
from rl_agents.train.forward import Forward, pair_turn_logps, sequence_logps
from rl_agents.train.loop import epoch_plan, lr_lambda


def _seq(rng: random.Random, turns: int) -> EncodedSequence:
    """Prompt, then `turns` × (observation, agent action); the action tokens carry turn t."""
    ids = [1] + [rng.randrange(3, 5000) for _ in range(rng.randint(3, 9))]
    mask, turn = [0] * len(ids), [-1] * len(ids)
    for t in range(turns):
        obs, act = rng.randint(2, 8), rng.randint(2, 6)
        ids += [rng.randrange(3, 5000) for _ in range(obs + act)]
        mask += [0] * obs + [1] * act
        turn += [-1] * obs + [t] * act
    return EncodedSequence(ids, mask, turn)


@pytest.fixture
def pairs():
    rng = random.Random(0)
    return [(_seq(rng, rng.randint(1, 3)), _seq(rng, rng.randint(1, 4))) for _ in range(4)]


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,needle", [
    ({"optim": {"lr": -1.0}}, "optim.lr: must be a finite number > 0"),
    ({"optim": {"batch_size": 6, "micro_batch_size": 2}, "num_workers": 2},
     "optim.batch_size: must be a multiple of optim.micro_batch_size × num_workers = 4, got 6"),
    ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    ({"model": {"dtype": "bfloat16"}}, "model.dtype: with DeepSpeed"),
    ({"lora": {"r": 0}}, "lora.r: must be > 0"),
    ({"loss": {"beta": 0.5}}, "unknown key loss"),  # β lives on the objective, not the trainer's config
    ({"optim": {"warmup_ratio": 1.0}}, "optim.warmup_ratio: must be in [0, 1)"),
    ({"num_workers": 0}, "num_workers: must be > 0"),
    ({"optim": {"lrr": 1}}, "unknown key optim.lrr"),
])
def test_config_errors_name_the_field(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainConfig, data)
    assert needle in str(e.value)


def test_grad_accum_is_derived():
    cfg = TrainConfig(optim=OptimConfig(batch_size=32, micro_batch_size=2), num_workers=4)
    assert cfg.grad_accum == 4
    assert from_dict(TrainConfig, {"model": {"dtype": "bfloat16"}, "deepspeed": {"enabled": False}}).model.dtype == "bfloat16"


# ---- data plan and schedule ----------------------------------------------------------------------
def test_epoch_plan_is_deterministic_covers_data_and_ignores_worker_count():
    lengths = [random.Random(1).randint(5, 500) for _ in range(37)]
    cfg2 = TrainConfig(optim=OptimConfig(batch_size=8, micro_batch_size=2), num_workers=2)
    cfg1 = TrainConfig(optim=OptimConfig(batch_size=8, micro_batch_size=2), num_workers=1)
    plan = epoch_plan(lengths, cfg2, epoch=0)
    assert plan == epoch_plan(lengths, cfg2, epoch=0) == epoch_plan(lengths, cfg1, epoch=0)
    assert plan != epoch_plan(lengths, cfg2, epoch=1)  # reshuffled per epoch
    assert len(plan) == 37 // 8 and all(len(step) == 4 and all(len(m) == 2 for m in step) for step in plan)
    flat = [i for step in plan for m in step for i in m]
    assert len(flat) == len(set(flat)) == 32  # each example at most once; the short batch is dropped
    for step in plan:  # micro-batches are cut from the length-sorted global batch
        ls = [lengths[i] for m in step for i in m]
        assert ls == sorted(ls)


def test_lr_schedule_warms_up_without_zero_steps_then_decays():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11) and f(10) == 1.0
    assert f(55) == pytest.approx(0.5) and 0 < f(99) < 0.01
    assert lr_lambda(10, 0.0)(0) == 1.0


# ---- objectives --------------------------------------------------------------------------------
def test_objectives_carry_their_hyperparameters_and_check_them():
    assert not SFTObjective().paired and DMPOObjective().paired and StepDPOObjective(beta=0.3).name == "step_dpo"
    assert DMPOObjective(beta=0.3, gamma=0.5) == DMPOObjective(beta=0.3, gamma=0.5)  # values, picklable
    with pytest.raises(ValueError, match=r"^gamma: must be in \(0, 1\], got 1.5"):
        DMPOObjective(gamma=1.5)
    with pytest.raises(ValueError, match=r"^beta: must be a finite number > 0, got inf"):
        DPOObjective(beta=float("inf"))
    with pytest.raises(TypeError, match="objective: expected an rl_agents.train.Objective"):
        train("dpo", [], TrainConfig())  # a name is not an objective


def test_agent_only_lm_head_equals_full_logits(tiny_model, pairs):
    batch = collate_sequences([s for p in pairs for s in p], pad_id=0)
    with torch.no_grad():
        fast = sequence_logps(tiny_model, batch)
        logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = token_logps(logits, batch.input_ids) * batch.action_mask
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("obj", [SFTObjective(), DPOObjective(beta=0.5), DMPOObjective(beta=0.5, gamma=0.7),
                                 StepDPOObjective(beta=0.5)], ids=lambda o: o.name)
def test_loss_is_the_same_with_and_without_padding(tiny_model, pairs, obj):
    """A micro-batch of padded examples gives the unit-weighted mean of the examples alone (fp32, 1e-6)."""
    rng = random.Random(2)
    refs = [([rng.uniform(-60, -5) for _ in range(c.num_turns)], [rng.uniform(-60, -5) for _ in range(r.num_turns)])
            for c, r in pairs]

    def batch(idx):
        if not obj.paired:
            return collate_sequences([pairs[i][0] for i in idx], pad_id=0)
        return collate_pairs([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], pad_id=0,
                             ref_chosen=[refs[i][0] for i in idx], ref_rejected=[refs[i][1] for i in idx])

    units = [obj.units(pairs[i] if obj.paired else pairs[i][0]) for i in range(len(pairs))]
    with torch.no_grad():
        together, _ = obj(Forward(tiny_model), batch(range(len(pairs))))
        alone = [obj(Forward(tiny_model), batch([i]))[0] for i in range(len(pairs))]
    expected = sum(u * l for u, l in zip(units, alone)) / sum(units)
    assert batch(range(len(pairs))).chosen.attention_mask.eq(0).any() if obj.paired else True  # really padded
    torch.testing.assert_close(together, expected, rtol=0, atol=1e-6)


def test_adapter_disabled_reference_equals_base_model(tiny_model_dir, pairs):
    from peft import LoraConfig, get_peft_model

    from rl_agents.models import load_model

    base = load_model(tiny_model_dir).eval()
    torch.manual_seed(0)
    lora = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj"])).eval()
    batch = collate_pairs([c for c, _ in pairs], [r for _, r in pairs], pad_id=0)
    with torch.no_grad():
        base_c, base_r = pair_turn_logps(base, batch)
        ref_c, ref_r = Forward(lora).reference(batch)  # no precomputed reference in the batch -> adapter disabled
        pol_c, _ = pair_turn_logps(lora, batch)
    torch.testing.assert_close(ref_c, base_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_r, base_r, rtol=0, atol=1e-5)
    assert not torch.allclose(pol_c, base_c, atol=1e-3)  # the adapter is live outside the context
    with pytest.raises(ValueError, match="no LoRA adapter"):
        Forward(base).reference(batch)


# ---- HF export ---------------------------------------------------------------------------------
def test_sharded_hf_export_loads_with_transformers(tiny_model, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_agents.train.checkpoint import save_hf

    save_hf(tiny_model, tmp_path, source_dir=tiny_model_dir, lora=False, rank=0, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]  # tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, value in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template


# ---- driver checks (before any Ray work) ---------------------------------------------------------
def test_train_rejects_bad_inputs_before_starting(pairs):
    from rl_agents.train import LoraConfig, train

    cfg = TrainConfig(optim=OptimConfig(batch_size=4, micro_batch_size=1), num_workers=2)
    with pytest.raises(ValueError, match="fewer than optim.batch_size=4"):
        train(DPOObjective(), pairs[:3], cfg)
    with pytest.raises(TypeError, match=r"data\[0\]: objective 'dpo' takes \(chosen, rejected\) pairs"):
        train(DPOObjective(), [p[0] for p in pairs], cfg)
    with pytest.raises(ValueError, match="ref='adapter' needs lora.enabled"):
        train(DPOObjective(), pairs, cfg, ref="adapter")
    with pytest.raises(ValueError, match="ref has 1 entries for 4 examples"):
        train(DPOObjective(), pairs, TrainConfig(lora=LoraConfig(enabled=True), optim=OptimConfig(batch_size=4), num_workers=2),
              ref=[([0.0], [0.0])])
    assert math.isfinite(cfg.optim.lr)
