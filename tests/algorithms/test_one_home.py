"""Each hyperparameter has one home, and configs are values: what the user sets is what the loss
gets, and nothing the run does changes the config it saves. No Ray: the trainer is stubbed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from algorithms.losses import DMPOObjective, dmpo_loss
from algorithms.runner import load_algorithm_config
from rl_agents.batches import EncodedSequence
from rl_agents.collate import collate_pairs
from rl_agents.config import ConfigError, to_dict
from rl_agents.train import TrainResult
from rl_agents.train.forward import Forward

ROOT = Path(__file__).resolve().parents[2]


def _pairs(n: int) -> list[tuple[EncodedSequence, EncodedSequence]]:
    rng = random.Random(0)

    def seq(turns: int) -> EncodedSequence:
        ids, mask, turn = [1, 7, 8], [0, 0, 0], [-1, -1, -1]
        for t in range(turns):
            ids += [rng.randrange(3, 500) for _ in range(5)]
            mask += [0, 0, 1, 1, 1]
            turn += [-1, -1, t, t, t]
        return EncodedSequence(ids, mask, turn)
    return [(seq(2), seq(3)) for _ in range(n)]


def test_loss_beta_reaches_the_loss_and_the_saved_config_is_what_the_user_set(tmp_path, tiny_model_dir, tiny_model,
                                                                              monkeypatch):
    """`loss.beta=0.3` on the command line is the β of the objective the trainer runs; the update's
    batch is shrunk to the 5 pairs in the update's own config (4 = the largest multiple of the
    micro-batch 2), while the run's config, in memory and in state.json, keeps the user's 16."""
    import rl_agents.train as train_module

    cfg = load_algorithm_config(ROOT / "examples" / "dmpo_textshop.yaml",
                                ["loss.beta=0.3", f"model={tiny_model_dir}", f"run_dir={tmp_path / 'run'}",
                                 "train.lora.enabled=false", "train.deepspeed.bf16=false"])
    user = json.loads(json.dumps(to_dict(cfg)))
    seen = {}

    def fake_train(objective, data, train_cfg, **kw):
        seen.update(objective=objective, cfg=train_cfg)
        return TrainResult(checkpoint_path=str(tiny_model_dir), metrics={"loss/dmpo": 0.5})

    monkeypatch.setattr(train_module, "train", fake_train)
    algo = cfg.build()
    data = _pairs(5)
    algo.update(data)
    algo.save()

    assert seen["objective"] == DMPOObjective(beta=0.3, gamma=0.7)
    assert seen["cfg"].optim.batch_size == 4 and seen["cfg"].model.path == str(tiny_model_dir)
    assert cfg.train.optim.batch_size == 16 and cfg.train.model.path == "tiny-llama"  # never mutated
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["config"] == user
    # ... and the loss it computes is DMPO at β = 0.3 (not the default 0.1)
    batch = collate_pairs([c for c, _ in data], [r for _, r in data], pad_id=0,
                          ref_chosen=[[-20.0, -25.0]] * 5, ref_rejected=[[-30.0, -22.0, -27.0]] * 5)
    with torch.no_grad():
        loss, _ = seen["objective"](Forward(tiny_model), batch)
        pol_c, pol_r = Forward(tiny_model).pair_turn_logps(batch)
    expected = dmpo_loss(pol_c, batch.ref_chosen, batch.chosen.turn_mask(2), pol_r, batch.ref_rejected,
                         batch.rejected.turn_mask(3), beta=0.3, gamma=0.7).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert abs(loss - dmpo_loss(pol_c, batch.ref_chosen, batch.chosen.turn_mask(2), pol_r, batch.ref_rejected,
                                batch.rejected.turn_mask(3), beta=0.1, gamma=0.7).mean()) > 1e-4


@pytest.mark.parametrize("override, message", [
    ("beta=0.3", "unknown key beta; it is loss.beta now"),
    ("train.loss.beta=0.3", "unknown key train.loss"),
    ("loss.gamma=2", "loss.gamma: must be in (0, 1], got 2.0"),
])
def test_a_hyperparameter_has_one_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_algorithm_config(ROOT / "examples" / "dmpo_textshop.yaml", [override])
    assert str(e.value).startswith(message), str(e.value)


def test_the_python_api_example_builds():
    """algorithms/base.py's docstring example, up to `build()` (which starts nothing)."""
    from algorithms.base import EnvSection
    from algorithms.preference import DMPO, DMPOConfig

    algo = DMPOConfig(loss=DMPOObjective(beta=0.1, gamma=0.7), env=EnvSection("rl_agents/TextShop-v0"),
                      model="tiny-llama").build()
    assert isinstance(algo, DMPO) and algo.config.loss.gamma == 0.7 and algo._group is None


@pytest.mark.parametrize("name", ["sft", "rft", "eto", "dmpo", "dpo", "step_dpo", "step_gail", "ppo", "grpo", "gigpo"])
def test_every_algorithm_updates_with_its_configs_loss(name, tmp_path, tiny_model_dir, monkeypatch):
    """Each algorithm's update hands the trainer the objective its config holds (`loss`), and an
    override of one of its fields reaches it; the trainer is stubbed (no Ray)."""
    import dataclasses

    import rl_agents.train as train_module
    from algorithms.base import ALGORITHMS
    from rl_agents.train.objective import Objective

    cls = ALGORITHMS[name]
    fields = [f.name for f in dataclasses.fields(cls.config_class().loss)]
    overrides = [f"model={tiny_model_dir}", f"run_dir={tmp_path}"] + (
        [f"loss.{fields[0]}=0.25"] if fields else [])
    from rl_agents.config import from_dict, apply_overrides

    cfg = from_dict(cls.config_class, apply_overrides({}, overrides))
    seen = {}

    def fake_train(objective, data, train_cfg, **kw):
        seen["objective"] = objective
        return TrainResult(checkpoint_path=str(tiny_model_dir), metrics={})

    monkeypatch.setattr(train_module, "train", fake_train)
    algo = cls(cfg)
    algo.update(_pairs(4))
    assert isinstance(seen["objective"], Objective) and seen["objective"] is cfg.loss
    assert not fields or getattr(seen["objective"], fields[0]) == 0.25
