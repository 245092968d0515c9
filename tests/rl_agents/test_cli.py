import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import examples.guess_number_env  # noqa: F401  (registers examples/GuessNumber-v0)
from rl_agents.cli import build_parser, cmd_env_play, main
from rl_agents.trajectory import read_conversations, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_env_list_from_a_fresh_process_shows_the_three_envs():
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / "rl-agents"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rl_agents.cli"]
    out = subprocess.run(cmd + ["env", "list"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for env_id in ("rl_agents/TextShop-v0", "rl_agents/ScienceWorld-v0", "rl_agents/ALFWorld-v0"):
        assert env_id in out


def test_data_experts_writes_replayed_trajectories(tmp_path, capsys):
    out = tmp_path / "experts.jsonl"
    assert main(["data", "experts", "examples/GuessNumber-v0", "--split", "train", "--limit", "12", "--out", str(out)]) == 0
    trajs = read_jsonl(out)
    assert len(trajs) == 12 and all(t.reward == 1.0 and t.success for t in trajs)
    t = trajs[0]  # task train-1: binary search 50, 25, 12, 6, 3, 1
    assert t.task_id == "train-1" and [x.role for x in t.turns[:3]] == ["system", "user", "assistant"]
    assert [x.text.split("Action: ")[1] for x in t.agent_turns] == ["guess[50]", "guess[25]", "guess[12]", "guess[6]",
                                                                    "guess[3]", "guess[1]"]
    assert [x.reward for x in t.agent_turns] == [0, 0, 0, 0, 0, 1.0]
    assert "12/12 reach reward 1.0" in capsys.readouterr().out


def test_data_experts_conversation_format_and_convert(tmp_path):
    conv = tmp_path / "conv.jsonl"
    assert main(["data", "experts", "examples/GuessNumber-v0", "--limit", "3", "--out", str(conv),
                 "--format", "conversation"]) == 0
    assert json.loads(conv.read_text().splitlines()[0])["conversations"][1]["from"] == "human"
    back = tmp_path / "back.jsonl"
    assert main(["data", "convert", str(conv), str(back), "--to", "rl_agents", "--env-id", "examples/GuessNumber-v0"]) == 0
    assert [t.messages() for t in read_jsonl(back)] == [t.messages() for t in read_conversations(conv)]


def test_env_play_scripted_session(capsys):
    answers = iter([":expert", "guess[50]", "nonsense", ":expert", "guess[75]", ":quit"])
    args = build_parser().parse_args(["env", "play", "examples/GuessNumber-v0", "--task", "train-75"])
    assert cmd_env_play(args, input_fn=lambda _: next(answers)) == 0
    out = capsys.readouterr().out
    assert "expert next: guess[50]" in out and "the number is higher" in out
    assert "Invalid action" in out and "expert: no suggestion" in out
    assert "75 is right!" in out and "final reward 1.000, won" in out


def test_unknown_env_is_a_clear_error(tmp_path):
    try:
        main(["data", "experts", "rl_agents/Nope-v0", "--out", str(tmp_path / "x.jsonl")])
    except SystemExit as e:
        assert "unknown env 'rl_agents/Nope-v0'" in str(e) and "rl_agents/TextShop-v0" in str(e)
    else:
        raise AssertionError("expected SystemExit")


def test_env_check_command(capsys):
    assert main(["env", "check", "examples/GuessNumber-v0", "--actions", "300", "--experts", "4"]) == 0
    assert "result                  PASS" in capsys.readouterr().out


def test_module_prefixed_env_id_from_a_fresh_process(tmp_path):
    """docs/new_env.md: `rl-agents env check module:EnvId` imports the user's module."""
    out = subprocess.run([sys.executable, "-m", "rl_agents.cli", "data", "experts",
                          "examples.guess_number_env:examples/GuessNumber-v0", "--limit", "5", "--out",
                          str(tmp_path / "e.jsonl")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "5/5 reach reward 1.0" in out.stdout


def test_train_takes_overrides_before_and_after_its_flag(monkeypatch):
    """`rl-agents train CONFIG --no-start-eval k=v` and `... k=v --no-start-eval` mean the same;
    a stray non-override argument is still an error."""
    import rl_agents.cli as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append((args.overrides, args.no_start_eval)) or 0)
    assert cli.main(["train", "c.yaml", "a=1", "--no-start-eval", "b.c=2"]) == 0
    assert cli.main(["train", "c.yaml", "--no-start-eval", "a=1", "b.c=2"]) == 0
    assert cli.main(["train", "c.yaml", "a=1", "b.c=2"]) == 0
    assert seen == [(["a=1", "b.c=2"], True), (["a=1", "b.c=2"], True), (["a=1", "b.c=2"], False)]
    with pytest.raises(SystemExit):
        cli.main(["train", "c.yaml", "--no-start-eval", "a=1", "stray"])
