"""The algorithms of ETO, DMPO and StepAgent, plus SFT and the baselines, on top of `rl_agents`.

* `algorithms.losses` — the losses (pure tensor functions) and the objectives the trainer runs.
* `algorithms.base` — `Algorithm` (explore, build data, update on Ray Train, evaluate; `fit` is
  the one driver loop) and its config sections.
* One module per family: `imitation` (SFT, RFT), `preference` (ETO, DMPO, DPO), `step_dpo`
  (StepAgent-implicit), `step_gail` (StepAgent-inverse), `grpo` (GRPO, GiGPO), `ppo` (the PPO
  baseline, a configuration of GRPO); `stepagent`
  holds the inspection stage both StepAgent variants share; `data` the data builders.
* `algorithms.cli` — the `rl-agents` command; `algorithms.demo` — the main job.

The losses are re-exported here: `from algorithms import dmpo_loss`.
"""

from algorithms.losses import *  # noqa: F403
from algorithms.losses import __all__  # noqa: F401
