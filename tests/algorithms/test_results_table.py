"""A run's results table and chart: means with bootstrap intervals, each stage against the baseline."""

from algorithms.runner import results_chart, results_table


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
    results_chart(rows + [old], tmp_path / "results.png", "demo")
    assert (tmp_path / "results.png").stat().st_size > 5_000
