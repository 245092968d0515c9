"""ETO's and DMPO's data formats, both ways: SFT conversations with the "OK" opening, pair files,
ids as they came, the opening's tokens carrying no loss, `rl-agents data convert`."""

from __future__ import annotations

import json

import pytest

from rl_agents.trajectory import (Trajectory, TrajectoryFormatError, read_pairs, read_trajectories,
                                  write_conversations, write_eto_pairs, write_pairs)

INSTRUCTION = "You are web shopping.\nI will give you instructions about what to do."
TASK = "WebShop [SEP] Instruction: [SEP] i need a red shirt [SEP] Search"


def _eto_sft_record(rid=7):
    return {"id": rid, "game_file": "json_2.1.1/train/x/trial_1",
            "conversations": [{"from": "human", "value": INSTRUCTION}, {"from": "gpt", "value": "OK"},
                              {"from": "human", "value": TASK},
                              {"from": "gpt", "value": "Thought: I search.\nAction: search[red shirt]"},
                              {"from": "human", "value": "Observation: results"},
                              {"from": "gpt", "value": "Thought: buy.\nAction: click[buy now]"}]}


def _eto_pair(rid=12):
    prompt = [{"from": "human", "value": INSTRUCTION}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": TASK}]
    chosen = [{"from": "gpt", "value": "Thought: I search.\nAction: search[red shirt]"},
              {"from": "human", "value": "Observation: results"},
              {"from": "gpt", "value": "Thought: buy.\nAction: click[buy now]"}]
    rejected = [{"from": "gpt", "value": "Thought: hmm.\nAction: search[blue hat]"}]
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_eto_opening_is_prompt_not_an_agent_turn(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([_eto_sft_record()], indent=4))
    [traj] = read_trajectories(path, env_id="rl_agents/TextShop-v0")
    assert [t.role for t in traj.turns] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [t.prompt for t in traj.turns] == [False, True, False, False, False, False]
    assert [t.text for t in traj.agent_turns] == ["Thought: I search.\nAction: search[red shirt]",
                                                  "Thought: buy.\nAction: click[buy now]"]
    assert traj.num_steps == 2 and traj.id == "7" and traj.task_id == "7"
    # the flag survives our own JSONL
    again = Trajectory.from_dict(traj.to_dict())
    assert [t.prompt for t in again.turns] == [t.prompt for t in traj.turns]
    assert "prompt" not in traj.to_dict()["turns"][0] and traj.to_dict()["turns"][1]["prompt"] is True


def test_a_prompt_turn_after_the_first_action_is_refused(tmp_path):
    traj = Trajectory.from_conversation(_eto_sft_record())
    d = traj.to_dict()
    d["turns"][5]["prompt"] = True
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(traj.to_dict()) + "\n" + json.dumps(d) + "\n")
    with pytest.raises(TrajectoryFormatError, match=rf"^{path}:2: field 'turns\[5\].prompt': a prompt turn must come"):
        read_trajectories(path)


def test_an_ok_that_is_not_the_opening_stays_an_agent_turn():
    conv = {"id": "a", "conversations": [{"from": "human", "value": "task"}, {"from": "gpt", "value": "OK"},
                                         {"from": "human", "value": "obs"}, {"from": "gpt", "value": "OK"}]}
    traj = Trajectory.from_conversation(conv)
    assert [t.prompt for t in traj.turns] == [False, True, False, False]  # only the opening's
    plain = {"id": "b", "conversations": [{"from": "human", "value": "task"},
                                          {"from": "gpt", "value": "Action: go"}]}
    assert Trajectory.from_conversation(plain).num_steps == 1


def test_sft_conversations_round_trip_with_ids_and_extra_fields(tmp_path):
    records = [_eto_sft_record(7), {**_eto_sft_record(8), "id": "sciworld_3"}]
    src = tmp_path / "sft.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "back.jsonl"
    write_conversations(out, read_trajectories(src, record_source=False))
    back = [json.loads(line) for line in out.read_text().splitlines()]
    assert [b["id"] for b in back] == [7, "sciworld_3"]  # an int stays an int
    assert [b["conversations"] for b in back] == [r["conversations"] for r in records]
    assert back[0]["game_file"] == records[0]["game_file"]
    # through our own format and back again
    ours = tmp_path / "ours.jsonl"
    from rl_agents.trajectory import write_jsonl
    write_jsonl(ours, read_trajectories(src, record_source=False))
    write_conversations(out, read_trajectories(ours, record_source=False))
    assert [json.loads(line)["conversations"] for line in out.read_text().splitlines()] == \
        [r["conversations"] for r in records]
    assert json.loads(out.read_text().splitlines()[0])["id"] == 7


def test_eto_pairs_import_and_export_round_trip(tmp_path):
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([_eto_pair(12), _eto_pair(13)], indent=4))
    pairs = read_pairs(src, env_id="rl_agents/TextShop-v0")
    chosen, rejected = pairs[0]
    assert [t.text for t in chosen.agent_turns][0].endswith("search[red shirt]") and chosen.num_steps == 2
    assert rejected.num_steps == 1 and rejected.turns[1].prompt and chosen.turns[1].prompt
    assert (chosen.reward, rejected.reward) == (1.0, 0.0) and chosen.env_id == "rl_agents/TextShop-v0"
    assert chosen.metadata["source_line"] == f"{src}:2"
    out = tmp_path / "back.json"
    write_eto_pairs(out, pairs)
    assert json.loads(out.read_text()) == [_eto_pair(12), _eto_pair(13)]
    # ours: JSONL of trajectories, read back to the same pairs
    ours = tmp_path / "ours.jsonl"
    write_pairs(ours, pairs)
    write_eto_pairs(out, read_pairs(ours))
    assert json.loads(out.read_text()) == [_eto_pair(12), _eto_pair(13)]


def test_our_pairs_export_the_turns_before_the_first_action_as_prompt(tmp_path):
    from rl_agents.trajectory import Turn, pair_to_eto

    prompt = [Turn("system", "sys"), Turn("user", "task")]
    chosen = Trajectory("t1", "e", prompt + [Turn("assistant", "a1"), Turn("user", "o1"), Turn("assistant", "a2"),
                                             Turn("user", "done")], reward=1.0)
    rejected = Trajectory("t1", "e", prompt + [Turn("assistant", "b1"), Turn("user", "o2")], reward=0.2)
    rec = pair_to_eto(chosen, rejected)
    assert rec == {"id": "t1", "prompt": [{"from": "system", "value": "sys"}, {"from": "human", "value": "task"}],
                   "chosen": [{"from": "gpt", "value": "a1"}, {"from": "human", "value": "o1"},
                              {"from": "gpt", "value": "a2"}],
                   "rejected": [{"from": "gpt", "value": "b1"}]}
    other = Trajectory("t1", "e", [Turn("user", "another task"), Turn("assistant", "b1")])
    with pytest.raises(ValueError, match="different prompts"):
        pair_to_eto(chosen, other)


@pytest.mark.parametrize("record,needle", [
    ({"id": 1, "prompt": [], "chosen": [{"from": "gpt", "value": "a"}], "rejected": [{"from": "gpt", "value": "b"}]},
     "field 'prompt' must be a non-empty list"),
    ({"id": 1, "prompt": [{"from": "human", "value": "t"}], "chosen": [{"from": "gpt", "value": "a"}],
      "rejected": [{"from": "gpt", "value": "b"}, {"from": "human", "value": "o"}]},
     "field 'rejected' must end with an agent (gpt) turn"),
    ({"id": 1, "prompt": [{"from": "human", "value": "t"}], "chosen": [{"from": "robot", "value": "a"}],
      "rejected": [{"from": "gpt", "value": "b"}]},
     "field 'chosen[0].from' must be one of"),
    ({"id": 1, "chosen": [{"from": "gpt", "value": "a"}], "rejected": [{"from": "gpt", "value": "b"}],
      "prompt": [{"from": "human", "value": 3}]},
     "field 'prompt[0].value' must be a string"),
])
def test_malformed_pair_files_name_file_line_and_field(tmp_path, record, needle):
    good = _eto_pair(1)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(TrajectoryFormatError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: ") and needle in str(e.value)


def test_eto_opening_tokens_carry_no_loss_and_dmpo_turn_zero_is_the_first_action(tokenizer, segmenter):
    from rl_agents.tokenization import encode_trajectory

    traj = Trajectory.from_conversation(_eto_sft_record())
    enc = encode_trajectory(traj, segmenter)
    messages = [{"role": t.role, "content": t.text} for t in traj.turns]
    # the exact ids of the chat template's rendering: the "OK" is an assistant message in the prompt
    assert enc.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)[:len(enc.input_ids)]
    ok = tokenizer.encode("OK", add_special_tokens=False)
    agent = [i for i, m in zip(enc.input_ids, enc.action_mask) if m]
    first = tokenizer.encode("Thought: I search.\nAction: search[red shirt]", add_special_tokens=False)
    second = tokenizer.encode("Thought: buy.\nAction: click[buy now]", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert agent == first + [im_end] + second + [im_end]  # the "OK" is not among them
    assert ok[0] in enc.input_ids and enc.num_turns == 2
    assert [t for t in enc.turn_index if t >= 0] == [0] * (len(first) + 1) + [1] * (len(second) + 1)
    # end-of-turn marks: exactly the two <|im_end|> that close the agent turns
    marked = [k for k, e in enumerate(enc.end_of_turn) if e]
    assert [enc.input_ids[k] for k in marked] == [im_end, im_end]
    assert all(enc.action_mask[k] for k in marked)
    assert enc.input_ids.count(im_end) > 2  # the prompt's <|im_end|>s (the "OK"'s included) are not marked


def test_data_convert_cli_round_trips_eto_pairs(tmp_path, capsys):
    from algorithms.cli import main

    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([_eto_pair(3)], indent=4))
    assert main(["data", "convert", str(src), str(tmp_path / "ours.jsonl"), "--to", "rl_agents"]) == 0
    assert main(["data", "convert", str(tmp_path / "ours.jsonl"), str(tmp_path / "eto.json"), "--to",
                 "conversation"]) == 0
    assert json.loads((tmp_path / "eto.json").read_text()) == [_eto_pair(3)]
    assert "wrote 1 preference pairs" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([_eto_pair(3), {"id": 4, "prompt": [{"from": "human", "value": "t"}],
                                              "chosen": [{"from": "gpt", "value": "a"}]}], indent=4))
    assert main(["data", "convert", str(bad), str(tmp_path / "x.jsonl"), "--to", "rl_agents"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "field 'rejected' is missing" in err and not (tmp_path / "x.jsonl").exists()
    # a pair whose sides start from different prompts cannot be written in ETO's format: named, nothing written
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    ours[0]["rejected"]["turns"][2]["text"] = "another task"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(ours[0]) + "\n")
    assert main(["data", "convert", str(mixed), str(tmp_path / "y.json"), "--to", "conversation"]) == 2
    err = capsys.readouterr().err
    assert f"{mixed}:1: pair 3: chosen and rejected start from different prompts" in err
    assert not (tmp_path / "y.json").exists()


def test_a_pair_file_missing_one_side_names_that_field(tmp_path):
    ours = tmp_path / "ours.jsonl"
    write_pairs(ours, read_pairs(_write_eto(tmp_path)))
    record = json.loads(ours.read_text().splitlines()[0])
    del record["rejected"]
    ours.write_text(ours.read_text() + json.dumps(record) + "\n")
    with pytest.raises(TrajectoryFormatError, match=rf"^{ours}:2: field 'rejected' is missing"):
        read_pairs(ours)
    eto = json.loads(_write_eto(tmp_path).read_text())
    eto[0]["chosen_x"] = eto[0].pop("chosen")
    (tmp_path / "renamed.json").write_text(json.dumps(eto, indent=4))
    with pytest.raises(TrajectoryFormatError, match="field 'chosen' is missing"):
        read_pairs(tmp_path / "renamed.json")


def _write_eto(tmp_path):
    path = tmp_path / "eto_pairs.json"
    path.write_text(json.dumps([_eto_pair(1)], indent=4))
    return path
