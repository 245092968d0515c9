"""Bootstrap intervals and the paired sign test, against values worked out by hand or in closed form."""

import math

import numpy as np
import pytest

from rl_agents.stats import mean_ci, paired, per_task_values, sign_test_p


def test_sign_test_hand_values():
    """8 wins, 2 losses: P(X <= 2 | n = 10) = (1 + 10 + 45) / 1024 = 56/1024; two-sided 112/1024 = 0.109375.
    10 : 0 gives 2/1024; 5 : 5 gives 1 (capped); no untied task gives 1."""
    assert sign_test_p(8, 2) == pytest.approx(112 / 1024, abs=1e-15)
    assert sign_test_p(2, 8) == sign_test_p(8, 2)
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024, abs=1e-15)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0


def test_paired_counts_wins_losses_ties_on_common_tasks_only():
    method = {("s0", "a"): 1.0, ("s0", "b"): 0.5, ("s0", "c"): 0.2, ("s1", "a"): 0.0, ("s0", "only"): 1.0}
    base = {("s0", "a"): 0.5, ("s0", "b"): 0.5, ("s0", "c"): 0.4, ("s1", "a"): 0.0}
    r = paired(method, base)
    assert (r.wins, r.losses, r.ties, r.n) == (1, 1, 2, 4) and r.p == 1.0
    assert r.format() == "1/1/2, p=1"
    assert paired({"x": 1.0}, {"y": 1.0}) is None
    # several seeds: a task counts once, by its mean difference (+0.5 and -0.5 -> a tie)
    r = paired({"a": [1.0, 0.0], "b": [1.0, 1.0]}, {"a": [0.5, 0.5], "b": [0.0, 0.5]})
    assert (r.wins, r.losses, r.ties) == (1, 0, 1)


def test_one_seed_interval_matches_the_normal_approximation_and_is_reproducible():
    """200 Bernoulli(0.3) tasks with 60 successes: mean 0.3, bootstrap 95% interval ~ 0.3 ± 1.96·sqrt(0.21/200)
    = 0.3 ± 0.0635 (the bootstrap of a mean of 0/1 values is binomial/200)."""
    values = [1.0] * 60 + [0.0] * 140
    ci = mean_ci([values])
    assert ci.mean == pytest.approx(0.3) and (ci.n, ci.seeds) == (200, 1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 200)
    assert ci.low == pytest.approx(0.3 - half, abs=0.01) and ci.high == pytest.approx(0.3 + half, abs=0.01)
    assert mean_ci([values]) == ci  # seeded
    assert mean_ci([[0.5] * 20]).low == mean_ci([[0.5] * 20]).high == 0.5  # no spread, no width
    assert ci.format(100, ".1f", "%").startswith("30.0% [")


def test_two_seed_interval_carries_the_seed_spread():
    """Two seeds on the same 50 tasks that disagree (every task 0.2 vs 0.8): no spread over tasks, so a
    bootstrap over tasks alone would be a point; over seeds, a replicate is 0.2 (both picks seed 0),
    0.5 or 0.8, so the 95% interval is [0.2, 0.8]."""
    ci = mean_ci([{f"t{i}": 0.2 for i in range(50)}, {f"t{i}": 0.8 for i in range(50)}])
    assert ci.mean == pytest.approx(0.5) and ci.seeds == 2 and ci.n == 100
    assert ci.low == pytest.approx(0.2) and ci.high == pytest.approx(0.8)
    with pytest.raises(ValueError):
        mean_ci([[]])


def test_seeds_that_share_their_tasks_do_not_narrow_the_interval():
    """The same ten 0/1 outcomes as one seed or as two identical seeds on the same tasks: the tasks
    are drawn once per replicate for both seeds, so the interval stays one seed's (drawing them per
    seed would shrink it by about sqrt(2): [0.3, 0.9] -> [0.3, 0.7])."""
    outcomes = {f"t{i}": float(i < 6) for i in range(10)}
    one, two = mean_ci([outcomes]), mean_ci([outcomes, dict(outcomes)])
    assert (one.low, one.high) == (pytest.approx(0.3), pytest.approx(0.9))
    assert (two.low, two.high) == (pytest.approx(0.3), pytest.approx(0.9))
    # without task ids (outcomes rebuilt from rates) two seeds are pooled at one seed's width
    pooled = mean_ci([list(outcomes.values()), list(outcomes.values())])
    assert pooled.mean == pytest.approx(0.6) and pooled.high - pooled.low == pytest.approx(0.6, abs=0.1)


def test_per_task_values():
    assert per_task_values({"a": [0.5, 0], "b": [1.0, 1]}) == {"a": 0.5, "b": 1.0}
    assert per_task_values({"a": [0.5, 0], "b": [1.0, 1]}, "success") == {"a": 0.0, "b": 1.0}
    assert np.isclose(sum(per_task_values({"a": [0.25, 0]}).values()), 0.25)
