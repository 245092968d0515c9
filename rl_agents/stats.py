"""How sure a result is: bootstrap intervals over tasks (and seeds), paired sign tests.

Evaluations here are 10-400 tasks per split, so one task moves a rate by 0.25-10 points; a mean
without its interval says little. Every results table (a run's `results.md`, the demo's, the learning
benchmark's) reports:

* `mean_ci`: the mean per-task value (reward or success) with a 95% percentile-bootstrap interval.
  One seed: resample the tasks. Several seeds: a two-level bootstrap (resample the seeds, then the
  tasks within each), so the interval carries the seed-to-seed spread too; the point estimate is
  the mean of the seed means.
* `paired`: a method against a baseline on the same tasks (same seed, same task id): tasks won,
  lost and tied on the per-task value, and the two-sided exact sign-test p-value on the untied ones
  (`sign_test_p`). It ignores the size of each difference, so it is conservative, and it needs no
  assumption about the reward's distribution.

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


def mean_ci(per_seed: Sequence[Sequence[float]], *, level: float = LEVEL, n_boot: int = N_BOOT,
            seed: int = 0) -> Interval:
    """Mean of the per-seed means of `per_seed` (one list of per-task values per seed) and its
    percentile-bootstrap interval: tasks resampled within each seed, seeds resampled when there
    are several. Raises ValueError on no values."""
    groups = [np.asarray(g, dtype=np.float64) for g in per_seed if len(g)]
    if not groups:
        raise ValueError("mean_ci: no values")
    rng = np.random.default_rng(seed)
    k = len(groups)
    point = float(np.mean([g.mean() for g in groups]))
    picked = rng.integers(k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)  # seeds per replicate
    slot_means = np.empty(picked.shape)  # each slot's seed, its tasks resampled
    for i, g in enumerate(groups):
        where = picked == i
        draws = rng.integers(len(g), size=(int(where.sum()), len(g)))
        slot_means[where] = g[draws].mean(axis=1)
    boot = slot_means.mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high), sum(len(g) for g in groups), k)


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


def paired(method: Mapping, baseline: Mapping, *, tol: float = 1e-9) -> Paired:
    """`method` vs `baseline` on the keys both have (e.g. (seed, task id) -> reward): won, lost, tied
    (|difference| <= tol) and the sign test's p. Raises ValueError when they share no key."""
    common = [k for k in method if k in baseline]
    if not common:
        raise ValueError("paired: the two results share no task")
    diffs = [float(method[k]) - float(baseline[k]) for k in common]
    wins = sum(d > tol for d in diffs)
    losses = sum(d < -tol for d in diffs)
    return Paired(wins, losses, len(diffs) - wins - losses, sign_test_p(wins, losses))


def per_task_values(per_task: Mapping[str, Sequence[float]], which: str = "reward") -> dict[str, float]:
    """An evaluation's `per_task` map (task id -> [reward, success]) as task id -> the chosen value."""
    index = {"reward": 0, "success": 1}[which]
    return {task: float(v[index]) for task, v in per_task.items()}
