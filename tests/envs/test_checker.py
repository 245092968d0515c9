"""The text-env checker, on the docs' worked example (docs/new_env.md) and on broken envs."""

import random

import gymnasium as gym
import pytest

import examples.guess_number_env  # noqa: F401  (registers examples/GuessNumber-v0)
from envs import StepResult
from envs.checker import adversarial_actions, check_text_env, expert_reward
from examples.guess_number_env import GuessNumberEnv


def test_worked_example_passes_every_check():
    report = check_text_env("examples/GuessNumber-v0", n_actions=2_000, n_experts=10)
    assert report.ok, report.summary()
    assert report.splits == {"train": 80, "test_seen": 20, "test_unseen": 20}
    assert report.random_actions == 2_000 and report.exceptions == []
    assert len(report.expert_rewards) == 10 and set(report.expert_rewards.values()) == {1.0}


def test_rewards_sum_to_final_reward_and_budget_truncates():
    env = gym.make("examples/GuessNumber-v0").unwrapped
    obs, info = env.reset(options={"task_id": "train-37"})
    assert info["task_id"] == "train-37" and info["max_turns"] == 10
    rewards = []
    for guess in (50, 25, 37):
        obs, r, term, trunc, info = env.step(f"guess[{guess}]")
        rewards.append(r)
    assert rewards == [0.0, 0.0, 1.0] and term and not trunc and info["won"]
    env.reset(options={"task_id": "train-37"})
    for i in range(10):
        _, _, term, trunc, _ = env.step("guess[1]")
    assert (term, trunc) == (False, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("guess[2]")


def test_seeded_reset_picks_the_same_task():
    env = gym.make("examples/GuessNumber-v0").unwrapped
    picks = [env.reset(seed=7)[1]["task_id"] for _ in range(2)]
    other = gym.make("examples/GuessNumber-v0").unwrapped.reset(seed=7)[1]["task_id"]
    assert picks[0] == picks[1] == other


def test_expert_replay_of_the_worked_example():
    env = GuessNumberEnv()
    assert all(expert_reward(env, t) == 1.0 for t in env.list_tasks("train"))
    assert max(len(env.expert_steps(t)) for t in env.list_tasks("train")) <= 7


def test_adversarial_actions_cover_hostile_cases():
    acts = adversarial_actions(random.Random(0), 3_000)
    assert "" in acts
    assert any(len(a) >= 100_000 for a in acts)
    assert any(any(ord(c) > 127 for c in a) for a in acts)
    assert any("\n" in a for a in acts)


class _Raises(GuessNumberEnv):
    def _step_action(self, action):
        if "[" in action and "]" not in action:
            raise ValueError("parser bug")
        return super()._step_action(action)


class _Nondeterministic(GuessNumberEnv):
    calls = 0

    def _step_action(self, action):
        type(self).calls += 1
        return StepResult(f"call {type(self).calls}", score=0, progress=0, done=False)


class _BadExpert(GuessNumberEnv):
    def expert_steps(self, task_id):
        return super().expert_steps(task_id)[:-1]


@pytest.mark.parametrize("cls,what", [(_Raises, "exceptions"), (_Nondeterministic, "deterministic"),
                                      (_BadExpert, "expert")])
def test_checker_catches_broken_envs(cls, what):
    env_id = f"tests/{cls.__name__}-v0"
    gym.register(id=env_id, entry_point=cls)
    report = check_text_env(env_id, n_actions=500, n_experts=3)
    assert not report.ok
    if what == "exceptions":
        assert report.exceptions and "ValueError: parser bug" in report.exceptions[0]
    elif what == "deterministic":
        assert not report.deterministic
    else:
        assert report.expert_rewards and all(r == 0.0 for r in report.expert_rewards.values())


def test_per_episode_turn_budget_and_long_experts():
    """reset(options={"max_turns": N}) overrides the budget once; expert replays are not cut by it."""
    from rl_agents.experts import expert_trajectory

    env = gym.make("examples/GuessNumber-v0", max_turns=3)
    assert env.reset(options={"task_id": "train-1", "max_turns": 5})[1]["max_turns"] == 5
    assert env.reset(options={"task_id": "train-1"})[1]["max_turns"] == 3
    traj = expert_trajectory(env, "examples/GuessNumber-v0", "train-1")  # 6 guesses > budget 3
    assert traj.num_steps == 6 and traj.reward == 1.0 and traj.metadata["stop_reason"] == "terminated"
