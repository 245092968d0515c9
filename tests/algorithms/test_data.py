import json

import pytest

from rl_agents.trajectory import Trajectory, Turn
from algorithms.data import is_noisy, step_prefixes, successful, trajectory_pairs, truncate_steps


def _traj(task, actions, reward, **meta):
    turns = [Turn("system", "s"), Turn("user", "instruction")]
    for i, a in enumerate(actions):
        turns += [Turn("assistant", f"Thought: step {i}\nAction: {a}"), Turn("user", f"obs {i}")]
    return Trajectory(task_id=task, env_id="e", turns=turns, reward=reward, success=reward == 1.0, metadata=meta)


def test_pairs_follow_eto_reward_rule():
    experts = {"a": _traj("a", ["x", "y"], 1.0), "b": _traj("b", ["x"], 1.0), "c": _traj("c", ["x"], 0.5)}
    explored = [_traj("a", ["q"], 0.2), _traj("b", ["x"], 1.0), _traj("c", ["z"], 0.75),
                _traj("d", ["q"], 0.0), _traj("a", ["w"], 0.0, error="env crashed")]
    pairs = trajectory_pairs(explored, experts)
    assert [(c.task_id, c.reward, r.reward) for c, r in pairs] == [("a", 1.0, 0.2), ("c", 0.75, 0.5)]
    assert pairs[1][0] is explored[2] and pairs[1][1] is experts["c"]  # the agent beat a partial expert
    assert trajectory_pairs(explored, experts, min_margin=0.3) == [(experts["a"], explored[0])]


def test_truncate_keeps_whole_turns_and_following_observation():
    t = _traj("a", ["p", "q", "r", "s"], 0.0)
    cut = truncate_steps(t, 2)
    assert [x.text for x in cut.turns][-3:] == ["obs 0", "Thought: step 1\nAction: q", "obs 1"]
    assert cut.num_steps == 2 and cut.metadata["truncated_to_steps"] == 2 and t.num_steps == 4
    assert truncate_steps(t, 4) is t
    pairs = trajectory_pairs([t], {"a": _traj("a", ["x"], 1.0)}, max_rejected_steps=1)
    assert pairs[0][1].num_steps == 1


def test_noisy_detection():
    assert not is_noisy(_traj("a", ["search[red]", "click[b01]", "click[buy now]"], 0))
    assert is_noisy(_traj("a", ["click[x]", "click[x]", "click[x]"], 0))
    assert not is_noisy(_traj("a", ["click[x]", "click[x]", "click[y]", "click[x]"], 0))
    bad = _traj("a", ["search[a]"], 0)
    bad.turns[2] = Turn("assistant", "I think the answer is")
    assert is_noisy(bad)
    junk = _traj("a", ["search[a]"], 0)
    junk.turns[2] = Turn("assistant", "Action: }}}}]]]]%%%%$$$$####@@@@")
    assert is_noisy(junk)


def test_step_prefixes_cut_before_each_action():
    t = _traj("a", ["x", "y", "z"], 1.0)
    prefixes = step_prefixes(t)
    assert [p.step for p in prefixes] == [0, 1, 2]
    assert [len(p.prefix.turns) for p in prefixes] == [2, 4, 6]
    assert prefixes[1].prefix.turns[-1].text == "obs 0" and prefixes[1].expert_turn.text.endswith("Action: y")
    assert all(p.prefix.turns[-1].role == "user" for p in prefixes)


def test_successful_filters_rft_data():
    ts = [_traj("a", ["x"], 1.0), _traj("b", ["x"], 0.9), _traj("c", ["x"], 1.0, error="boom")]
    assert [t.task_id for t in successful(ts)] == ["a"]


# ---- sequence length vs the policy's context ----------------------------------------------------
def _chat(task, instruction, **meta):
    return Trajectory(task_id=task, env_id="e", turns=[Turn("system", "sys"), Turn("user", instruction),
                                                      Turn("assistant", "Action: a"), Turn("user", "obs")],
                      metadata=meta)


def test_too_long_trajectories_are_dropped_with_one_warning_naming_file_line(segmenter, caplog):
    from algorithms.data import encode_trajectories
    from rl_agents.tokenization import encode_trajectory

    short, long = _chat("s", "do it"), _chat("l", "do it " * 20, source_line="experts.jsonl:7")
    assert len(encode_trajectory(short, segmenter)) == 21 and len(encode_trajectory(long, segmenter)) == 60
    with caplog.at_level("WARNING", logger="algorithms.data"):
        data = encode_trajectories([short, long, _chat("t", "do it " * 20)], segmenter, 21)
    assert data == [encode_trajectory(short, segmenter)]
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 3 trajectories are longer than the policy's context (21 tokens) and were dropped: "
        "experts.jsonl:7 (60 tokens), task t (60 tokens)"]
    caplog.clear()
    assert encode_trajectories([short, long], segmenter, 60) == [encode_trajectory(t, segmenter) for t in (short, long)]
    assert encode_trajectories([short, long], segmenter, None) == [encode_trajectory(t, segmenter) for t in (short, long)]
    assert caplog.records == []


def test_every_example_too_long_raises_before_training(segmenter):
    from algorithms.data import encode_trajectories

    with pytest.raises(ValueError) as e:
        encode_trajectories([_chat("s", "do it"), _chat("l", "do it " * 20, source_line="x.jsonl:2")], segmenter, 20,
                            what="expert trajectories")
    assert str(e.value) == ("every one of the 2 expert trajectories is longer than the policy's context (20 tokens): "
                            "task s (21 tokens), x.jsonl:2 (60 tokens); nothing left to train on")
    assert encode_trajectories([], segmenter, 20) == []  # nothing to drop: the caller decides


def test_a_huge_turn_is_dropped_without_tokenizing(segmenter, caplog, monkeypatch):
    import rl_agents.tokenization as tokenization
    from algorithms.data import encode_trajectories, longest_token_chars, min_tokens

    assert longest_token_chars(segmenter.tokenizer) == 81  # SmolLM2's longest entry: a run of 80 spaces after \n
    huge = _chat("h", "x" * 2_000_000, source_line="big.jsonl:3")  # ~500k tokens
    encoded = []
    real = tokenization.encode_trajectory
    monkeypatch.setattr(tokenization, "encode_trajectory", lambda t, seg: encoded.append(t.task_id) or real(t, seg))
    with caplog.at_level("WARNING", logger="algorithms.data"):
        data = encode_trajectories([_chat("s", "do it"), huge], segmenter, 8192)
    assert encoded == ["s"] and len(data) == 1
    assert 2_000_000 // 162 == 12345  # the bound: characters over twice the longest token
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 2 trajectories are longer than the policy's context (8192 tokens) and were dropped: "
        "big.jsonl:3 (at least 12345 tokens)"]
    # Agent turns with stored ids count exactly; other turns never more than their stored ids.
    turns = [Turn("user", "y" * 1620, token_ids=[1] * 4), Turn("assistant", "a", token_ids=[2] * 7), Turn("user", "z" * 1620)]
    assert min_tokens(turns, 81) == 4 + 7 + 10


def test_pairs_and_steps_are_checked_on_their_longest_sequence(segmenter, caplog):
    from algorithms.data import encode_pairs, step_source, within_context
    from rl_agents.tokenization import encode_trajectory

    short, long = _chat("s", "do it"), _chat("s", "do it " * 20, source_line="e.jsonl:4")
    with caplog.at_level("WARNING", logger="algorithms.data"):
        data = encode_pairs([(short, short), (long, short)], segmenter, 40)
    assert data == [(encode_trajectory(short, segmenter), encode_trajectory(short, segmenter))]
    assert caplog.records[0].getMessage() == ("1 of 2 preference pairs are longer than the policy's context (40 tokens) "
                                              "and were dropped: e.jsonl:4 / task s (60 tokens)")
    assert step_source(long, 2) == "e.jsonl:4 step 2" and step_source(short, 0) == "task s step 0"
    seqs = [(encode_trajectory(short, segmenter), encode_trajectory(long, segmenter)),
            (encode_trajectory(short, segmenter),)]
    assert within_context(seqs, ["a", "b"], 21, what="step pairs") == [1]
    assert within_context(seqs, ["a", "b"], 60) == [0, 1] and within_context(seqs, ["a", "b"], None) == [0, 1]


def test_context_length_reads_the_checkpoint_config(tmp_path):
    from algorithms.data import context_length

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert context_length(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024}))
    assert context_length(tmp_path) == 1024
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    assert context_length(tmp_path) == 32768
    assert context_length(tmp_path / "none") is None


# ---- Algorithm.experts() / SFT data building, no Ray --------------------------------------------
def _sft(tmp_path, expert_data):
    from algorithms.imitation import SFTConfig

    cfg = SFTConfig(model="tiny-llama", run_dir=str(tmp_path / "run"))
    cfg.env.expert_data = str(expert_data)
    return cfg.build()


def test_expert_data_without_agent_turns_fails_before_anything_starts(tmp_path, monkeypatch):
    from algorithms.base import Algorithm
    from rl_agents.trajectory import TrajectoryFormatError, write_jsonl

    path = tmp_path / "experts.jsonl"
    write_jsonl(path, [_chat("a", "do it"), Trajectory("b", "e", [Turn("user", "instruction")])])
    algo = _sft(tmp_path, path)
    monkeypatch.setattr(Algorithm, "update", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(Algorithm, "group", lambda *a, **k: pytest.fail("rollout workers started"))
    with pytest.raises(TrajectoryFormatError) as e:
        algo.train()
    assert str(e.value) == f"{path}:2: the trajectory has no agent (assistant) turn"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_expert_data_errors_name_the_true_line(tmp_path):
    from rl_agents.trajectory import TrajectoryFormatError

    path = tmp_path / "experts.jsonl"
    good = json.dumps(_chat("a", "do it").to_dict())
    path.write_text(good + "\n" + good.replace('"task_id": "a", ', "") + "\n")
    with pytest.raises(TrajectoryFormatError) as e:
        _sft(tmp_path, path).experts()
    assert str(e.value) == f"{path}:2: field 'task_id' is missing"
    path.write_text(good + "\n")
    assert {k: t.metadata for k, t in _sft(tmp_path, path).experts().items()} == {"a": {"source_line": f"{path}:1"}}


def test_sft_with_every_expert_over_the_context_raises_before_ray_train(tmp_path, monkeypatch):
    import algorithms.imitation as imitation
    from algorithms.base import Algorithm
    from rl_agents.trajectory import write_jsonl

    path = tmp_path / "experts.jsonl"
    write_jsonl(path, [_chat("a", "do it"), _chat("b", "do it " * 20)])
    algo = _sft(tmp_path, path)
    assert imitation.context_length(algo.policy) == 2048  # the tiny Llama's max_position_embeddings
    monkeypatch.setattr(imitation, "context_length", lambda model: 20)
    monkeypatch.setattr(Algorithm, "update", lambda *a, **k: pytest.fail("Ray Train started"))
    with pytest.raises(ValueError) as e:
        algo.training_step()
    assert str(e.value) == ("every one of the 2 expert trajectories is longer than the policy's context (20 tokens): "
                            f"{path}:1 (21 tokens), {path}:2 (60 tokens); nothing left to train on")


def test_replayed_experts_are_cached_per_env_and_train_tasks(tmp_path):
    """The run dir's experts cache is keyed by what made it: another train_tasks (or env, or env
    arguments) in the same run dir replays again instead of reusing 64 experts of another setting."""
    from algorithms.imitation import SFTConfig

    def experts(**env):
        cfg = SFTConfig(model="tiny-llama", run_dir=str(tmp_path / "run"))
        for k, v in env.items():
            setattr(cfg.env, k, v)
        return cfg.build().experts()

    two, three = experts(train_tasks=2), experts(train_tasks=3)
    assert len(two) == 2 and len(three) == 3 and set(two) < set(three)
    assert len(list((tmp_path / "run").glob("experts-*.jsonl"))) == 2
    again = experts(train_tasks=2)  # read from its own cache
    assert [t.to_dict() for t in again.values()] == [t.to_dict() for t in two.values()]
    assert len(list((tmp_path / "run").glob("experts-*.jsonl"))) == 2
    assert len(experts(train_tasks=2, env_kwargs={"max_turns": 7})) == 2
    assert len(list((tmp_path / "run").glob("experts-*.jsonl"))) == 3
