"""The text-environment contract every env of rl_agents follows (docs/design.md §2).

A `TextEnv` is a `gymnasium.Env[str, str]` with a language action space:

* `reset(seed=None, options={"task_id": ..., "max_turns": ...})` -> `(observation, info)`; `info`
  carries `task_id` and `instruction`; `max_turns` overrides the turn budget for one episode. Without a task id, a task of the env's split is drawn with
  `self.np_random`, so the same seed gives the same task.
* `step(action: str)` -> `(observation, reward, terminated, truncated, info)`. Any string is a
  legal input: unparsable or impossible actions get a feedback observation, never an exception.
  `terminated` = the task ended (success or failure); `truncated` = the turn budget ran out.
  `info` carries `score` (the env's native score), `won` and `reward_total`.
* Reward convention: the step rewards of an episode sum to its *final reward* in [0, 1]
  (the papers' metric: WebShop attribute match, ScienceWorld score / 100, ALFWorld success).
  Envs whose progress is incremental (ScienceWorld) pay the increments as they come; others pay
  everything on the last step. `info["reward_total"]` is the running sum.
* Tasks are listed per split (`list_tasks(split)`), and `expert_steps(task_id)` gives an expert
  solution as `ExpertStep(thought, action)` where the benchmark (or a solver) provides one.
* State keys (optional): an env whose observation text does not identify its state (ALFWorld's
  "Nothing happens." is said in every state) returns a key of its exact current state from
  `state_key()`; `reset` and `step` then put it in `info["state_key"]` (a string: equal keys =
  equal states). GiGPO's step groups use it (`algorithms.grpo`); any Gymnasium env can put the
  same info key.

Subclasses implement `_reset_task`, `_step_action`, `list_tasks`, and optionally
`expert_steps`, `max_turns_for` and `state_key`. The base class owns task selection, the turn budget,
reward bookkeeping and observation sanitising (the charset and `max_length` of the `Text`
space). A genuine env failure (a crashed simulator) propagates as an exception; the rollout
worker restarts the env and records the episode as an error.
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from gymnasium import spaces

# Printable ASCII plus newline/tab: what our envs emit and what a ReAct agent writes.
# Gymnasium's default Text charset is alphanumeric only (no spaces), which no text env can use.
TEXT_CHARSET = frozenset(string.printable)
MAX_TEXT = 16_384


@dataclass(frozen=True)
class ExpertStep:
    """One expert step: the reasoning shown to the learner and the env action."""

    thought: str
    action: str


@dataclass
class StepResult:
    """What a subclass's `_step_action` returns; the base class turns it into Gymnasium's tuple."""

    observation: str
    score: float  # the env's native score after this step
    progress: float  # the final-reward-so-far in [0, 1] after this step
    done: bool  # the task ended (success or failure)
    won: bool = False
    info: dict[str, Any] | None = None


def sanitize(text: str, max_length: int = MAX_TEXT) -> str:
    """Map a string into the `Text` space: unknown characters become '?', then truncate."""
    if not all(c in TEXT_CHARSET for c in text):
        text = "".join(c if c in TEXT_CHARSET else "?" for c in text)
    return text[:max_length]


MAX_TASK_ID = 256
_WARNED: set = set()


def warn_once(key, message: str) -> None:
    """A warning printed once per `key` and process (a rollout worker resets thousands of episodes)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


class TaskIdError(ValueError):
    """A task id that no env could have (empty, huge, control characters, surrogates)."""


def check_task_id(task_id: Any) -> str:
    """A task id as a string, or a ValueError naming the problem (never echoing a huge id back):
    at most 256 printable characters, no NUL or other control characters, no lone surrogates."""
    task_id = str(task_id)
    shown = repr(task_id[:40]) + (f"... ({len(task_id)} characters)" if len(task_id) > 40 else "")
    if not task_id:
        raise TaskIdError("task id is empty")
    if len(task_id) > MAX_TASK_ID:
        raise TaskIdError(f"task id {shown} is too long (at most {MAX_TASK_ID} characters)")
    bad = next((c for c in task_id if not c.isprintable() or 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:
        raise TaskIdError(f"task id {shown} contains the character {bad!r}, which no task id has")
    return task_id


class TextEnv(gym.Env[str, str]):
    """Base class for rl_agents text environments. See the module docstring for the contract."""

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}
    #: splits this env lists tasks for
    splits: tuple[str, ...] = ("train", "test_seen", "test_unseen")
    #: default turn budget (agent actions per episode)
    default_max_turns: int = 30
    #: a short description of the action grammar, shown to the agent in its system prompt
    action_help: str = ""

    def __init__(self, split: str = "train", max_turns: int | None = None, render_mode: str | None = None):
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not one of {list(self.splits)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not one of {self.metadata['render_modes']}")
        self.split = split
        self.max_turns = max_turns
        self.render_mode = render_mode
        self.observation_space = spaces.Text(max_length=MAX_TEXT, charset=TEXT_CHARSET)
        self.action_space = spaces.Text(max_length=MAX_TEXT, charset=TEXT_CHARSET)
        self.task_id: str | None = None
        self.instruction: str = ""
        self._turn = 0
        self._progress = 0.0
        self._done = True
        self._last_obs = ""
        self._budget = self.default_max_turns

    # ---- what subclasses implement -------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        """Task ids of a split, in a fixed order."""
        raise NotImplementedError

    def _reset_task(self, task_id: str) -> tuple[str, str, dict[str, Any]]:
        """Start `task_id`; return (first observation, instruction, extra info)."""
        raise NotImplementedError

    def _step_action(self, action: str) -> StepResult:
        """Apply one action. Never raises for a bad action; raises only on a genuine env failure."""
        raise NotImplementedError

    def expert_steps(self, task_id: str) -> list[ExpertStep]:
        """An expert solution of `task_id` that reaches final reward 1.0 when replayed."""
        raise NotImplementedError(f"{type(self).__name__} provides no expert trajectories")

    def max_turns_for(self, task_id: str) -> int:
        """The turn budget of a task (benchmarks like ScienceWorld set one per task type)."""
        return self.default_max_turns

    def state_key(self) -> str | None:
        """A key of the current state (equal keys = equal states), or None: the observation says it."""
        return None

    # ---- Gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        task_id = options.get("task_id")
        if task_id is None:
            tasks = self.list_tasks(self.split)
            task_id = tasks[int(self.np_random.integers(len(tasks)))]
        task_id = check_task_id(task_id)
        home = self._split_of(task_id)
        if home is not None and home != self.split:
            warn_once((type(self).__name__, home, self.split),
                      f"{type(self).__name__}: task {task_id!r} belongs to split {home!r}, not to this env's split "
                      f"{self.split!r}" + (" (a train run is using a test task)" if self.split == "train" else "")
                      + "; said once per pair of splits")
        obs, instruction, extra = self._reset_task(task_id)
        self.task_id, self.instruction = task_id, instruction
        self._turn, self._progress, self._done = 0, 0.0, False
        if options.get("max_turns") is not None:  # a per-episode budget (expert replays use it)
            self._budget = int(options["max_turns"])
        else:
            self._budget = self.max_turns if self.max_turns is not None else self.max_turns_for(task_id)
        self._last_obs = sanitize(obs)
        info = {"task_id": task_id, "instruction": instruction, "score": 0.0, "won": False,
                "reward_total": 0.0, "max_turns": self._budget, **extra}
        if home is not None and home != self.split:
            info["task_split"] = home
        self._put_state_key(info)
        return self._last_obs, info

    def _put_state_key(self, info: dict[str, Any]) -> None:
        key = self.state_key()
        if key is not None:
            info["state_key"] = key

    def _split_of(self, task_id: str) -> str | None:
        """The split listing `task_id` (this env's own first), or None; the lists are read once."""
        if not hasattr(self, "_split_sets"):
            self._split_sets: dict[str, frozenset[str]] = {}
        for split in (self.split, *[s for s in self.splits if s != self.split]):
            if split not in self._split_sets:
                try:
                    self._split_sets[split] = frozenset(self.list_tasks(split))
                except Exception:  # an env may not list every split (e.g. data not installed)
                    self._split_sets[split] = frozenset()
            if task_id in self._split_sets[split]:
                return split
        return None

    def step(self, action: str):
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        if not isinstance(action, str):
            action = str(action)
        result = self._step_action(action)
        self._turn += 1
        progress = min(max(float(result.progress), 0.0), 1.0)
        reward = progress - self._progress
        self._progress = progress
        terminated = bool(result.done)
        truncated = (not terminated) and self._turn >= self._budget
        self._done = terminated or truncated
        self._last_obs = sanitize(result.observation)
        info = {"task_id": self.task_id, "score": float(result.score), "won": bool(result.won),
                "reward_total": self._progress, "turn": self._turn, **(result.info or {})}
        self._put_state_key(info)
        return self._last_obs, float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode == "ansi":
            return self._last_obs
        if self.render_mode == "human":
            print(self._last_obs)
        return None


@dataclass
class ReplayStep:
    """One step of `replay_expert`: the expert's step (None for the reset) and what the env returned."""

    expert: ExpertStep | None
    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


def replay_expert(env: gym.Env, task_id: str):
    """Play the expert of `task_id` in `env` (a `TextEnv`, wrapped or not): first the reset, then one
    `ReplayStep` per expert action until the episode ends or the actions run out. A demonstration is
    not cut by the agent's turn budget (some ScienceWorld gold paths and ALFWorld expert plans are
    longer than ETO's budgets): the reset's budget fits the expert. Its observations and rewards are
    the env's own, so an expert trajectory's final reward is measured, not assumed."""
    base = env.unwrapped
    steps = base.expert_steps(task_id)
    obs, info = env.reset(options={"task_id": task_id, "max_turns": max(len(steps), base.max_turns_for(task_id))})
    yield ReplayStep(None, obs, 0.0, False, False, info)
    for step in steps:
        obs, reward, terminated, truncated, info = env.step(step.action)
        yield ReplayStep(step, obs, float(reward), terminated, truncated, info)
        if terminated or truncated:
            return
