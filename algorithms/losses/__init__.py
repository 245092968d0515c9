"""The losses of ETO, DMPO and StepAgent, plus SFT and PPO, and the objectives the trainer runs.

Each module holds pure tensor functions (paper, equation and shapes in each docstring;
derivations and deviations in docs/papers.md) and, below them, the `Objective` the trainer
optimises (`rl_agents.train.objective`):

* `sft` — `sft_loss`, masked token-mean NLL (ETO eq. 5); `SFTObjective` (SFT, RFT).
* `dpo` — `dpo_loss`, `dpo_rewards`, trajectory DPO (ETO eq. 11); `DPOObjective` (ETO, the DPO
  baseline, and StepAgent-implicit's step DPO, eq. 6, on step pairs).
* `dmpo` — `dmpo_loss`, `dmpo_turn_weights`, `dmpo_rewards` (eq. 16, released-code weight φ);
  `DMPOObjective`.
* `ppo` — `ppo_loss`, `step_advantages`, PPO-clip with entropy bonus and KL (StepAgent Alg. 1; the
  PPO baseline; GRPO, GiGPO with clip-higher and the loss aggregations); `PPOObjective`.
* `gail` — `gail_discriminator_loss`, `gail_reward` (StepAgent-inverse, eq. 10-11).
* `gigpo` — `gigpo_advantages`, `discounted_returns`: GiGPO's episode + step group advantages
  (Feng et al. 2025, eqs. 3-8); GRPO's are `step_advantages(..., scale=True)`.
"""

from algorithms.losses.dmpo import DMPOObjective, dmpo_loss, dmpo_rewards, dmpo_turn_weights
from algorithms.losses.dpo import DPOObjective, dpo_loss, dpo_rewards
from algorithms.losses.gail import gail_discriminator_loss, gail_reward
from algorithms.losses.gigpo import discounted_returns, gigpo_advantages
from algorithms.losses.ppo import PPOObjective, ppo_loss, step_advantages
from algorithms.losses.sft import SFTObjective, sft_loss

__all__ = [
    "DMPOObjective",
    "DPOObjective",
    "PPOObjective",
    "SFTObjective",
    "discounted_returns",
    "dmpo_loss",
    "dmpo_rewards",
    "dmpo_turn_weights",
    "dpo_loss",
    "dpo_rewards",
    "gail_discriminator_loss",
    "gail_reward",
    "gigpo_advantages",
    "ppo_loss",
    "sft_loss",
    "step_advantages",
]
