"""Rollout worker: one engine + K environments, K episodes advanced together, token-exact.

`RolloutWorker` is a plain class (tests run it in-process); `RolloutGroup`
(`rl_agents.rollout_group`) runs N of them as Ray actors. Each turn the worker

1. starts episodes in free env slots (`env.reset(seed=task.seed, options={"task_id": ...})`),
2. sends the running context of every active episode to the engine in ONE batched call,
3. parses each output's action (`prompting.parse_action`), steps the envs, and extends each
   context with exactly the ids the policy will see next.

Token layout of a recorded `Trajectory` (docs/design.md §3; `ChatSegmenter` owns the chat template):

    system+user turns : prompt_ids(initial messages), one span per message (prompt_turn_ids)
    agent turn t      : the ids the engine generated, stop token included, + their log-probs
    user turn t       : close_turn_ids(generated) + observation_ids(observation)

so concatenating `turn.token_ids` up to agent turn t is exactly the prompt the engine got at
turn t (`debug=True` records those prompts in `metadata["debug_prompts"]` to prove it). The
last observation (the one that ended the episode) is kept as a final user turn, as in expert
trajectories; the policy never saw it and it carries no loss.

Episode ends (`metadata["stop_reason"]`): 'terminated' (task over), 'truncated' (the env's turn
budget), 'context' (the next prompt + max_new_tokens would exceed `max_context`; ended cleanly
before generating), 'error' (the env raised: it is closed and re-created, the episode is
recorded with `metadata["error"]`, the worker goes on).

Trajectory `reward` = the env's `info["reward_total"]` (the final reward in [0, 1]), `success`
= `info["won"]`, per-turn rewards on the agent turns; where the env gives `info["state_key"]`,
`metadata["state_keys"]` holds the key of the state each agent turn acted in (GiGPO's anchors).

Sampling seeds: with the HF engine one seed drives a batched call; the worker derives it from
the tasks' seeds and turn numbers of the batch, so a rerun with the same tasks, K and weights
reproduces its samples. Greedy rollouts do not depend on batching at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from rl_agents.cluster import Weights, discard_local_copy, node_id
from rl_agents.engines import Engine, EngineSpec, Generation, SamplingParams, make_engine
from rl_agents.prompting import initial_messages, parse_action
from rl_agents.trajectory import Trajectory, Turn


@dataclass(frozen=True)
class RolloutTask:
    """One episode to run: sample `sample_index` of task `task_id` (of `split`, or the worker's)."""

    task_id: str
    sample_index: int = 0
    seed: int = 0
    """Env reset seed (and part of the sampling seed)."""
    split: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.sample_index)


def task_seed(seed: int, task_id: str, sample_index: int) -> int:
    """A per-(task, sample) seed that depends on nothing else (not the order, not the worker)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task_id}/{sample_index}".encode()).digest()[:4], "little")


def make_tasks(task_ids: Iterable[str], samples_per_task: int = 1, seed: int = 0,
               split: str | None = None) -> list[RolloutTask]:
    """`samples_per_task` tasks per id, each with its own seed."""
    return [RolloutTask(str(t), s, task_seed(seed, str(t), s), split)
            for t in task_ids for s in range(samples_per_task)]


@dataclass
class RolloutConfig:
    """What every worker of a group shares."""

    env_id: str
    """A registered Gymnasium id (`rl_agents/TextShop-v0`) or Gymnasium's `module:Id` form."""
    split: str = "train"
    """Default split of the tasks (a `RolloutTask` may name another)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    num_envs: int = 8
    """K: env instances per worker = episodes advanced together, one batched engine call per turn."""
    max_context: int = 2048
    """Token budget of prompt + generation; an episode whose next turn would not fit ends ('context')."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=128))
    """Default sampling; the chat template's stop tokens are added to `stop_token_ids`."""
    debug: bool = False
    """Record the exact prompt of every turn in `metadata["debug_prompts"]` (big; for tests)."""

    def __post_init__(self):
        if self.num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {self.num_envs}")
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")


@dataclass
class _Episode:
    task: RolloutTask
    slot: int
    split: str
    turns: list[Turn] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    reward: float = 0.0
    won: bool = False
    stop_reason: str | None = None
    error: str | None = None
    generated_tokens: int = 0
    state_keys: list = field(default_factory=list)
    """The env's `info["state_key"]` after reset and after each step (None where it gives none)."""
    started: float = field(default_factory=time.perf_counter)


class RolloutWorker:
    """An engine and K envs; `rollout(tasks)` runs them K at a time (see the module docstring)."""

    def __init__(self, engine: EngineSpec | Engine, config: RolloutConfig, worker_index: int = 0,
                 weights: Weights | None = None):
        """`engine`: a spec (built here, inside the actor) or a ready engine (in-process use).
        `weights`: the policy to start from when it may have to come through the object store
        (`rl_agents.cluster.Weights`; it replaces the spec's model)."""
        import envs  # noqa: F401  (registers the built-in envs inside the actor)
        from rl_agents.tokenization import ChatSegmenter

        self.config, self.worker_index = config, worker_index
        self.node_id = node_id()
        self.weights_version = weights.version if weights is not None else 0
        if weights is not None and isinstance(engine, EngineSpec):
            engine = dataclasses.replace(engine, model=weights.local_path())
        self.engine = make_engine(engine) if isinstance(engine, EngineSpec) else engine
        self.engine.reserve_prefix_cache(config.num_envs, config.max_context)  # all K episodes' KV between turns
        self.segmenter = ChatSegmenter(self.engine.tokenizer)
        self.envs: list[tuple[str, gym.Env] | None] = [None] * config.num_envs
        self.env_restarts = 0
        self.stats = {"engine_s": 0.0, "env_s": 0.0, "engine_calls": 0, "generated_tokens": 0}

    # ---- verbs -----------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "worker": self.worker_index, "node_id": self.node_id,
                "weights": getattr(self.engine, "weights_path", None), "weights_version": self.weights_version}

    def list_tasks(self, split: str | None = None) -> list[str]:
        return list(self._env(0, split or self.config.split).unwrapped.list_tasks(split or self.config.split))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        return self.engine.generate(prompts, params)

    def update_weights(self, weights: Weights | str, version: int | None = None) -> str:
        """Load new weights: a `Weights` (its node-local copy when shipped) or a path; returns the path
        loaded. The previous node-local copy, if any, is removed once the new one is in."""
        previous = getattr(self.engine, "weights_path", None)
        if isinstance(weights, Weights):
            path, version = weights.local_path(), weights.version
        else:
            path = str(weights)
        self.engine.update_weights(path)
        self.weights_version = self.weights_version + 1 if version is None else version
        if previous is not None and str(previous) not in (path, str(getattr(self.engine, "base_path", ""))):
            discard_local_copy(str(previous))  # never the copy the engine was built from (LoRA merges into it)
        return path

    def release_cache(self) -> int:
        """Free the engine's between-call memory (before training: the trainer needs the RAM); returns the pid."""
        self.engine.release_cache()
        return os.getpid()

    def close(self) -> None:
        for i, slot in enumerate(self.envs):
            if slot is not None:
                _close_quietly(slot[1])
                self.envs[i] = None
        self.engine.close()

    def rollout(self, tasks: Sequence[RolloutTask], sampling: SamplingParams | None = None) -> list[Trajectory]:
        """Run every task; trajectories come back in the order their episodes finished."""
        return list(self.iter_rollout(tasks, sampling))

    def iter_rollout(self, tasks: Sequence[RolloutTask], sampling: SamplingParams | None = None) -> Iterator[Trajectory]:
        """`rollout`, yielding each trajectory as soon as its episode ends. Called on a Ray actor this is
        a streaming generator: the driver sees every episode land (progress, and a worker that dies
        mid-call loses only the episodes it had not yet yielded)."""
        params = self._params(sampling)
        queue, free = deque(tasks), list(range(self.config.num_envs))[::-1]
        active: list[_Episode] = []
        while queue or active:
            while queue and free:
                ep = self._start(queue.popleft(), free.pop(), params)
                if ep.stop_reason:
                    free.append(ep.slot)
                    yield self._record(ep)
                else:
                    active.append(ep)
            if not active:
                continue
            for ep in active:
                if self.config.debug:
                    ep.prompts.append(list(ep.context))
            call_seed = _batch_seed(params.seed, [(ep.task.seed, len(ep.turns)) for ep in active])
            t0 = time.perf_counter()
            gens = self.engine.generate([ep.context for ep in active], dataclasses.replace(params, seed=call_seed))
            self.stats["engine_s"] += time.perf_counter() - t0
            self.stats["engine_calls"] += 1
            still, finished = [], []
            for ep, gen in zip(active, gens, strict=True):
                self._advance(ep, gen, params)
                if ep.stop_reason:
                    finished.append(self._record(ep))
                    free.append(ep.slot)
                else:
                    still.append(ep)
            active = still
            for traj in finished:  # not `yield from finished`: under Ray 2.60 it raised "list_iterator has no .send"
                yield traj

    # ---- episode steps ---------------------------------------------------------------------
    def _params(self, sampling: SamplingParams | None) -> SamplingParams:
        params = sampling or self.config.sampling
        stops = tuple(dict.fromkeys([*params.stop_token_ids, *self.segmenter.stop_token_ids]))
        return dataclasses.replace(params, stop_token_ids=stops)

    def _env(self, slot: int, split: str) -> gym.Env:
        cur = self.envs[slot]
        if cur is None or cur[0] != split:
            if cur is not None:
                _close_quietly(cur[1])
            self.envs[slot] = (split, gym.make(self.config.env_id, split=split, **self.config.env_kwargs))
        return self.envs[slot][1]

    def _fail(self, ep: _Episode, exc: BaseException) -> None:
        """The env raised: record the episode as an error, close and forget the env (re-made lazily)."""
        ep.stop_reason, ep.error = "error", f"{type(exc).__name__}: {exc}"
        cur, self.envs[ep.slot] = self.envs[ep.slot], None
        if cur is not None:
            _close_quietly(cur[1])
        self.env_restarts += 1

    def _fits(self, ep: _Episode, params: SamplingParams) -> bool:
        return len(ep.context) + params.max_new_tokens <= self.config.max_context

    def _start(self, task: RolloutTask, slot: int, params: SamplingParams) -> _Episode:
        ep = _Episode(task, slot, task.split or self.config.split)
        t0 = time.perf_counter()
        try:
            env = self._env(slot, ep.split)
            obs, info = env.reset(seed=task.seed, options={"task_id": task.task_id})
        except Exception as e:  # a crashed simulator, not a bad action
            self._fail(ep, e)
            return ep
        finally:
            self.stats["env_s"] += time.perf_counter() - t0
        ep.state_keys.append(info.get("state_key"))
        messages = initial_messages(env, obs)
        spans = self.segmenter.prompt_turn_ids(messages)  # prompt_ids(messages), one span per message
        ep.turns = [Turn(m["role"], m["content"], token_ids=list(ids)) for m, ids in zip(messages, spans, strict=True)]
        ep.context = [i for ids in spans for i in ids]
        if not self._fits(ep, params):
            ep.stop_reason = "context"
        return ep

    def _advance(self, ep: _Episode, gen: Generation, params: SamplingParams) -> None:
        ep.turns.append(Turn("assistant", gen.text, token_ids=list(gen.token_ids), logprobs=list(gen.logprobs)))
        ep.context += gen.token_ids
        ep.generated_tokens += len(gen.token_ids)
        self.stats["generated_tokens"] += len(gen.token_ids)
        t0 = time.perf_counter()
        try:
            obs, reward, terminated, truncated, info = self.envs[ep.slot][1].step(parse_action(gen.text))
        except Exception as e:
            self._fail(ep, e)
            return
        finally:
            self.stats["env_s"] += time.perf_counter() - t0
        ep.turns[-1].reward = float(reward)
        ep.state_keys.append(info.get("state_key"))
        ep.reward, ep.won = float(info.get("reward_total", ep.reward + reward)), bool(info.get("won", False))
        obs_ids = list(self.segmenter.close_turn_ids(gen.token_ids)) + list(self.segmenter.observation_ids(obs))
        ep.turns.append(Turn("user", obs, token_ids=obs_ids))
        if terminated or truncated:
            ep.stop_reason = "terminated" if terminated else "truncated"
            return
        ep.context += obs_ids
        if not self._fits(ep, params):
            ep.stop_reason = "context"

    def _record(self, ep: _Episode) -> Trajectory:
        meta = {"split": ep.split, "seed": ep.task.seed, "sample_index": ep.task.sample_index,
                "stop_reason": ep.stop_reason, "worker": self.worker_index, "node_id": self.node_id,
                "weights": getattr(self.engine, "weights_path", None), "weights_version": self.weights_version,
                "generated_tokens": ep.generated_tokens,
                "wall_s": round(time.perf_counter() - ep.started, 4)}
        if ep.error:
            meta["error"] = ep.error
        steps = sum(t.is_agent for t in ep.turns)
        if steps and all(k is not None for k in ep.state_keys[:steps]):  # the state each action was taken in
            meta["state_keys"] = [str(k) for k in ep.state_keys[:steps]]
        if self.config.debug:
            meta["debug_prompts"] = ep.prompts
        return Trajectory(task_id=ep.task.task_id, env_id=self.config.env_id, turns=ep.turns, reward=ep.reward,
                          success=ep.won, id=f"{self.config.env_id}/{ep.task.task_id}/{ep.task.sample_index}",
                          metadata=meta)


def _batch_seed(base: int | None, parts: list[tuple[int, int]]) -> int:
    digest = hashlib.sha256(repr((base, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _close_quietly(env: gym.Env) -> None:
    try:
        env.close()
    except Exception:  # a crashed env may fail to close; it is being replaced anyway
        pass
