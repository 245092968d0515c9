"""`rl-agents train CONFIG.yaml [key=value ...]`: run any algorithm from a YAML config.

The YAML names the algorithm (`algo: dmpo`) and overrides its config's defaults; unknown keys
and bad values fail before any work starts, naming the dotted key. A run directory holds the
resolved config, metrics JSONL (plus each update's TensorBoard events under `train/`),
checkpoints, trajectories, `results.md` (a table per split) and `learning_curve.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

import algorithms.eto  # noqa: F401  (registers eto, dmpo, dpo)
import algorithms.imitation  # noqa: F401  (registers sft, rft)
import algorithms.ppo_baseline  # noqa: F401  (registers ppo)
import algorithms.step_dpo  # noqa: F401  (registers step_dpo)
import algorithms.step_gail  # noqa: F401  (registers step_gail)
from algorithms.base import ALGORITHMS, Algorithm, AlgorithmConfig
from rl_agents.config import ConfigError, apply_overrides, from_dict, to_dict
from rl_agents.trajectory import atomic_write_text


def load_algorithm_config(path: str | Path | None, overrides: list[str] | None = None) -> AlgorithmConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    algo = data.pop("algo", None)
    if algo not in ALGORITHMS:
        raise ConfigError(f"algo: must be one of {sorted(ALGORITHMS)}, got {algo!r}")
    return from_dict(ALGORITHMS[algo].config_class, data)


def run(cfg: AlgorithmConfig, *, evaluate_base: bool = True, label: str | None = None) -> list[dict[str, Any]]:
    """Train for `cfg.iterations`, evaluating as configured; returns the result rows."""
    algo = cfg.build()
    run_dir = algo.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({"algo": cfg.algo, **to_dict(cfg)}, sort_keys=False))
    rows: list[dict[str, Any]] = []
    try:
        if evaluate_base:
            rows.append({"stage": "start", "iteration": 0, **algo.evaluate()})
        for i in range(cfg.iterations):
            metrics = algo.train()
            last = i + 1 == cfg.iterations
            if last or (cfg.evaluate_every and (i + 1) % cfg.evaluate_every == 0):
                rows.append({"stage": f"{label or cfg.algo} iter {i + 1}", "iteration": i + 1,
                             **{k: v for k, v in metrics.items() if k.startswith(("explore/", "data/"))},
                             **algo.evaluate()})
            write_results(run_dir, rows)
    finally:
        algo.stop()
    write_results(run_dir, rows)
    return rows


def write_results(run_dir: Path, rows: list[dict[str, Any]], title: str = "Results") -> None:
    if not rows:
        return
    atomic_write_text(run_dir / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(run_dir / "results.md", results_table(rows, title))
    learning_curve(rows, run_dir / "learning_curve.png")


def _splits(rows) -> list[str]:
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/avg_reward")})


def results_table(rows: list[dict[str, Any]], title: str = "Results") -> str:
    """A table like the papers': per stage, average reward and success rate per split."""
    splits = _splits(rows)
    head = "| stage | " + " | ".join(f"{s}: avg reward | {s}: success" for s in splits) + " |"
    lines = [f"# {title}", "", head, "|---|" + "---|---|" * len(splits)]
    for r in rows:
        cells = []
        for s in splits:
            rew, suc = r.get(f"eval/{s}/avg_reward"), r.get(f"eval/{s}/success_rate")
            cells += [f"{rew:.3f}" if rew is not None else "-", f"{suc:.1%}" if suc is not None else "-"]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def learning_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Average reward and success rate per stage, one line per split (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = _splits(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = list(range(len(rows)))
    for ax, key, name in ((axes[0], "avg_reward", "average reward"), (axes[1], "success_rate", "success rate")):
        for s in splits:
            ax.plot(x, [r.get(f"eval/{s}/{key}", float("nan")) for r in rows], marker="o", label=s)
        ax.set_xticks(x, [r["stage"] for r in rows], rotation=20, ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"algo: must be one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]
