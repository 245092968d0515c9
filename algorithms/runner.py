"""`rl-agents train CONFIG.yaml [key=value ...]`: run any algorithm from a YAML config.

The YAML names the algorithm (`algo: dmpo`) and overrides its config's defaults; unknown keys
and bad values fail before any work starts, naming the dotted key. A run directory holds the
resolved config, metrics JSONL (plus each update's TensorBoard events under `train/`),
checkpoints, trajectories, `results.md` (a table per split, with 95% intervals) and `results.png`
(`algorithms.results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

import algorithms.preference  # noqa: F401  (registers eto, dmpo, dpo)
import algorithms.imitation  # noqa: F401  (registers sft, rft)
import algorithms.grpo  # noqa: F401  (registers grpo, gigpo)
import algorithms.ppo  # noqa: F401  (registers ppo)
import algorithms.step_dpo  # noqa: F401  (registers step_dpo)
import algorithms.step_gail  # noqa: F401  (registers step_gail)
from algorithms.base import ALGORITHMS, Algorithm, AlgorithmConfig
from algorithms.results import write_results
from rl_agents.config import ConfigError, from_dict, load_mapping, read_yaml_mapping, to_dict
from rl_agents.trajectory import atomic_write_text


def load_algorithm_config(path: str | Path | None, overrides: list[str] | None = None) -> AlgorithmConfig:
    """An algorithm's YAML (`algo:` names it) + dotted overrides -> its validated config."""
    data = load_mapping(path, overrides)
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

    from rl_agents import storage

    try:
        resolve_model(cfg.model)
    except (ValueError, OSError) as e:  # OSError: a model at a URI that cannot be read
        raise ConfigError(f"model: {e}") from None
    if storage.is_uri(cfg.train.storage_path):  # bucket, endpoint and credentials: now, not at the first update
        try:
            storage.probe(cfg.train.storage_path)
        except ValueError as e:
            raise ConfigError(f"train.storage_path: {e}") from None
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


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"algo: must be one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]
