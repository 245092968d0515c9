"""Evaluation and exploration on top of `RolloutGroup`: the functions the CLI calls.

`evaluate(model, env_id, split)` runs the first `n` tasks of each split (the env's fixed task
order) and reports, per split, the papers' metrics: average final reward, success rate, and
mean number of agent turns (plus error and stop-reason counts). It prints a table, returns a
dict and, with `out_path`, writes it as JSON atomically.

* `best_of=1` (default): one greedy episode per task (temperature 0), as the papers evaluate.
* `best_of=N`: the Best-of-N baseline as ETO/StepAgent report it: N episodes per task sampled at
  `temperature` (default 0.7), and per task the one with the highest final reward is kept
  (ties: the lowest sample index). The selection uses the env's own reward, i.e. an oracle
  verifier: an upper bound on what a learned reranker could pick, not a deployable policy.

`explore(model, env_id, split, n, out_path)` samples trajectories (ETO's exploration phase) and
writes them to JSONL (`rl_agents.trajectory.write_jsonl`), token ids and log-probs included.

Both start workers as `rollout` says (`RolloutSection.make_group`), or reuse a running `group`
(its engines keep their current weights); Ray is started if needed and shut down again only if
they started it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rl_agents.engines import EngineSpec, SamplingParams
from rl_agents.ray_utils import init_ray
from rl_agents.rollout import make_tasks
from rl_agents.rollout_group import RolloutGroup, RolloutSection
from rl_agents.trajectory import Trajectory, atomic_write_text, write_jsonl


def best_of_n(trajectories: Sequence[Trajectory]) -> list[Trajectory]:
    """Per task, the trajectory with the highest final reward (ties: lowest sample index); task order kept."""
    best: dict[str, Trajectory] = {}
    for t in trajectories:
        cur = best.get(t.task_id)
        if cur is None or (t.reward, t.success, -t.metadata.get("sample_index", 0)) > \
                (cur.reward, cur.success, -cur.metadata.get("sample_index", 0)):
            best[t.task_id] = t
    return list(best.values())


def summarize(trajectories: Sequence[Trajectory]) -> dict[str, Any]:
    """avg_reward, success_rate, mean_turns (agent turns), num_tasks, num_errors, stop_reasons."""
    n = len(trajectories)
    mean = (lambda xs: sum(xs) / n) if n else (lambda xs: math.nan)  # noqa: E731
    return {"avg_reward": mean([t.reward for t in trajectories]),
            "success_rate": mean([float(t.success) for t in trajectories]),
            "mean_turns": mean([t.num_steps for t in trajectories]),
            "num_tasks": n,
            "num_errors": sum(1 for t in trajectories if "error" in t.metadata),
            "stop_reasons": dict(Counter(t.metadata.get("stop_reason", "?") for t in trajectories))}


def format_table(report: dict[str, Any]) -> str:
    head = f"{'split':<14}{'tasks':>7}{'avg reward':>12}{'success':>10}{'turns':>8}{'errors':>8}"
    rows = [head, "-" * len(head)]
    for split, m in report["splits"].items():
        rows.append(f"{split:<14}{m['num_tasks']:>7}{m['avg_reward']:>12.4f}{m['success_rate']:>10.3f}"
                    f"{m['mean_turns']:>8.2f}{m['num_errors']:>8}")
    title = f"{report['env_id']} | {report['model']} | " + (
        "greedy" if report["best_of"] == 1 else f"Best-of-{report['best_of']} (oracle) at T={report['temperature']}")
    return title + "\n" + "\n".join(rows)


def _splits(split: str | Sequence[str]) -> list[str]:
    return [s.strip() for s in split.split(",")] if isinstance(split, str) else list(split)


DEFAULT_ROLLOUT = RolloutSection(envs_per_worker=8, max_new_tokens=128)


class _Session:
    """Start Ray (if needed) and a group (if none was given); undo exactly what was started."""

    def __init__(self, group: RolloutGroup | None, make):
        self.given, self.make = group, make

    def __enter__(self) -> RolloutGroup:
        self.started_ray = init_ray()
        self.group = self.given or self.make()
        return self.group

    def __exit__(self, *exc) -> None:
        import ray

        if self.given is None:
            self.group.shutdown()
        if self.started_ray:
            ray.shutdown()


def evaluate(model: str | EngineSpec, env_id: str, split: str | Sequence[str] = "test_seen", n: int | None = None,
             best_of: int = 1, *, rollout: RolloutSection | None = None, temperature: float | None = None,
             top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, out_path: str | Path | None = None,
             trajectories_path: str | Path | None = None, env_kwargs: dict | None = None,
             group: RolloutGroup | None = None, progress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Average reward, success rate and mean turns per split (see the module docstring).

    model: an HF checkpoint dir / alias or an `EngineSpec`; ignored if `group` is given.
    rollout: the workers to start when no `group` is given (engine, workers, resources, episodes per
    worker, context; default `RolloutSection(envs_per_worker=8)`).
    split: one split, a comma-separated list or a list. n: first n tasks per split (None = all).
    best_of: 1 = greedy; N > 1 = oracle Best-of-N at `temperature` (default 0.7).
    trajectories_path: also write every evaluated trajectory (all N samples) as JSONL.
    """
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    temperature = (0.0 if best_of == 1 else 0.7) if temperature is None else temperature
    if best_of > 1 and temperature <= 0:
        raise ValueError("Best-of-N needs temperature > 0 (greedy samples would all be the same)")
    splits = _splits(split)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    report: dict[str, Any] = {"env_id": env_id, "model": str(getattr(model, "model", model)), "best_of": best_of,
                              "temperature": temperature, "seed": seed, "n": n, "splits": {}, "metrics": {}}
    make = lambda: (rollout or DEFAULT_ROLLOUT).make_group(model, env_id, env_kwargs=env_kwargs,  # noqa: E731
                                                           split=splits[0], progress=progress)
    with _Session(group, make) as g:
        report["model"] = str(g.weights_path or g.engine.model)
        # Every split in one call: one batch per worker instead of one per split (a batched decode
        # step costs little more for 2x the rows), then the results are split back apart.
        tasks = {s: make_tasks(g.list_tasks(s)[:n], best_of, seed, split=s) for s in splits}
        everything = g.run([t for ts in tasks.values() for t in ts], sampling, desc=f"eval {'+'.join(splits)}")
        done = 0
        for s, ts in tasks.items():
            trajs = everything[done : done + len(ts)]
            done += len(ts)
            scored = best_of_n(trajs) if best_of > 1 else trajs
            m = summarize(scored)
            # Per task [reward, success]: what intervals and paired comparisons are computed from (rl_agents.stats).
            m["per_task"] = {t.task_id: [t.reward, int(t.success)] for t in scored}
            report["splits"][s] = m
            for k in ("avg_reward", "success_rate", "mean_turns"):
                report["metrics"][f"eval/{s}/{k}"] = m[k]
    if verbose:
        print(format_table(report))
    if out_path is not None:
        atomic_write_text(out_path, json.dumps(report, indent=2) + "\n")
    if trajectories_path is not None:
        write_jsonl(trajectories_path, everything)
    return report


def explore(model: str | EngineSpec, env_id: str, split: str = "train", n: int | None = None,
            out_path: str | Path | None = None, *, samples_per_task: int = 1, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, rollout: RolloutSection | None = None,
            env_kwargs: dict | None = None, group: RolloutGroup | None = None, progress: bool = True,
            verbose: bool = True) -> list[Trajectory]:
    """Sample `samples_per_task` trajectories for each of the first `n` tasks of `split`; write JSONL.

    Arguments as in `evaluate`; the trajectories keep token ids and sampling log-probs.
    """
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    make = lambda: (rollout or DEFAULT_ROLLOUT).make_group(model, env_id, env_kwargs=env_kwargs,  # noqa: E731
                                                           split=split, progress=progress)
    with _Session(group, make) as g:
        task_ids = g.list_tasks(split)[:n]
        trajs = g.run(make_tasks(task_ids, samples_per_task, seed, split=split), sampling, desc=f"explore {split}")
    if out_path is not None:
        write_jsonl(out_path, trajs)
    if verbose:
        m = summarize(trajs)
        print(f"explored {m['num_tasks']} episodes of {env_id}:{split}: avg reward {m['avg_reward']:.4f}, "
              f"success {m['success_rate']:.3f}, mean turns {m['mean_turns']:.2f}, errors {m['num_errors']}"
              + (f" -> {out_path}" if out_path else ""))
    return trajs
