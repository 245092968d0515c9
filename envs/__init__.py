"""Gymnasium text environments with language action spaces (docs/design.md §2).

Importing this package registers the built-in envs with Gymnasium:

    import envs, gymnasium as gym
    env = gym.make("rl_agents/TextShop-v0", split="train")

(or, with no import, `gym.make("envs:rl_agents/TextShop-v0")`). A new env is a `TextEnv`
subclass plus one `gymnasium.register` call: see docs/new_env.md.
"""

import gymnasium as gym

from envs.base import ExpertStep, StepResult, TextEnv

ENV_IDS = {
    "rl_agents/TextShop-v0": "envs.textshop:TextShopEnv",
    "rl_agents/ScienceWorld-v0": "envs.sciworld:ScienceWorldEnv",
    "rl_agents/ALFWorld-v0": "envs.alfworld:ALFWorldEnv",
}

for _id, _entry in ENV_IDS.items():
    if _id not in gym.registry:
        # The env enforces its own turn budget (per task), so no TimeLimit wrapper here.
        gym.register(id=_id, entry_point=_entry, disable_env_checker=True)

__all__ = ["ENV_IDS", "ExpertStep", "StepResult", "TextEnv"]
