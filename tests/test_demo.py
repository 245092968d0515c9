"""`make demo`'s code path end to end on a tiny model: SFT -> ETO and DMPO -> one evaluation table.

The real demo (SmolLM2-135M, minutes of CPU) is measured, not tested; this runs every stage of it
with the same code on a tiny random Llama and checks what the stages hand to each other.
"""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_on_a_tiny_model(tmp_path, tiny_model_dir):
    from algorithms.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--model", str(tiny_model_dir), "--sft-tasks", "4", "--explore-tasks", "4",
               "--eval-tasks", "2", "--base-eval-tasks", "1", "--max-turns", "2", "--envs", "4"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["base", "SFT", "ETO", "DMPO"]
    assert rows["base"]["eval/test_seen/num_tasks"] == 1 and rows["SFT"]["eval/test_unseen/num_tasks"] == 2
    # each stage trained its own policy, and ETO/DMPO both started from the SFT agent
    policies = [rows[s]["policy"] for s in ("base", "SFT", "ETO", "DMPO")]
    assert len(set(policies)) == 4
    for stage in ("eto", "dmpo"):
        state = json.loads((out / stage / "state.json").read_text())
        assert state["config"]["model"] == rows["SFT"]["policy"] and state["iteration"] == 1
    # DMPO trained on ETO's exploration, not on a new one
    eto_explored = (out / "eto" / "trajectories" / "explore_iter0.jsonl").read_text()
    assert (out / "dmpo" / "trajectories" / "explore_iter0.jsonl").read_text() == eto_explored
    assert result["exploration"]["data/pairs"] >= 2
    table = (out / "results.md").read_text()
    assert "| DMPO |" in table and (out / "results.png").stat().st_size > 10_000
    # intervals and the paired comparison with the SFT agent on the same tasks
    assert "test_seen: vs SFT (W/L/T, p)" in table and "95% intervals" in table
    assert sorted(rows["ETO"]["eval/test_seen/per_task"]) == sorted(rows["SFT"]["eval/test_seen/per_task"])
    assert len(rows["ETO"]["eval/test_unseen/per_task"]) == 2
