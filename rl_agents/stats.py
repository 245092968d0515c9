"""How sure a result is: bootstrap intervals over tasks (and seeds), paired sign tests.

Evaluations here are 10-400 tasks per split, so one task moves a rate by 0.25-10 points; a mean
without its interval says little. Every results table (a run's `results.md`, the demo's, the learning
benchmark's) reports:

* `mean_ci`: the mean per-task value (reward or success) with a 95% percentile-bootstrap interval.
  One seed: resample the tasks. Several seeds on the same tasks: each replicate draws the tasks
  (shared by the seeds) and the seeds, so the interval carries both the task sampling and the
  seed-to-seed spread; the point estimate is the mean of the seed means.
* `paired`: a method against a baseline on the same tasks: tasks won, lost and tied on the
  per-task value (with several seeds, its mean over them: a task counts once), and the two-sided
  exact sign-test p-value on the untied ones (`sign_test_p`). It ignores the size of each
  difference, so it is conservative, and it needs no assumption about the reward's distribution.

Deterministic: the bootstrap's generator is seeded (`seed`), so a table is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 10_000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    """Tasks per seed (summed over seeds)."""
    seeds: int

    def format(self, scale: float = 1.0, fmt: str = ".3f", unit: str = "") -> str:
        """`0.470 [0.412, 0.528]`: the mean and its 95% interval."""
        return f"{self.mean * scale:{fmt}}{unit} [{self.low * scale:{fmt}}, {self.high * scale:{fmt}}]"


def mean_ci(per_seed: Sequence[Mapping[str, float] | Sequence[float]], *, level: float = LEVEL,
            n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean of the per-seed means and its percentile-bootstrap interval. `per_seed`: one entry per
    seed, each the per-task values, as a task id -> value map or a plain list.

    * Maps with the same task ids (every seed evaluated on the same tasks, as our benchmarks do): a
      replicate draws the tasks once, shared by all seeds, and the seeds with replacement; drawing
      the tasks per seed would treat one task's difficulty as independent across seeds and make
      the interval too narrow by up to sqrt(seeds).
    * Lists (task ids unknown, e.g. outcomes rebuilt from a rate): one seed, its tasks resampled;
      several, they are pooled and a replicate draws as many values as one seed has, an interval
      as wide as one seed's at the pooled mean (conservative: it credits nothing to the seeds).

    Raises ValueError on no values."""
    if per_seed and all(isinstance(g, Mapping) for g in per_seed) and len({frozenset(g) for g in per_seed}) == 1 \
            and per_seed[0]:
        tasks = sorted(per_seed[0])
        matrix = np.asarray([[float(g[t]) for t in tasks] for g in per_seed])  # (seeds, tasks)
    else:
        groups = [np.asarray(list(g.values()) if isinstance(g, Mapping) else g, dtype=np.float64) for g in per_seed]
        groups = [g for g in groups if len(g)]
        if not groups:
            raise ValueError("mean_ci: no values")
        point = float(np.mean([g.mean() for g in groups]))
        pooled, draw = np.concatenate(groups), max(len(g) for g in groups)
        boot = pooled[np.random.default_rng(seed).integers(len(pooled), size=(n_boot, draw))].mean(axis=1)
        return _interval(point, boot, level, sum(len(g) for g in groups), len(groups))
    rng = np.random.default_rng(seed)
    k, n = matrix.shape
    picked_seeds = rng.integers(k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)
    picked_tasks = rng.integers(n, size=(n_boot, n))
    boot = matrix[picked_seeds[:, :, None], picked_tasks[:, None, :]].mean(axis=(1, 2))  # (n_boot,)
    return _interval(float(matrix.mean()), boot, level, k * n, k)


def _interval(point: float, boot: np.ndarray, level: float, n: int, seeds: int) -> Interval:
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high), n, seeds)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least as uneven as wins : losses | p = 1/2); 1 with none."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    wins: int
    losses: int
    ties: int
    p: float

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def format(self) -> str:
        """`12/5/183, p=0.14`: won / lost / tied against the baseline, sign-test p."""
        return f"{self.wins}/{self.losses}/{self.ties}, p={self.p:.2g}"


def paired(method: Mapping, baseline: Mapping, *, tol: float = 1e-9) -> Paired | None:
    """`method` vs `baseline` on the task ids both have (task id -> value, or -> a list of values, one
    per seed: a task then counts once, by its mean difference over the seeds, since the seeds share
    their tasks): won, lost, tied (|difference| <= tol) and the sign test's p. None when they share no task."""
    common = [k for k in method if k in baseline]
    if not common:
        return None
    mean = lambda v: float(np.mean(v)) if isinstance(v, (list, tuple, np.ndarray)) else float(v)  # noqa: E731
    diffs = [mean(method[k]) - mean(baseline[k]) for k in common]
    wins = sum(d > tol for d in diffs)
    losses = sum(d < -tol for d in diffs)
    return Paired(wins, losses, len(diffs) - wins - losses, sign_test_p(wins, losses))


def per_task_values(per_task: Mapping[str, Sequence[float]], which: str = "reward") -> dict[str, float]:
    """An evaluation's `per_task` map (task id -> [reward, success]) as task id -> the chosen value."""
    index = {"reward": 0, "success": 1}[which]
    return {task: float(v[index]) for task, v in per_task.items()}
