"""`rl-agents train CONFIG.yaml [key=value ...]`: run any algorithm from a YAML config.

The YAML names the algorithm (`algo: dmpo`) and overrides its config's defaults; unknown keys
and bad values fail before any work starts, naming the dotted key. A run directory holds the
resolved config, metrics JSONL (plus each update's TensorBoard events under `train/`),
checkpoints, trajectories, `results.md` (a table per split, with 95% intervals) and `results.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

import algorithms.preference  # noqa: F401  (registers eto, dmpo, dpo)
import algorithms.imitation  # noqa: F401  (registers sft, rft)
import algorithms.ppo  # noqa: F401  (registers ppo)
import algorithms.step_dpo  # noqa: F401  (registers step_dpo)
import algorithms.step_gail  # noqa: F401  (registers step_gail)
from algorithms.base import ALGORITHMS, Algorithm, AlgorithmConfig
from rl_agents.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping, to_dict
from rl_agents.stats import mean_ci, paired, per_task_values
from rl_agents.trajectory import atomic_write_text


def load_algorithm_config(path: str | Path | None, overrides: list[str] | None = None) -> AlgorithmConfig:
    data = read_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    algo = data.pop("algo", None)
    if algo not in ALGORITHMS:
        raise ConfigError(f"algo: must be one of {sorted(ALGORITHMS)}, got {algo!r}")
    return from_dict(ALGORITHMS[algo].config_class, data)


def env_class(env_id: str):
    """The class behind a Gymnasium id (`rl_agents/TextShop-v0` or `module:Id`), without making an env."""
    import importlib

    import gymnasium as gym

    if ":" in env_id:
        module, _, env_id = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"env.env_id: cannot import {module!r} for {env_id!r}: {e}") from None
    if env_id not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("rl_agents/"))
        raise ConfigError(f"env.env_id: unknown env {env_id!r}; registered rl_agents envs: {', '.join(known)}")
    entry = gym.registry[env_id].entry_point
    if callable(entry):
        return entry
    module, _, name = str(entry).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"env.env_id: {env_id!r} is registered but cannot be loaded ({e}); "
                          "is its optional extra installed?") from None


def check_writable(run_dir: str | Path) -> None:
    """`run_dir` can be created and written (probed with a file that is removed again)."""
    import os
    import tempfile

    path = Path(run_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        from rl_agents.fileio import describe_os_error

        raise ConfigError(f"run_dir: cannot write {path}: {describe_os_error(e)}") from None


def preflight(cfg: AlgorithmConfig) -> None:
    """What can be checked before any work starts (no Ray, no model load, no env): the model
    resolves, the env id exists and has the eval splits, data files read, `run_dir` is writable.
    Raises `ConfigError` naming the key (data files: `TrajectoryFormatError` naming file:line)."""
    from rl_agents.models import resolve_model

    try:
        resolve_model(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    cls = env_class(cfg.env.env_id)
    splits = getattr(cls, "splits", None)
    if splits is not None:
        bad = [s for s in cfg.env.eval_splits if s not in splits]
        if bad:
            raise ConfigError(f"env.eval_splits: {bad} {'is not a split' if len(bad) == 1 else 'are not splits'} "
                              f"of {cfg.env.env_id} (its splits: {', '.join(splits)})")
        if "train" not in splits:
            raise ConfigError(f"env.env_id: {cfg.env.env_id} has no 'train' split to train on (its splits: "
                              f"{', '.join(splits)})")
    from algorithms.base import load_expert_file

    for key, path in (("env.expert_data", cfg.env.expert_data), ("rollout.explore_data", cfg.rollout.explore_data)):
        if path is not None:
            load_expert_file(path, cfg.env.env_id, need_agent_turns=key == "env.expert_data")
    if getattr(cfg, "pairs_file", None) is not None:
        from algorithms.preference import load_pairs_file

        load_pairs_file(cfg.pairs_file, cfg.env.env_id)
    check_writable(cfg.run_dir)


# Keys a re-run may change and still continue the run in its run_dir (more iterations, another cadence).
RESUMABLE_CHANGES = ("iterations", "evaluate_every")


def _normalised(d: dict) -> dict:
    return json.loads(json.dumps(d))  # tuples -> lists, as they come back from YAML


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def resume_point(cfg: AlgorithmConfig) -> dict[str, Any] | None:
    """What an earlier run in `cfg.run_dir` left: None for a fresh run dir, else
    {"state": state.json or None, "rows": results.json rows}. A run dir holding another config
    raises `ConfigError` naming the keys that differ (nothing is overwritten)."""
    run_dir = Path(cfg.run_dir)
    saved_cfg = run_dir / "config.yaml"
    if not saved_cfg.exists():
        return None
    saved = read_yaml_mapping(saved_cfg)
    current = _normalised({"algo": cfg.algo, **to_dict(cfg)})
    diff = [k for k in _differences(_normalised(saved), current) if k not in RESUMABLE_CHANGES]
    if diff:
        raise ConfigError(f"run_dir: {run_dir} holds a run with another config (differs at {', '.join(diff[:5])}"
                          f"{', ...' if len(diff) > 5 else ''}); re-run with the same config to resume it, or pick "
                          "another run_dir")
    state_path, rows_path = run_dir / "state.json", run_dir / "results.json"
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    except (OSError, ValueError) as e:
        raise ConfigError(f"run_dir: cannot resume {run_dir}: {state_path.name} or {rows_path.name} is unreadable "
                          f"({e}); pick another run_dir") from None
    return {"state": state, "rows": rows}


def run(cfg: AlgorithmConfig, *, evaluate_base: bool = True, label: str | None = None) -> list[dict[str, Any]]:
    """Train for `cfg.iterations`, evaluating as configured; returns the result rows.

    Resumable: re-running the same config on the same run_dir continues where the earlier run
    stopped. Finished iterations and evaluations are not redone (their rows come from
    results.json, the policy and iteration from state.json); an interrupted iteration reuses its
    exploration file and its update resumes from its last training checkpoint (`train.checkpoint_every`)."""
    preflight(cfg)
    earlier = resume_point(cfg)
    algo = cfg.build()
    run_dir = algo.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if earlier is not None:
        rows = [r for r in earlier["rows"] if r.get("iteration", 0) == 0 or
                (earlier["state"] is not None and r["iteration"] <= earlier["state"]["iteration"])]
        algo.resuming = True
        if earlier["state"] is not None:
            algo.load_state(run_dir)
        done = algo.iteration
        print(f"resuming {run_dir}: {done} of {cfg.iterations} iterations done"
              f"{', start evaluation done' if any(r.get('stage') == 'start' for r in rows) else ''}", flush=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({"algo": cfg.algo, **to_dict(cfg)}, sort_keys=False))
    try:
        algo.fit(rows, evaluate_start=evaluate_base, label=label, on_row=lambda rows: write_results(run_dir, rows))
    finally:
        algo.stop()
    write_results(run_dir, rows)
    return rows


def write_results(run_dir: Path, rows: list[dict[str, Any]], title: str = "Results", baseline: str | None = None,
                  note: str = "") -> None:
    """`results.json` (the rows, per-task results included), `results.md` (`results_table`) and
    `results.png` (`results_chart`), each written atomically."""
    if not rows:
        return
    atomic_write_text(run_dir / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(run_dir / "results.md", f"# {title}\n\n" + results_table(rows, baseline) + note)
    results_chart(rows, run_dir / "results.png", title)


def _splits(rows) -> list[str]:
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/avg_reward")})


def _per_task(row: dict[str, Any], split: str, which: str) -> dict[str, float] | None:
    per_task = row.get(f"eval/{split}/per_task")
    return per_task_values(per_task, which) if per_task else None


def _cell(row: dict[str, Any], split: str, which: str) -> str:
    """Mean and 95% bootstrap interval over the tasks (the bare mean for rows without per-task results)."""
    values = _per_task(row, split, which)
    scale, fmt, unit = (1, ".3f", "") if which == "reward" else (100, ".1f", "%")
    if values:
        return mean_ci([values]).format(scale, fmt, unit)
    mean = row.get(f"eval/{split}/{'avg_reward' if which == 'reward' else 'success_rate'}")
    return "-" if mean is None else f"{mean * scale:{fmt}}{unit}"


def results_table(rows: list[dict[str, Any]], baseline: str | None = None) -> str:
    """A table like the papers', with how sure it is: per stage and split, average reward and success
    rate with 95% bootstrap intervals over the tasks, and each stage against `baseline` (a stage name;
    default the first row) on the same tasks: won / lost / tied on the task's reward, sign-test p
    (`rl_agents.stats`)."""
    splits = _splits(rows)
    base = next((r for r in rows if r["stage"] == baseline), rows[0]) if rows else None
    head = "| stage | " + " | ".join(f"{s}: avg reward | {s}: success | {s}: vs {base['stage']} (W/L/T, p)"
                                     for s in splits) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(splits)]
    for r in rows:
        cells = []
        for s in splits:
            mine, theirs = _per_task(r, s, "reward"), _per_task(base, s, "reward")
            result = None if r is base or not mine or not theirs else paired(mine, theirs)
            versus = "-" if result is None else result.format()
            cells += [_cell(r, s, "reward"), _cell(r, s, "success"), versus]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    counts = {r["stage"]: "/".join(str(len(_per_task(r, s, "reward") or {})) for s in splits) for r in rows}
    sizes = (f"{next(iter(counts.values()))} tasks ({'/'.join(splits)})" if len(set(counts.values())) == 1
             else "tasks (" + "/".join(splits) + "): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append("")
    lines.append(f"95% intervals: percentile bootstrap over the tasks, {sizes}; W/L/T: tasks whose reward is higher / "
                 "lower / equal than the baseline's, p: two-sided sign test.")
    return "\n".join(lines) + "\n"


def results_chart(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Bars per stage (the stages are categories), one per split, with their 95% intervals as error
    bars: average reward and success rate side by side (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = _splits(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4))
    width = 0.8 / max(len(splits), 1)
    for ax, which, name in ((axes[0], "reward", "average reward"), (axes[1], "success", "success rate")):
        for k, s in enumerate(splits):
            means, low, high = [], [], []
            for r in rows:
                values = _per_task(r, s, which)
                if values:
                    ci = mean_ci([values])
                    means.append(ci.mean), low.append(max(ci.mean - ci.low, 0)), high.append(max(ci.high - ci.mean, 0))
                else:
                    means.append(r.get(f"eval/{s}/{'avg_reward' if which == 'reward' else 'success_rate'}", float("nan")))
                    low.append(0.0), high.append(0.0)
            x = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(x, means, width, yerr=[low, high], capsize=3, label=s)
        ax.set_xticks(range(len(rows)), [r["stage"] for r in rows], rotation=20, ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} (95% interval)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"algo: must be one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]
