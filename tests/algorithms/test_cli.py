import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import examples.guess_number_env  # noqa: F401  (registers examples/GuessNumber-v0)
from algorithms.cli import build_parser, cmd_env_play, main
from rl_agents.trajectory import read_conversations, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_env_list_from_a_fresh_process_shows_the_three_envs():
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / "rl-agents"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "algorithms.cli"]
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
    out = subprocess.run([sys.executable, "-m", "algorithms.cli", "data", "experts",
                          "examples.guess_number_env:examples/GuessNumber-v0", "--limit", "5", "--out",
                          str(tmp_path / "e.jsonl")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "5/5 reach reward 1.0" in out.stdout


def test_train_takes_overrides_before_and_after_its_flag(monkeypatch):
    """`rl-agents train CONFIG --no-start-eval k=v` and `... k=v --no-start-eval` mean the same;
    a stray non-override argument is still an error."""
    import algorithms.cli as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append((args.overrides, args.no_start_eval)) or 0)
    assert cli.main(["train", "c.yaml", "a=1", "--no-start-eval", "b.c=2"]) == 0
    assert cli.main(["train", "c.yaml", "--no-start-eval", "a=1", "b.c=2"]) == 0
    assert cli.main(["train", "c.yaml", "a=1", "b.c=2"]) == 0
    assert seen == [(["a=1", "b.c=2"], True), (["a=1", "b.c=2"], True), (["a=1", "b.c=2"], False)]
    with pytest.raises(SystemExit):
        cli.main(["train", "c.yaml", "--no-start-eval", "a=1", "stray"])


def test_data_convert_missing_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(tmp_path / "nope.jsonl"), str(out), "--to", "conversation"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_data_convert_non_utf8_input_exits_2_and_writes_nothing(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": "x"}]})
    inp.write_bytes(good.encode() + b"\n" + good.replace('"x"', '"caf\xe9"').encode("latin-1") + b"\n")
    assert main(["data", "convert", str(inp), str(out), "--to", "conversation"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {inp}:2: not valid UTF-8 (byte 0xe9 at column 72)"]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_data_convert_rl_agents_error_names_its_line_not_the_conversation_reader(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = {"task_id": "a", "env_id": "e", "turns": [{"role": "user", "text": "x"}]}
    inp.write_text(json.dumps(good) + "\n" + json.dumps({**good, "reward": "1"}) + "\n")
    assert main(["data", "convert", str(inp), str(out), "--to", "conversation"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {inp}:2: field 'reward' must be a number, got '1'"]
    assert not out.exists()


# ---- `rl-agents train`: errors before any work (exit 2, one line, nothing written) ---------------
SFT_YAML = ROOT / "examples" / "sft_textshop.yaml"
_NO_AGENT = json.dumps({"task_id": "train-00001", "env_id": "rl_agents/TextShop-v0",
                        "turns": [{"role": "user", "text": "hi"}]})
_NUL_ID = json.dumps({"task_id": "train\u00001", "env_id": "rl_agents/TextShop-v0",
                      "turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "Action: search[x]"}]})


def _train_error(capsys, args) -> str:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("override, message", [
    ("train.loss.beta=0.3", "unknown key train.loss"),  # β has one home: the algorithm's `loss`
    ("env.train_tasks=-1", "env.train_tasks: must be >= 1 or null (null = all), got -1"),
    ("env.eval_tasks=0", "env.eval_tasks: must be >= 1 or null (null = all), got 0"),
    ("iterations=-3", "iterations: must be >= 1, got -3"),
    ("evaluate_every=-1", "evaluate_every: must be >= 0 (0 = only at the end), got -1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens: must be >= 1, got 0"),
    ("rollout.envs_per_worker=0", "rollout.envs_per_worker: must be >= 1, got 0"),
    ("rollout.max_context=-1", "rollout.max_context: must be > rollout.max_new_tokens (64), got -1"),
    ("rollout.top_p=5", "rollout.top_p: must be in (0, 1], got 5.0"),
    ("run_dir=", "run_dir: must be a directory path, got ''"),
    ("train.optim.lr=-1", "train.optim.lr: must be a finite number > 0, got -1.0"),
    ("train.num_workers=0", "train.num_workers: must be > 0, got 0"),
    ("model=/no/such/model", "model: unknown model '/no/such/model': not an alias"),
    ("env.env_id=rl_agents/Nope-v0", "env.env_id: unknown env 'rl_agents/Nope-v0'; registered rl_agents envs: "),
    ("env.eval_splits=[test_seen,dev]", "env.eval_splits: ['dev'] is not a split of rl_agents/TextShop-v0 "
                                        "(its splits: train, test_seen, test_unseen)"),
])
def test_train_rejects_bad_values_before_any_work(capsys, tmp_path, override, message):
    """Each bad value: exit 2, one line naming the user's full dotted key, and no run dir made."""
    run_dir = tmp_path / "run"
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={run_dir}", override])
    assert line.startswith(f"config error: {message}"), line
    assert not run_dir.exists()


def test_eto_rejects_a_negative_rejected_step_cap(capsys, tmp_path):
    line = _train_error(capsys, [str(ROOT / "examples" / "eto_textshop.yaml"), f"run_dir={tmp_path / 'r'}",
                                 "max_rejected_steps=-5", "loss.beta=.inf"])
    assert line == "config error: loss.beta: must be a finite number > 0, got inf"
    line = _train_error(capsys, [str(ROOT / "examples" / "eto_textshop.yaml"), f"run_dir={tmp_path / 'r'}",
                                 "max_rejected_steps=-5"])
    assert line == "config error: max_rejected_steps: must be >= 1 or null (no cap), got -5"


@pytest.mark.parametrize("content, message", [
    (None, "{path}: no such config file"),
    (b"algo: sft\nmodel: caf\xe9\n", "{path}:2: not valid UTF-8 (byte 0xe9 at column 11)"),
    (b"", "{path}: the config file is empty (expected a mapping such as `algo: sft`)"),
    (b"# only a comment\n", "{path}: the config file is empty (expected a mapping such as `algo: sft`)"),
    (b"- sft\n", "{path}: the top level must be a mapping, got list"),
])
def test_train_rejects_unreadable_config_files(capsys, tmp_path, content, message):
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_bytes(content)
    line = _train_error(capsys, [str(path), f"run_dir={tmp_path / 'run'}"])
    assert line == "config error: " + message.format(path=path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (_NO_AGENT + "\n", "{path}:1: the trajectory has no agent (assistant) turn"),
    ("", "{path}: no trajectories (the file is empty)"),
    (None, "{path}: no such file"),
    (_NUL_ID + "\n", "{path}:1: field 'task_id': task id 'train\\x001' contains the character '\\x00', "
                     "which no task id has"),
])
def test_train_rejects_bad_expert_data_before_any_work(capsys, tmp_path, content, message):
    data = tmp_path / "experts.jsonl"
    if content is not None:
        data.write_text(content)
    run_dir = tmp_path / "run"
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={run_dir}", f"env.expert_data={data}"])
    assert line == "error: " + message.format(path=data)
    assert not run_dir.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory the process cannot write: a read-only tmpfs mount when we are root (root ignores
    file modes), else a mode-0555 directory."""
    path = tmp_path / "ro"
    path.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("root without permission to mount a read-only tmpfs")
    else:
        path.chmod(0o555)
    yield path
    if mounted:
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_train_rejects_a_read_only_run_dir(capsys, read_only_dir):
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={read_only_dir / 'run'}"])
    assert line.startswith(f"config error: run_dir: cannot write {read_only_dir / 'run'}: "), line
    assert any(s in line for s in ("Read-only file system", "Permission denied")), line
    assert list(read_only_dir.iterdir()) == []


def test_train_rejects_an_object_store_it_cannot_write_before_any_work(capsys, tmp_path, s3_server):
    bad = s3_server("cli").replace("s3://rl-agents/", "s3://no-such-bucket/")
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={tmp_path / 'run'}", f"train.storage_path={bad}",
                                 "model=tiny-llama"])
    assert line.startswith(f"config error: train.storage_path: {bad}: cannot write, read and delete an object there"), line
    assert not (tmp_path / "run").exists()
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={tmp_path / 'run'}", "train.storage_path=s3://AK:sk@b/r"])
    assert line.startswith("config error: train.storage_path: s3://...@...: no credentials in the URI"), line


def test_env_play_rejects_a_task_id_with_a_nul(capsys):
    assert main(["env", "play", "rl_agents/TextShop-v0", "--task", "train\x0000001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: task id 'train\\x0000001' contains the character '\\x00', which no task id has"]


def test_train_refuses_a_run_dir_holding_another_config(capsys, tmp_path):
    """Resuming is by config: a run dir made by another config is refused in one line, untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("algo: sft\nmodel: tiny-llama\n")
    line = _train_error(capsys, [str(SFT_YAML), f"run_dir={run_dir}"])
    assert line.startswith(f"config error: run_dir: {run_dir} holds a run with another config (differs at "), line
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "error: --workers: must be >= 1, got 0"),
    (["--envs-per-worker", "0"], "error: --envs-per-worker: must be >= 1, got 0"),
    (["--max-new-tokens", "4096"], "error: --max-new-tokens: must be < the episodes' context (2048 tokens), got 4096"),
])
def test_eval_and_explore_name_the_flag_of_a_bad_value(capsys, tmp_path, flags, message):
    for cmd in (["eval"], ["explore", "--out", str(tmp_path / "x.jsonl")]):
        assert main([*cmd, "--model", "tiny-llama", "--env", "rl_agents/TextShop-v0", *flags]) == 2
        assert capsys.readouterr().err.strip() == message
