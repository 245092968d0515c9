import json

import pytest

from rl_agents.trajectory import (Trajectory, TrajectoryFormatError, Turn, read_conversations, read_jsonl,
                                  read_trajectories, require_agent_turns, source_of, write_conversations, write_jsonl)


def _traj(**kw):
    turns = [Turn("system", "sys"), Turn("user", "obs0"),
             Turn("assistant", "Thought: t\nAction: a", reward=0.25, token_ids=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3]),
             Turn("user", "obs1")]
    return Trajectory(task_id="t1", env_id="rl_agents/TextShop-v0", turns=turns, reward=0.25, success=False,
                      id="x", metadata={"seed": 3}, **kw)


def test_jsonl_round_trip_keeps_token_ids_and_logprobs(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [_traj(), _traj()])
    back = read_jsonl(path)
    assert back == [_traj(), _traj()]
    assert back[0].agent_turns[0].token_ids == [5, 6, 7] and back[0].num_steps == 1
    assert "token_ids" not in json.loads(path.read_text().splitlines()[0])["turns"][0]  # text-only turns stay small


def test_conversation_round_trip(tmp_path):
    path = tmp_path / "c.jsonl"
    write_conversations(path, [_traj()])
    rec = json.loads(path.read_text())
    assert [c["from"] for c in rec["conversations"]] == ["system", "human", "gpt", "human"]
    back = read_conversations(path)[0]
    assert back.messages() == _traj().messages() and back.task_id == "t1" and back.reward == 0.25


def test_reads_eto_fastchat_list_and_role_content(tmp_path):
    eto = [{"id": "webshop_12", "conversations": [{"from": "human", "value": "Instruction"},
                                                  {"from": "gpt", "value": "Thought: x\nAction: search[a]"}]}]
    (tmp_path / "eto.json").write_text(json.dumps(eto))
    t = read_conversations(tmp_path / "eto.json", env_id="webshop")[0]
    assert [x.role for x in t.turns] == ["user", "assistant"] and t.env_id == "webshop" and t.task_id == "webshop_12"
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert read_conversations(tmp_path / "m.jsonl")[0].turns == [Turn("user", "hi")]


@pytest.mark.parametrize("line,needle", [
    ('{"task_id": "a", "env_id": "e"}', "field 'turns' is missing"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"role": "bot", "text": "x"}]}', "field 'turns[0].role'"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": 3}]}', "field 'turns[0].text'"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": "x", "token_ids": [1, "2"]}]}',
     "field 'turns[0].token_ids'"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": "x", "token_ids": [1], "logprobs": [0.1, 0.2]}]}',
     "field 'turns[0].logprobs'"),
    ('{"task_id": "a", "env_id": "e", "turns": [], "reward": "high"}', "field 'reward'"),
    ('{"task_id": "a", "env_id": "e", "turns": [], "extra": 1}', "unknown field"),
    ('{"task_id": "a", "env_id": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_traj().to_dict())
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(TrajectoryFormatError) as e:
        read_jsonl(path)
    assert f"{path}:3:" in str(e.value) and needle in str(e.value)


def test_malformed_conversation_names_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(TrajectoryFormatError, match=r"c.jsonl:1: field 'conversations\[0\].from'"):
        read_conversations(path)


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [_traj()])
    before = path.read_text()

    def bad():
        yield _traj()
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, bad())
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


# ---- read_trajectories: one format per file, the true line and field ------------------------------
def _good_line():
    return json.dumps(_traj().to_dict())


def _error(path, **kw) -> str:
    with pytest.raises(TrajectoryFormatError) as e:
        read_trajectories(path, **kw)
    assert "\n" not in str(e.value)  # one line
    return str(e.value)


def test_read_trajectories_reads_both_formats_and_records_the_line(tmp_path):
    rl = tmp_path / "t.jsonl"
    rl.write_text(_good_line() + "\n\n" + _good_line() + "\n")
    back = read_trajectories(rl)
    assert [t.metadata for t in back] == [{"seed": 3, "source_line": f"{rl}:1"}, {"seed": 3, "source_line": f"{rl}:3"}]
    assert [t.turns for t in back] == [_traj().turns] * 2 and source_of(back[1]) == f"{rl}:3"
    assert read_trajectories(rl, record_source=False) == [_traj(), _traj()]
    conv = tmp_path / "c.jsonl"
    write_conversations(conv, [_traj(), _traj()])
    assert [t.metadata["source_line"] for t in read_trajectories(conv)] == [f"{conv}:1", f"{conv}:2"]
    eto = [{"id": f"w{i}", "conversations": [{"from": "human", "value": "I"}, {"from": "gpt", "value": "A"}]}
           for i in range(2)]
    lst = tmp_path / "eto.json"
    lst.write_text("\n" + json.dumps(eto, indent=1))
    back = read_trajectories(lst, env_id="webshop")
    assert [(t.task_id, t.env_id, t.metadata["source_line"]) for t in back] == [("w0", "webshop", f"{lst}:3"),
                                                                               ("w1", "webshop", f"{lst}:16")]
    assert source_of(_traj()) == "task t1"


@pytest.mark.parametrize("bad,message", [
    ('{"task_id": "a", "env_id": ', "invalid JSON (Expecting value at column 28)"),  # truncated line
    ('{"env_id": "e", "turns": []}', "field 'task_id' is missing"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": ["x"]}]}',
     "field 'turns[0].text' must be a string"),
    ('{"task_id": "a", "env_id": "e", "turns": [], "reward": "0.5"}', "field 'reward' must be a number, got '0.5'"),
    ('{"task_id": "a", "env_id": "e", "turns": [{"text": "x"}]}',
     "field 'turns[0].role' must be one of ['system', 'user', 'assistant'], got None"),
])
def test_rl_agents_file_errors_name_the_true_line_not_the_conversation_reader(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(_good_line() + "\n" + _good_line() + "\n" + bad + "\n" + _good_line() + "\n")
    assert _error(path) == f"{path}:3: {message}"


def test_missing_task_id_on_line_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    rec = _traj().to_dict()
    del rec["task_id"]
    path.write_text(_good_line() + "\n" + json.dumps(rec) + "\n")
    assert _error(path) == f"{path}:2: field 'task_id' is missing"


def test_truncated_last_line_names_it(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(_good_line() + "\n" + _good_line() + "\n" + _good_line()[:40])
    assert _error(path) == f"{path}:3: invalid JSON (Unterminated string starting at column 29)"  # the quote of "rl_agents/T


def test_conversation_file_errors_still_name_their_line(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "x"}]})
    path.write_text(good + "\n" + json.dumps({"id": "b", "conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    assert _error(path) == (f"{path}:2: field 'conversations[0].from' must be one of "
                            "['assistant', 'gpt', 'human', 'system', 'user'], got 'robot'")
    path.write_text(good + "\n" + '{"id": "b", "messages": [{"role": "user", "content": 7}]}\n')
    assert _error(path) == f"{path}:2: field 'messages[0].content' must be a string"
    lst = tmp_path / "eto.json"
    lst.write_text('[\n' + good + ',\n{"id": "b", "conversations": []}\n]\n')
    assert _error(lst) == f"{lst}:3: record 1: field 'conversations' must be a non-empty list"
    lst.write_text('[\n' + good + ',\n' + good[:30] + "\n")
    assert _error(lst) == f"{lst}:4: invalid JSON (Expecting value at column 1)"  # the cut record's value: at the end
    lst.write_text('[' + good + ']\n]\n')
    assert _error(lst) == f"{lst}:2: invalid JSON (Extra data at column 1)"


def test_non_utf8_empty_missing_and_unknown_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_good_line().encode() + b'\n{"task_id": "caf\xe9"}\n')
    assert _error(path) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 17)"
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text)
        assert _error(tmp_path / name) == f"{tmp_path / name}: no trajectories (the file is empty)"
    (tmp_path / "empty.json").write_text("[ ]\n")
    assert _error(tmp_path / "empty.json") == f"{tmp_path / 'empty.json'}: no trajectories (the list is empty)"
    assert _error(tmp_path / "missing.jsonl") == f"{tmp_path / 'missing.jsonl'}: no such file"
    other = tmp_path / "other.jsonl"
    other.write_text('\n{"prompt": "x", "completion": "y"}\n')
    assert _error(other) == (f"{other}:2: not a trajectory of either format: no field 'turns' (rl_agents) "
                             "and no field 'conversations' or 'messages' (ETO/FastChat conversation)")
    other.write_text("3\n")
    assert _error(other) == f"{other}:1: expected a JSON object, got int"


def test_single_format_readers_give_the_same_file_errors(tmp_path):
    with pytest.raises(TrajectoryFormatError, match=r"^.*missing.jsonl: no such file$"):
        read_jsonl(tmp_path / "missing.jsonl")
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "conversations": [{"from": "human", "value": "\xff"}]}\n')
    with pytest.raises(TrajectoryFormatError) as e:
        read_conversations(path)
    assert str(e.value) == f"{path}:1: not valid UTF-8 (byte 0xff at column 59)"


def test_crlf_and_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_good_line() + "\r\n" + _good_line() + "\r\n").encode())
    assert read_trajectories(path, record_source=False) == [_traj(), _traj()]
    path.write_bytes((_good_line() + "\r\n" + '{"task_id": 1,\r\n').encode())
    assert _error(path) == f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 15)"


def test_require_agent_turns_names_the_line(tmp_path):
    path = tmp_path / "e.jsonl"
    no_agent = Trajectory("t2", "e", [Turn("user", "instruction")])
    write_jsonl(path, [_traj(), no_agent, _traj(), no_agent])
    trajs = read_trajectories(path)
    with pytest.raises(TrajectoryFormatError) as e:
        require_agent_turns(trajs, path)
    assert str(e.value) == f"{path}:2: the trajectory has no agent (assistant) turn (and 1 more of the 4 trajectories)"
    assert require_agent_turns(trajs[:1], path) == trajs[:1]
    with pytest.raises(TrajectoryFormatError) as e:
        require_agent_turns([no_agent], path)
    assert str(e.value) == f"{path}: task t2: the trajectory has no agent (assistant) turn"
