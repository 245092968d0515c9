"""Results tables and charts: a run's `results.md` / `results.png`, the demo's, the learning benchmark's.

A row is what `Algorithm.fit` returns: {"stage", "eval/<split>/avg_reward", "eval/<split>/success_rate",
"eval/<split>/per_task" (task id -> [reward, success])}. A row may also carry

* several seeds: `eval/<split>/per_task` a list with one entry per seed, `seeds` their names (to
  compare with the baseline's run of the same seed), and the rates as lists over the seeds. An entry
  may be a plain list of [reward, success] when the task ids are unknown (0/1 outcomes rebuilt from a
  rate): it gets an interval but no paired comparison;
* `columns`: extra cells, column name -> text.

Cells: mean [95% interval] from `rl_agents.stats.mean_ci`; rows without per-task results show their
rate (mean ± sample std over seeds). "vs <baseline>": `rl_agents.stats.paired`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rl_agents.stats import mean_ci, paired, per_task_values
from rl_agents.fileio import atomic_write_text

Row = dict[str, Any]


def write_results(run_dir: Path, rows: list[Row], title: str = "Results", baseline: str | None = None,
                  note: str = "") -> None:
    """`results.json` (the rows, per-task results included), `results.md` (`results_table`) and
    `results.png` (`results_chart`), each written atomically."""
    if not rows:
        return
    atomic_write_text(run_dir / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(run_dir / "results.md", f"# {title}\n\n" + results_table(rows, baseline) + note)
    results_chart({title: rows}, run_dir / "results.png")


def _splits(rows: list[Row]) -> list[str]:
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/avg_reward")})


def _groups(row: Row, split: str, which: str) -> list | None:
    """The row's per-task values of `which` ('reward' | 'success'), one entry per seed (task id -> value,
    or a list without task ids), as `mean_ci` takes them; None without per-task results."""
    per_task = row.get(f"eval/{split}/per_task")
    seeds = [per_task] if isinstance(per_task, Mapping) else per_task or []
    i = {"reward": 0, "success": 1}[which]
    groups = [per_task_values(s, which) if isinstance(s, Mapping) else [float(v[i]) for v in s] for s in seeds]
    return groups if groups and all(groups) else None


def _rates(row: Row, split: str, which: str) -> list[float]:
    rate = row.get(f"eval/{split}/{'avg_reward' if which == 'reward' else 'success_rate'}")
    return [] if rate is None else list(rate) if isinstance(rate, list) else [rate]


def _cell(row: Row, split: str, which: str) -> str:
    scale, fmt, unit = (1, ".3f", "") if which == "reward" else (100, ".1f", "%")
    groups = _groups(row, split, which)
    if groups:
        return mean_ci(groups).format(scale, fmt, unit)
    rates = _rates(row, split, which)
    if not rates:
        return "-"
    spread = f" ± {statistics.stdev(rates) * scale:{fmt}}" if len(rates) > 1 else ""
    return f"{statistics.fmean(rates) * scale:{fmt}}{unit}{spread}"


def _versus(row: Row, base: Row, split: str) -> str:
    """Won / lost / tied against `base` on the tasks both ran, each seed against the base's run of the
    same seed and a task counting once (by its mean over the seeds), and the sign-test p."""
    mine, theirs = _groups(row, split, "reward"), _groups(base, split, "reward")
    if row is base or not mine or not theirs:
        return "-"
    their_seeds = list(base.get("seeds", range(len(theirs))))
    a: dict[str, list[float]] = {}
    b: dict[str, list[float]] = {}
    for seed, x in zip(row.get("seeds", range(len(mine))), mine):
        if seed not in their_seeds:
            continue
        y = theirs[their_seeds.index(seed)]
        if not (isinstance(x, Mapping) and isinstance(y, Mapping)):
            return "-"
        for task in x.keys() & y.keys():
            a.setdefault(task, []).append(x[task])
            b.setdefault(task, []).append(y[task])
    result = paired(a, b)
    return "-" if result is None else result.format()


def results_table(rows: list[Row], baseline: str | None = None) -> str:
    """A table like the papers', with how sure it is: per row and split, average reward and success rate
    with 95% bootstrap intervals over the tasks (and seeds), and each row against `baseline` (a stage
    name; default the first row) on the same tasks: won / lost / tied on the task's reward, sign-test p."""
    splits = _splits(rows)
    base = next((r for r in rows if r["stage"] == baseline), rows[0]) if rows else None
    extra = list(dict.fromkeys(c for r in rows for c in r.get("columns", {})))
    columns = ("avg reward", "success", f"vs {base['stage']} (W/L/T, p)") if base else ()
    names = ["stage", *[f"{s}: {c}" for s in splits for c in columns], *extra]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [c for s in splits for c in (_cell(r, s, "reward"), _cell(r, s, "success"), _versus(r, base, s))]
        lines.append("| " + " | ".join([r["stage"], *cells, *(r.get("columns", {}).get(c, "-") for c in extra)]) + " |")
    found = [[_groups(r, s, "reward") for s in splits] for r in rows]  # per row and split: per-seed values
    counts = {r["stage"]: "/".join(str(len(g[0])) if g else "-" for g in gs) for r, gs in zip(rows, found) if any(gs)}
    sizes = ""
    if len(set(counts.values())) == 1:
        sizes = f", {next(iter(counts.values()))} tasks ({'/'.join(splits)})"
    elif counts:
        sizes = f", tasks ({'/'.join(splits)}): " + ", ".join(f"{k} {v}" for k, v in counts.items())
    seeds = [g for gs in found for g in gs if g]
    without_ids = any(not isinstance(x, Mapping) for g in seeds for x in g)
    lines += ["", f"95% intervals: percentile bootstrap over the tasks{sizes}; W/L/T: tasks whose reward is higher / "
              "lower / equal than the baseline's, p: two-sided sign test."
              + (" Several seeds: a replicate draws the tasks once for all seeds (they share their tasks) and the "
                 "seeds; in W/L/T each seed's run meets the baseline's run of that seed and a task counts once, by "
                 "its mean over the seeds." if any(len(g) > 1 for g in seeds) else "")
              + (" Rows without task ids (0/1 outcomes rebuilt from a recorded rate) pool their seeds: an interval as "
                 "wide as one seed's, and no W/L/T." if without_ids else "")]
    return "\n".join(lines) + "\n"


def results_chart(tables: Mapping[str, list[Row]], path: Path) -> None:
    """One line of panels per table (title -> rows): average reward and success rate, a bar per row and
    split with its 95% interval as error bars (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(rows) for rows in tables.values())
    fig, axes = plt.subplots(len(tables), 2, figsize=(max(8, 1.6 * widest + 4), 4 * len(tables)), squeeze=False)
    for (title, rows), line in zip(tables.items(), axes):
        splits = _splits(rows)
        width = 0.8 / max(len(splits), 1)
        for ax, which, name in ((line[0], "reward", "average reward"), (line[1], "success", "success rate")):
            for k, s in enumerate(splits):
                means, low, high = [], [], []
                for r in rows:
                    groups, rates = _groups(r, s, which), _rates(r, s, which)
                    ci = mean_ci(groups) if groups else None
                    means.append(ci.mean if ci else statistics.fmean(rates) if rates else float("nan"))
                    low.append(max(ci.mean - ci.low, 0) if ci else 0.0)
                    high.append(max(ci.high - ci.mean, 0) if ci else 0.0)
                x = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(rows))]
                ax.bar(x, means, width, yerr=[low, high], capsize=3, label=s)
            ax.set_xticks(range(len(rows)), [r["stage"] for r in rows], rotation=20, ha="right")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{title}: {name} (95% interval)" if title else f"{name} (95% interval)")
            ax.grid(axis="y", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
