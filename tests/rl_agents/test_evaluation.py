"""evaluate / explore / Best-of-N. The Echo test env's rewards depend only on the task
(tests/rl_agents/test_rollout.py), so the expected metrics are worked out by hand below."""

from __future__ import annotations

import json

import pytest

from rl_agents.engines import EngineSpec
from rl_agents.evaluation import best_of_n, evaluate, explore, summarize
from rl_agents.rollout_group import RolloutSection
from rl_agents.trajectory import Trajectory, Turn, read_jsonl
from tests.rl_agents.test_rollout import ECHO


def _key(t):
    return (t.task_id, t.metadata["sample_index"])


def _traj(task, sample, reward, success=False, steps=1, **meta):
    turns = [Turn("user", "obs")] + [Turn("assistant", "a"), Turn("user", "o")] * steps
    return Trajectory(task, "e", turns, reward, success, metadata={"sample_index": sample, **meta})


def test_best_of_n_keeps_the_best_reward_per_task_first_sample_on_ties():
    trajs = [_traj("a", 0, 0.2), _traj("a", 1, 0.9), _traj("a", 2, 0.5),
             _traj("b", 0, 0.5), _traj("b", 1, 0.5), _traj("c", 0, 1.0, True), _traj("c", 1, 1.0, True)]
    best = best_of_n(trajs)
    assert [(t.task_id, t.metadata["sample_index"]) for t in best] == [("a", 1), ("b", 0), ("c", 0)]


def test_summarize():
    m = summarize([_traj("a", 0, 1.0, True, steps=2), _traj("b", 0, 0.5, steps=4, error="boom", stop_reason="error"),
                   _traj("c", 0, 0.0, steps=3, stop_reason="truncated")])
    assert m["avg_reward"] == pytest.approx(0.5) and m["success_rate"] == pytest.approx(1 / 3)
    assert m["mean_turns"] == pytest.approx(3.0) and m["num_tasks"] == 3 and m["num_errors"] == 1
    assert m["stop_reasons"] == {"?": 1, "error": 1, "truncated": 1}


@pytest.mark.slow
def test_evaluate_reports_per_split_and_writes_json(ray_session, smollm2_dir, tmp_path, capsys):
    """Echo tasks n = 0..5 take min(1 + n % 5, 4) turns = 1,2,3,4,4,1 (mean 2.5); n = 0 and 2
    win (n = 4 is truncated by the 4-turn budget): avg reward = success rate = 2/6."""
    out = tmp_path / "eval" / "report.json"
    report = evaluate(EngineSpec("scripted", str(smollm2_dir)), ECHO, "test_seen,test_unseen", n=6,
                      rollout=RolloutSection(num_workers=1, envs_per_worker=4), out_path=out, progress=False)
    for split in ("test_seen", "test_unseen"):
        m = report["splits"][split]
        assert m["num_tasks"] == 6 and m["num_errors"] == 0
        assert m["avg_reward"] == pytest.approx(2 / 6) and m["success_rate"] == pytest.approx(2 / 6)
        assert m["mean_turns"] == pytest.approx(2.5)
        assert m["stop_reasons"] == {"terminated": 5, "truncated": 1}
        assert report["metrics"][f"eval/{split}/avg_reward"] == pytest.approx(2 / 6)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "test_seen" in printed and "avg reward" in printed and "greedy" in printed


@pytest.mark.slow
def test_best_of_n_and_explore_share_a_group(ray_session, tmp_path):
    """Best-of-3 samples 3 distinct trajectories per task (per-sample seeds) and keeps one per
    task; explore on the same running group writes token-exact JSONL."""
    from rl_agents.models import tiny_llama_dir

    model = str(tiny_llama_dir(tie_word_embeddings=False, initializer_range=0.1))
    rollout = RolloutSection(num_workers=2, envs_per_worker=4)
    with rollout.make_group(model, ECHO, split="test_seen", progress=False) as group:
        report = evaluate(model, ECHO, "test_seen", n=4, best_of=3, max_new_tokens=6, group=group,
                          trajectories_path=tmp_path / "all.jsonl", verbose=False)
        trajs = explore(model, ECHO, "train", n=3, out_path=tmp_path / "explore.jsonl", samples_per_task=2,
                        max_new_tokens=6, group=group, verbose=False)
    assert report["best_of"] == 3 and report["temperature"] == 0.7
    assert report["splits"]["test_seen"]["num_tasks"] == 4
    assert report["splits"]["test_seen"]["mean_turns"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    samples = read_jsonl(tmp_path / "all.jsonl")
    assert len(samples) == 12
    first_actions = {t.task_id: set() for t in samples}
    for t in samples:
        first_actions[t.task_id].add(tuple(t.agent_turns[0].token_ids))
    assert all(len(v) == 3 for v in first_actions.values())  # three different samples per task
    back = read_jsonl(tmp_path / "explore.jsonl")
    keys = [(f"train-{i}", s) for i in range(3) for s in (0, 1)]
    assert [_key(t) for t in back] == [_key(t) for t in trajs] == keys
    assert all(a.token_ids and len(a.logprobs) == len(a.token_ids) for t in back for a in t.agent_turns)
