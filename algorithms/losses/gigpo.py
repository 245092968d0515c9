"""GiGPO's two-level advantages (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent
Training"), as pure functions; the algorithm is `algorithms.grpo.GiGPO`, the loss `ppo_loss`.

The G episodes of a group start from the same task (identical resets). Per the paper:

    episode level (eq. 3):  A^E(τ_i) = (R(τ_i) − mean_j R(τ_j)) / F_norm           over the episode group
    returns (eq. 5):        R_t^(i)  = Σ_{k ≥ t} γ^{k−t} r_k^(i)                    the step's discounted return
    step groups (eq. 6):    G^S(s̃)  = {(a_t^(i), R_t^(i)) : s_t^(i) = s̃}           same group, same anchor state
    step level (eq. 7):     A^S(a_t^(i)) = (R_t^(i) − mean_{G^S(s̃)} R) / F_norm
    combined (eq. 8):       A(a_t^(i)) = A^E(τ_i) + ω · A^S(a_t^(i))

F_norm is the group's standard deviation (`scale=True`) or 1 (`scale=False`, the "mean_norm"
mode of the authors' verl-agent runs). A step group of one step gets A^S = 0 (nothing to compare
with), as in the authors' code; an episode group of one gets A^E = 0 (the authors' code keeps its
raw reward; we need G ≥ 2 anyway). The anchor state is whatever hashable key the caller gives:
the observation text the action answered (the paper's choice) or an env's exact state key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import torch

from algorithms.losses.ppo import step_advantages

__all__ = ["discounted_returns", "gigpo_advantages"]


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """R_t = Σ_{k ≥ t} γ^{k−t} r_k for every step t of one episode (eq. 5)."""
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out


def gigpo_advantages(
    groups: Sequence[Hashable],
    episode_rewards: Sequence[float],
    step_rewards: Sequence[Sequence[float]],
    anchors: Sequence[Sequence[Hashable]],
    *,
    gamma: float = 0.95,
    step_weight: float = 1.0,
    scale: bool = False,
    eps: float = 1e-6,
) -> tuple[list[list[float]], dict[str, float]]:
    """Per-step advantages A = A^E + ω A^S of a batch of episodes (module docstring).

    groups: (N,) the episode group of each episode (the task); episode_rewards: (N,) R(τ_i);
    step_rewards[i], anchors[i]: the reward and the anchor state of each step of episode i.
    Returns (advantages[i][t], stats): `gigpo/step_groups` (step groups formed), `gigpo/grouped_steps_frac`
    (fraction of steps in a step group of ≥ 2), `gigpo/step_group_size_mean` (steps per group) and
    `gigpo/step_adv_abs_mean` (mean |A^S| over all steps).
    """
    n = len(groups)
    if not (len(episode_rewards) == len(step_rewards) == len(anchors) == n):
        raise ValueError(f"groups, episode_rewards, step_rewards and anchors must have one entry per episode, got "
                         f"{n}, {len(episode_rewards)}, {len(step_rewards)}, {len(anchors)}")
    for i, (r, a) in enumerate(zip(step_rewards, anchors)):
        if len(r) != len(a):
            raise ValueError(f"episode {i}: {len(r)} step rewards but {len(a)} anchors")
    ids = {g: k for k, g in enumerate(dict.fromkeys(groups))}
    episode = step_advantages(torch.tensor([float(r) for r in episode_rewards], dtype=torch.float64),
                              [ids[g] for g in groups], scale=scale, eps=eps).tolist()
    keys: dict[tuple, int] = {}
    step_ids, returns = [], []
    for g, rewards, anchor in zip(groups, step_rewards, anchors):
        returns += discounted_returns(rewards, gamma)
        step_ids += [keys.setdefault((g, a), len(keys)) for a in anchor]
    step = (step_advantages(torch.tensor(returns, dtype=torch.float64), step_ids, scale=scale, eps=eps).tolist()
            if returns else [])
    out, k = [], 0
    for i, rewards in enumerate(step_rewards):
        out.append([episode[i] + step_weight * a for a in step[k:k + len(rewards)]])
        k += len(rewards)
    sizes = Counter(step_ids)
    stats = {"gigpo/step_groups": float(len(sizes)),
             "gigpo/grouped_steps_frac": sum(c for c in sizes.values() if c >= 2) / max(len(step_ids), 1),
             "gigpo/step_group_size_mean": len(step_ids) / max(len(sizes), 1),
             "gigpo/step_adv_abs_mean": sum(abs(a) for a in step) / max(len(step), 1)}
    return out, stats
