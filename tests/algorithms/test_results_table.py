"""A run's results table and chart: means with bootstrap intervals, each stage against the baseline."""

from algorithms.results import results_chart, results_table


def _row(stage, rewards):
    per_task = {f"t{i}": [r, int(r >= 1.0)] for i, r in enumerate(rewards)}
    mean = sum(rewards) / len(rewards)
    return {"stage": stage, "eval/test_seen/avg_reward": mean,
            "eval/test_seen/success_rate": sum(r >= 1.0 for r in rewards) / len(rewards),
            "eval/test_seen/per_task": per_task}


def test_table_has_intervals_and_paired_counts_against_the_baseline(tmp_path):
    """SFT: 10 tasks at 0.5. ETO: 8 at 1.0 (won), 1 at 0.5 (tied), 1 at 0.0 (lost): mean 0.85, success 80%;
    vs SFT 8/1/1, sign test on 9 untied: p = 2·(C(9,0) + C(9,1))/2^9 = 20/512 = 0.039. No spread in SFT: its interval is [0.5, 0.5]."""
    rows = [_row("SFT", [0.5] * 10), _row("ETO", [1.0] * 8 + [0.5, 0.0])]
    table = results_table(rows, baseline="SFT")
    lines = table.splitlines()
    assert lines[0] == "| stage | test_seen: avg reward | test_seen: success | test_seen: vs SFT (W/L/T, p) |"
    sft, eto = lines[2], lines[3]
    assert sft.startswith("| SFT | 0.500 [0.500, 0.500] | 0.0% [0.0, 0.0] | - |")
    assert eto.startswith("| ETO | 0.850 [") and eto.endswith("| 8/1/1, p=0.039 |") and "| 80.0% [" in eto
    assert "over the tasks, 10 tasks (test_seen);" in table
    # stages on different task counts (the demo's base model: fewer tasks) say so; no common task: "-"
    small = {**_row("base", [0.0] * 4), "eval/test_seen/per_task": {f"u{i}": [0.0, 0] for i in range(4)}}
    mixed = results_table([small] + rows, baseline="SFT")
    assert "tasks (test_seen): base 4, SFT 10, ETO 10" in mixed and "| base | 0.000 [0.000, 0.000] | 0.0% [0.0, 0.0] | - |" in mixed
    # rows without per-task results (older runs) show the bare mean and no comparison
    old = {"stage": "old", "eval/test_seen/avg_reward": 0.25, "eval/test_seen/success_rate": 0.1}
    assert "| old | 0.250 | 10.0% | - |" in results_table(rows + [old], baseline="SFT")
    results_chart({"demo": rows + [old]}, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 5_000


def _seeds_row(stage, seeds, rewards_per_seed):
    per_task = [{f"t{i}": [r, int(r >= 1.0)] for i, r in enumerate(rewards)} for rewards in rewards_per_seed]
    return {"stage": stage, "seeds": seeds, "eval/test_seen/per_task": per_task,
            "eval/test_seen/avg_reward": [sum(r) / len(r) for r in rewards_per_seed],
            "eval/test_seen/success_rate": [sum(x >= 1.0 for x in r) / len(r) for r in rewards_per_seed],
            "columns": {"seeds": f"{len(seeds)}/2"}}


def test_rows_over_several_seeds(tmp_path):
    """Two seeds on the same 4 tasks. SFT: seed 0 at 0.0 on every task, seed 1 at 1.0: mean 0.5; a replicate
    draws the seeds with replacement, so its mean is 0, 0.5 or 1 (p 1/4, 1/2, 1/4): interval [0, 1].
    ETO, seed 1 only, 0.5 on every task: against SFT's seed 1 (not seed 0, not their mean) it loses all 4:
    0/4/0, p = 2/2^4 = 0.125. Rebuilt (0/1 outcomes without task ids, [1, 0, 0, 0] on both seeds): mean
    0.25, no W/L/T. Rates only, 0.2 and 0.4: 0.300 ± 0.141 (sample std 0.1·√2)."""
    rebuilt = {"stage": "rebuilt", "seeds": [0, 1], "eval/test_seen/per_task": [[[1, 1], [0, 0], [0, 0], [0, 0]]] * 2,
               "eval/test_seen/avg_reward": [0.25, 0.25], "eval/test_seen/success_rate": [0.25, 0.25]}
    rates = {"stage": "rates", "eval/test_seen/avg_reward": [0.2, 0.4], "eval/test_seen/success_rate": [0.2, 0.4]}
    rows = [_seeds_row("SFT", [0, 1], [[0.0] * 4, [1.0] * 4]), _seeds_row("ETO", [1], [[0.5] * 4]), rebuilt, rates]
    table = results_table(rows, baseline="SFT")
    lines = table.splitlines()
    assert lines[0].endswith("| test_seen: vs SFT (W/L/T, p) | seeds |")
    assert lines[2] == "| SFT | 0.500 [0.000, 1.000] | 50.0% [0.0, 100.0] | - | 2/2 |"
    assert lines[3] == "| ETO | 0.500 [0.500, 0.500] | 0.0% [0.0, 0.0] | 0/4/0, p=0.12 | 1/2 |"
    assert lines[4].startswith("| rebuilt | 0.250 [0.000, ") and lines[4].endswith("| - | - |")
    assert lines[5] == "| rates | 0.300 ± 0.141 | 30.0% ± 14.1 | - | - |"
    assert "4 tasks (test_seen)" in table and "Several seeds" in table and "Rows without task ids" in table
    results_chart({"seeds": rows}, tmp_path / "sub" / "seeds.png")
    assert (tmp_path / "sub" / "seeds.png").stat().st_size > 5_000
