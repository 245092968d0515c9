from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rl_agents.config import ConfigError, apply_overrides, from_dict, load_config


@dataclass
class Optim:
    lr: float = 1e-6
    """learning rate"""
    epochs: int = 3


@dataclass
class Cfg:
    name: str = "run"
    beta: float = 0.1
    loss: Literal["dpo", "dmpo"] = "dmpo"
    optim: Optim = field(default_factory=Optim)
    targets: list[str] = field(default_factory=lambda: ["q_proj"])
    seed: int | None = None

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\noptim:\n  lr: 1e-5\ntargets: [q_proj, v_proj]\n")
    cfg = load_config(Cfg, path, ["optim.epochs=2", "beta=0.5", "loss=dpo", "seed=3"])
    assert cfg == Cfg(name="demo", beta=0.5, loss="dpo", optim=Optim(lr=1e-5, epochs=2), targets=["q_proj", "v_proj"], seed=3)
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("overrides,needle", [
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["betaa=1"], "unknown key betaa"),
    (["optim.epochs=2.5"], "optim.epochs: expected an integer"),
    (["beta=high"], "beta: expected a number"),
    (["loss=ppo"], "loss: expected one of ['dpo', 'dmpo']"),
    (["optim=3"], "optim: expected a mapping"),
    (["beta=-1"], "beta must be > 0"),
    (["targets=q_proj"], "targets: expected a list"),
    (["noequals"], "not KEY=VALUE"),
    (["beta=1", "beta.x=1"], "beta is not a mapping"),
    (["optim.lr.x=1"], "optim.lr: expected a number"),
])
def test_bad_configs_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, overrides)
    assert needle in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml:2: invalid YAML"):
        load_config(Cfg, path)


def test_apply_overrides_does_not_mutate_input():
    base = {"optim": {"lr": 1.0}}
    out = apply_overrides(base, ["optim.lr=2", "new.deep.key=[1, 2]"])
    assert base == {"optim": {"lr": 1.0}} and out == {"optim": {"lr": 2}, "new": {"deep": {"key": [1, 2]}}}
    assert from_dict(Cfg, {}) == Cfg()
