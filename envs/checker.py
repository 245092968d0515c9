"""Our text-env checker: what `gymnasium.utils.env_checker.check_env` does not cover.

`check_text_env(env_id)` runs, on top of Gymnasium's own checker:

* split listing: every split lists unique string task ids;
* determinism: two instances, the same seed, task and actions give identical transitions;
* robustness: N random and adversarial strings (empty, huge, unicode, injected newlines,
  bracket junk, near-miss grammar) never raise, and observations stay in the `Text` space;
* experts: replaying the expert of k train tasks reaches final reward 1.0.

It returns a `CheckReport`; `rl-agents env check ENV_ID` prints it.
"""

from __future__ import annotations

import math
import random
import string
import time
from dataclasses import dataclass, field

import gymnasium as gym
from gymnasium.utils.env_checker import check_env

from envs.base import TextEnv, replay_expert

_WORDS = ["search", "click", "go to", "open", "take", "put", "look", "use", "buy now", "next >", "< prev",
          "inventory", "examine", "focus on", "pick up", "move", "heat", "cool", "clean", "teleport to"]
_UNICODE = "éàüßñ中文日本語한국어😀🚀∑∫√≠≤≥\u200b\u202e\u0000\ufeff"


def adversarial_actions(rng: random.Random, n: int, vocabulary: list[str] | None = None) -> list[str]:
    """`n` strings an agent might emit, from plausible to hostile."""
    words = _WORDS + (vocabulary or [])
    makers = [
        lambda: "",
        lambda: " " * rng.randint(1, 5) + "\n" * rng.randint(0, 3),
        lambda: "".join(rng.choices(string.printable, k=rng.randint(1, 80))),
        lambda: "".join(rng.choices(_UNICODE + string.ascii_letters, k=rng.randint(1, 40))),
        lambda: rng.choice(words) + "[" + "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(0, 20))),
        lambda: rng.choice(words) + "[" + rng.choice(words) + "[" + rng.choice(words) + "]]",
        lambda: rng.choice(words) + " " + " ".join(rng.choices(words, k=rng.randint(0, 4))),
        lambda: f"Thought: hmm\nAction: {rng.choice(words)}\n\nAction: {rng.choice(words)}",
        lambda: rng.choice(words) + "\n" + rng.choice(words) + "\r\n" + rng.choice(words),
        lambda: "x" * rng.choice([1_000, 10_000, 100_000]),
        lambda: rng.choice(words).upper() + "[" + str(rng.randint(-10**9, 10**9)) + "]",
        lambda: "]" * rng.randint(1, 5) + "[" * rng.randint(1, 5),
    ]
    return [rng.choice(makers)() for _ in range(n)]


@dataclass
class CheckReport:
    env_id: str
    gymnasium_check: bool = False
    splits: dict[str, int] = field(default_factory=dict)
    deterministic: bool = False
    random_actions: int = 0
    exceptions: list[str] = field(default_factory=list)
    expert_rewards: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        experts_ok = all(r >= 1.0 - 1e-9 for r in self.expert_rewards.values())
        return self.gymnasium_check and self.deterministic and not self.exceptions and experts_ok and bool(self.splits)

    def summary(self) -> str:
        n_ok = sum(r >= 1.0 - 1e-9 for r in self.expert_rewards.values())
        lines = [
            f"env check: {self.env_id}",
            f"  gymnasium check_env     {'pass' if self.gymnasium_check else 'FAIL'}",
            f"  splits                  {self.splits}",
            f"  deterministic           {'pass' if self.deterministic else 'FAIL'}",
            f"  random actions          {self.random_actions}, exceptions: {len(self.exceptions)}",
            f"  expert replays at 1.0   {n_ok}/{len(self.expert_rewards)}",
            f"  time                    {self.seconds:.1f} s",
            f"  result                  {'PASS' if self.ok else 'FAIL'}",
        ]
        lines += [f"    exception: {e}" for e in self.exceptions[:5]]
        lines += [f"    expert below 1.0: {t} -> {r:.3f}" for t, r in self.expert_rewards.items() if r < 1.0 - 1e-9][:5]
        return "\n".join(lines)


def _rollout(env: TextEnv, seed: int, task_id: str | None, actions: list[str]) -> list[tuple]:
    obs, info = env.reset(seed=seed, options={"task_id": task_id} if task_id else None)
    out = [(obs, info["task_id"])]
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((obs, r, term, trunc))
        if term or trunc:
            break
    return out


def expert_reward(env: TextEnv, task_id: str) -> float:
    """Final reward of the env's expert on `task_id` (`envs.base.replay_expert`)."""
    total = 0.0
    for step in replay_expert(env, task_id):
        if step.expert is not None:
            total = step.info["reward_total"]
    return total


def check_text_env(env_id: str, *, n_actions: int = 10_000, n_experts: int = 5, seed: int = 0,
                   env_kwargs: dict | None = None, progress: bool = False) -> CheckReport:
    """Run every check on `env_id`; exceptions raised by the env are collected, not propagated."""
    start = time.perf_counter()
    report = CheckReport(env_id)
    env_kwargs = env_kwargs or {}
    env_a = gym.make(env_id, **env_kwargs).unwrapped
    env_b = gym.make(env_id, **env_kwargs).unwrapped
    try:
        assert isinstance(env_a, TextEnv), f"{env_id} is not a TextEnv"
        try:
            check_env(env_a, skip_render_check=True)
            report.gymnasium_check = True
        except Exception as e:  # noqa: BLE001 — reported, and our own checks still run
            report.exceptions.append(f"gymnasium check_env: {type(e).__name__}: {e}")

        for split in env_a.splits:
            tasks = env_a.list_tasks(split)
            if len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
                report.exceptions.append(f"split {split!r}: task ids must be unique strings")
            report.splits[split] = len(tasks)

        rng = random.Random(seed)
        train = env_a.list_tasks("train")
        task = train[rng.randrange(len(train))]
        try:
            expert = [s.action for s in env_a.expert_steps(task)]
            has_expert = True
        except NotImplementedError:
            expert, has_expert = [], False
        probe = adversarial_actions(rng, 5) + expert + adversarial_actions(rng, 5)
        try:
            report.deterministic = (_rollout(env_a, seed, task, probe) == _rollout(env_b, seed, task, probe) and
                                    _rollout(env_a, seed + 1, None, probe[:3]) == _rollout(env_b, seed + 1, None, probe[:3]))
        except Exception as e:  # noqa: BLE001
            report.exceptions.append(f"determinism probe: {type(e).__name__}: {e}")

        actions = adversarial_actions(rng, n_actions)
        bar = _progress(n_actions, f"{env_id}: random actions", progress)
        done = True
        for i, a in enumerate(actions):
            try:
                if done:
                    env_a.reset(seed=seed + i)
                obs, r, term, trunc, _ = env_a.step(a)
                if not env_a.observation_space.contains(obs) or not math.isfinite(r):
                    report.exceptions.append(f"action {a[:40]!r}: observation outside the space or reward {r}")
                done = term or trunc
            except Exception as e:  # noqa: BLE001 — the point is to count them
                report.exceptions.append(f"action {a[:40]!r}: {type(e).__name__}: {e}")
                done = True
            report.random_actions += 1
            bar.update(1)
        bar.close()

        if has_expert:
            for t in rng.sample(train, min(n_experts, len(train))):
                report.expert_rewards[t] = expert_reward(env_a, t)
    finally:
        env_a.close()
        env_b.close()
    report.seconds = time.perf_counter() - start
    return report


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
