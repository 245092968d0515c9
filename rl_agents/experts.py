"""Expert trajectories: replay an env's expert and record it as a ReAct `Trajectory`.

Every expert trajectory is produced by *replaying* the expert's actions in the env, so its
observations and rewards are the env's own and its final reward is measured, not assumed.
These are the SFT data and the "win" side of ETO/DMPO pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import gymnasium as gym

from envs.base import replay_expert
from rl_agents.prompting import format_react, initial_messages
from rl_agents.trajectory import Trajectory, Turn


def expert_trajectory(env: gym.Env, env_id: str, task_id: str, *, keep_final_observation: bool = True) -> Trajectory:
    """Replay the expert of `task_id` in `env` (`envs.base.replay_expert`) and record system,
    instruction, actions, observations."""
    turns: list[Turn] = []
    info_total, won, stop = 0.0, False, "expert_exhausted"
    for step in replay_expert(env, task_id):
        if step.expert is None:  # the reset
            turns = [Turn(role=m["role"], text=m["content"]) for m in initial_messages(env, step.observation)]
            continue
        turns.append(Turn(role="assistant", text=format_react(step.expert.thought, step.expert.action),
                          reward=step.reward))
        info_total, won = step.info["reward_total"], bool(step.info["won"])
        if step.terminated or step.truncated:
            stop = "terminated" if step.terminated else "truncated"
            if keep_final_observation:
                turns.append(Turn(role="user", text=step.observation))
            break
        turns.append(Turn(role="user", text=step.observation))
    return Trajectory(task_id=task_id, env_id=env_id, turns=turns, reward=float(info_total), success=won,
                      id=f"{env_id}/{task_id}/expert",
                      metadata={"source": "expert", "split": getattr(env.unwrapped, "split", None), "stop_reason": stop})


def iter_expert_trajectories(env_id: str, split: str, limit: int | None = None, *, env_kwargs: dict | None = None,
                             progress: bool = True) -> Iterator[Trajectory]:
    """Expert trajectories for the first `limit` tasks of `split` (in the env's task order)."""
    from tqdm import tqdm

    env = gym.make(env_id, split=split, **(env_kwargs or {}))
    try:
        tasks = env.unwrapped.list_tasks(split)[:limit]
        for task_id in tqdm(tasks, desc=f"experts {env_id}:{split}", disable=not progress):
            yield expert_trajectory(env, env_id, task_id)
    finally:
        env.close()
