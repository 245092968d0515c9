"""ALFWorld env on the real games (TextWorld PDDL): contract, splits, experts, robustness, errors."""

from __future__ import annotations

import collections
import json
import logging
import math

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers rl_agents/ALFWorld-v0)
import envs.alfworld as alfworld
from envs.alfworld import ALFWorldEnv, demangle_names, scan_games, strip_location, task_type
from tests.envs.conftest import hostile_actions, rollout

pytestmark = pytest.mark.alfworld

LAMP = "train/look_at_obj_in_light-AlarmClock-None-DeskLamp-301/trial_T20190907_174142_375532"


@pytest.fixture(scope="module")
def env(alfworld_data):
    e = gym.make("rl_agents/ALFWorld-v0", data_dir=alfworld_data).unwrapped
    yield e
    e.close()


def test_missing_data_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("textworld.envs.pddl", reason="textworld[pddl] is not installed")
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="ALFWORLD_DATA"):
        ALFWorldEnv()
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ALFWORLD_DATA=.* has no json_2.1.1/"):
        ALFWorldEnv()
    with pytest.raises(FileNotFoundError, match=r"data_dir=.* has no json_2.1.1/"):
        ALFWorldEnv(data_dir=tmp_path / "nowhere")


def test_interleaved_task_order_is_a_type_balanced_permutation(env, alfworld_data):
    inter = gym.make("rl_agents/ALFWorld-v0", data_dir=alfworld_data, task_order="interleaved").unwrapped
    for split in ("train", "test_seen"):
        assert sorted(inter.list_tasks(split)) == env.list_tasks(split)
    first = inter.list_tasks("train")[:12]
    assert [task_type(t) for t in first[:6]] == sorted(set(map(task_type, env.list_tasks("train"))))
    assert collections.Counter(map(task_type, first)) == {t: 2 for t in map(task_type, first[:6])}
    assert set(first[::6][:2]) == set(env.list_tasks("train")[:2])  # each type keeps its own order
    with pytest.raises(ValueError, match="task_order"):
        ALFWorldEnv(task_order="random", data_dir=alfworld_data)


def test_task_types_keep_only_those_types(env, alfworld_data):
    two = ["pick_and_place_simple", "look_at_obj_in_light"]
    sub = ALFWorldEnv(data_dir=alfworld_data, task_types=two, task_order="interleaved")
    for split in ("train", "test_unseen"):
        tasks = sub.list_tasks(split)
        assert sorted(tasks) == [t for t in env.list_tasks(split) if task_type(t) in two]
        assert {task_type(t) for t in tasks[:2]} == set(two)  # interleaved within the kept types
    assert len(sub.list_tasks("train")) < len(env.list_tasks("train"))
    with pytest.raises(ValueError, match=r"task_types: unknown \['pick_and_place'\]"):
        ALFWorldEnv(data_dir=alfworld_data, task_types=["pick_and_place"])
    with pytest.raises(ValueError, match="non-empty list"):
        ALFWorldEnv(data_dir=alfworld_data, task_types="look_at_obj_in_light")


def test_data_dir_from_the_environment(alfworld_data, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(alfworld_data))
    assert ALFWorldEnv(split="test_seen").data_dir == alfworld_data


def test_splits_and_skipped_games(env, caplog):
    sizes = {s: len(env.list_tasks(s)) for s in env.splits}
    assert sizes == {"train": 600, "test_seen": 140, "test_unseen": 134}  # ETO Table 1: 140 / 134
    assert env.list_tasks("train") == sorted(env.list_tasks("train"))
    assert collections.Counter(map(task_type, env.list_tasks("train"))) == {
        t: 100 for t in ("look_at_obj_in_light", "pick_and_place_simple", "pick_clean_then_place_in_recep",
                         "pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep", "pick_two_obj_and_place")}
    skipped_seen, skipped_unseen = env.skipped_tasks("test_seen"), env.skipped_tasks("test_unseen")
    assert len(skipped_seen) == 47 and set(skipped_seen.values()) == {"game marked unsolvable"}
    assert len(skipped_unseen) == 61 and collections.Counter(skipped_unseen.values())["game marked unsolvable"] == 58
    assert not set(skipped_unseen) & set(env.list_tasks("test_unseen"))
    scan_games.cache_clear()
    with caplog.at_level(logging.INFO, logger="envs.alfworld"):
        env.list_tasks("test_unseen")
    assert "movable-receptacle and sliced-object games are not supported" in caplog.text
    assert "game marked unsolvable" in caplog.text
    assert env.max_turns_for(LAMP) == 40
    long = max(env.list_tasks("train"), key=lambda t: len(env.expert_steps(t)))
    assert env.max_turns_for(long) == len(env.expert_steps(long)) == 102
    with pytest.raises(ValueError, match="not a trial"):
        env.reset(options={"task_id": "train/../../etc"})
    with pytest.raises(LookupError, match="gt_traj.json"):
        env.expert_steps(env.list_tasks("test_seen")[0])
    broken = "valid_seen/look_at_obj_in_light-TennisRacket-None-DeskLamp-324/trial_T20190907_065522_867032"
    assert skipped_seen[broken] == "game marked unsolvable"  # and indeed textworld cannot load it:
    with pytest.raises(RuntimeError, match="does not load: KeyError"):
        env.reset(options={"task_id": broken})
    assert env.reset(options={"task_id": LAMP})[1]["task_id"] == LAMP  # the env is still usable


def test_gymnasium_check_env(env):
    check_env(env, skip_render_check=True)


def test_reset_step_contract(env):
    obs, info = env.reset(options={"task_id": LAMP})
    assert obs.startswith("You are in the middle of a room.") and "Welcome to TextWorld" not in obs
    assert obs.endswith("Your task is to: look at alarmclock under the desklamp.")
    assert info["instruction"] == "look at alarmclock under the desklamp." and info["max_turns"] == 40
    assert "valid_actions" not in info
    obs, r, term, trunc, info = env.step("go to shelf 1")
    # no "You arrive at loc N." prefix
    assert obs == "On the shelf 1, you see nothing." and (r, term, trunc) == (0.0, False, False)
    assert env.step("  go to drawer 1\n")[0] == "The drawer 1 is closed."  # stripped, as ALFWorld does
    for junk in ("Go to shelf 1", "go to shelf 99", "", "take x from y", "open drawer 2"):
        obs, r, term, trunc, info = env.step(junk)
        assert (obs, r, term, trunc, info["score"], info["won"]) == ("Nothing happens.", 0.0, False, False, 0.0, False)
    _, info = env.reset(options={"task_id": LAMP, "valid_actions": True})
    assert "go to shelf 1" in info["valid_actions"] and "inventory" in info["valid_actions"]
    assert "open drawer 1" in env.step("go to drawer 1")[4]["valid_actions"]
    assert "take alarmclock 2 from dresser 1" in env.step("go to dresser 1")[4]["valid_actions"]


def test_turn_budget_truncates(alfworld_data):
    e = ALFWorldEnv(max_turns=3, data_dir=alfworld_data)
    e.reset(options={"task_id": LAMP})
    assert [e.step("look")[2:4] for _ in range(3)] == [(False, False), (False, False), (False, True)]
    e.close()


def test_deterministic(env, alfworld_data, monkeypatch):
    """Two envs, same seed / task / actions: identical transitions, whether the engine's
    caches are cold (first rollout, fresh `_FastEngine`) or warm (second)."""
    monkeypatch.setattr(alfworld, "_memo", None)
    other = ALFWorldEnv(data_dir=alfworld_data)
    actions = hostile_actions(30, ["go to desk 1", "look"], seed=5)[13:] + [s.action for s in env.expert_steps(LAMP)]
    cold = rollout(other, 3, LAMP, actions)
    assert rollout(env, 3, LAMP, actions) == cold and cold[-1][2:] == (True, False, 1.0, True)
    assert rollout(env, 21, None, ["look", "inventory"]) == rollout(other, 21, None, ["look", "inventory"])
    other.close()


def test_fast_engine_matches_plain_textworld(env, alfworld_data):
    """Our stand-ins for textworld's slow pure functions change no text: the plain engine and
    ours agree on every observation and admissible command (expert, random walk, junk)."""
    import random

    import textworld
    from textworld.envs.pddl import PddlEnv

    plain = PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))
    rng = random.Random(0)
    for task in (LAMP, env.list_tasks("train")[330]):  # a bedroom and a kitchen
        plain.load(str(alfworld_data / "json_2.1.1" / task / "game.tw-pddl"))
        demangle_names(plain._entity_infos)
        state = plain.reset()
        _, info = env.reset(options={"task_id": task, "valid_actions": True})
        assert info["valid_actions"] == state["admissible_commands"]
        actions = [s.action for s in env.expert_steps(task)][:-1] + ["look", "go to nowhere", "inventory"]
        for i in range(25):
            a = actions[i] if i < len(actions) else rng.choice(state["admissible_commands"])
            state, _, _ = plain.step(a)
            obs, _, term, trunc, info = env.step(a)
            assert (obs, info["valid_actions"], info["won"]) == (
                strip_location(state.feedback), state["admissible_commands"], bool(state["won"])), (task, i, a)
            if term or trunc:
                break


def test_first_observation_follows_etos_eval_loader(env, alfworld_data):
    """ETO's ALFWorld loader (`eval_agent/tasks/alfworld.py`) shows the agent
    `"\\n".join(obs.split("\\n\\n")[1:])` of the game's first observation: the banner paragraph
    dropped, the rest joined by single newlines. Ours is exactly that, on the plain engine's text."""
    import textworld
    from textworld.envs.pddl import PddlEnv

    plain = PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))
    for task in (LAMP, env.list_tasks("train")[330], env.list_tasks("test_unseen")[7]):
        plain.load(str(alfworld_data / "json_2.1.1" / task / "game.tw-pddl"))
        demangle_names(plain._entity_infos)
        raw = plain.reset().feedback
        assert raw.split("\n\n")[0].strip() == "-= Welcome to TextWorld, ALFRED! =-"
        obs, _ = env.reset(options={"task_id": task})
        assert obs == "\n".join(raw.split("\n\n")[1:]), task


def test_demangling_matches_alfworld():
    class Info:
        def __init__(self, id_):
            self.id, self.name = id_, id_

    ids = ["drawer_bar__minus_00_dot_50", "drawer_bar__plus_01_dot_20", "sink_bar_00_bar_sinkbasin", "agent1",
           "apple_bar__minus_01_dot_20"]
    infos = {i: Info(i) for i in ids}
    demangle_names(infos)
    # ALFWorld numbers instances 1..n and hands them out from the top in sorted-id order
    assert {k: v.name for k, v in infos.items()} == {
        "drawer_bar__minus_00_dot_50": "drawer 2", "drawer_bar__plus_01_dot_20": "drawer 1",
        "sink_bar_00_bar_sinkbasin": "sinkbasin 1", "agent1": "agent1 ", "apple_bar__minus_01_dot_20": "apple 1"}
    assert strip_location("You arrive at loc 12. The drawer 1 is closed.") == "The drawer 1 is closed."
    assert strip_location("You arrive at nothing") == "You arrive at nothing"


def test_hostile_actions_never_raise(alfworld_data):
    """10,000 random/adversarial strings over a few episodes: no exception, outputs in the spaces."""
    vocab = ["go to drawer 1", "open drawer 1", "take", "put", "in/on", "look", "inventory", "use desklamp 1"]
    e = ALFWorldEnv(max_turns=2_500, data_dir=alfworld_data)  # a few long episodes
    tasks = [LAMP] + e.list_tasks("train")[250::310]
    done, episodes = True, 0
    for i, a in enumerate(hostile_actions(10_000, vocab)):
        if done:
            e.reset(options={"task_id": tasks[episodes % 3]})
            episodes += 1
        obs, r, term, trunc, info = e.step(a)
        assert e.observation_space.contains(obs) and math.isfinite(r), (i, a[:40])
        done = term or trunc
    e.close()
    assert episodes >= 4


@pytest.mark.slow
def test_experts_win_and_reproduce_the_recorded_observations(env, alfworld_data):
    """24 train games, 4 of each task type: the recorded expert wins (reward 1.0), and every
    observation equals the one in gt_traj.json (after ALFWorld's "You arrive at loc N." strip)."""
    by_type = collections.defaultdict(list)
    for t in env.list_tasks("train"):
        by_type[task_type(t)].append(t)
    tasks = [ts[i] for ts in by_type.values() for i in (0, 33, 66, 99)]
    assert len(tasks) == 24
    for task in tasks:
        turns = json.loads((alfworld_data / "json_2.1.1" / task / "gt_traj.json").read_text())
        recorded = [strip_location(t["value"]) for t in turns if t["from"] == "human"]
        steps = env.expert_steps(task)
        assert [s.action for s in steps] == [t["value"] for t in turns if t["from"] == "gpt"]
        assert steps[0].thought.startswith("My task is to ") and all(s.thought for s in steps)
        obs, info = env.reset(options={"task_id": task})
        assert obs == "\n".join(recorded[0].split("\n\n")[1:])
        seen, total = [], 0.0
        for s in steps:
            obs, r, term, trunc, info = env.step(s.action)
            seen.append(obs)
            total += r
            if term or trunc:
                break
        assert (total, info["won"], term, info["reward_total"]) == (1.0, True, True, 1.0), task
        assert seen[:len(recorded) - 1] == recorded[1:len(seen) + 1], task


@pytest.mark.parametrize("bad", ["pick\x00and_place", "x" * 5000, "pick\udcff"])
def test_reset_rejects_task_ids_no_game_has(env, bad):
    """ALFWorld maps ids to file paths: a NUL, a huge id or a lone surrogate used to leak
    `embedded null byte` / `File name too long` from the OS; now one message names the problem."""
    from envs.base import TaskIdError

    with pytest.raises(TaskIdError, match=r"^task id '.{1,40}'.* (contains the character|is too long)"):
        env.reset(options={"task_id": bad})


def test_state_key_is_the_exact_state_not_the_text(env):
    """`info["state_key"]` (GiGPO's anchor): the same at every reset of a game, unchanged by commands
    that change nothing ("Nothing happens.", look, inventory), new after a move, different for another
    game; one text ("Nothing happens.") is said in two different states."""
    expert = [s.action for s in env.expert_steps(LAMP)]
    _, info = env.reset(options={"task_id": LAMP})
    start = info["state_key"]
    assert env.reset(options={"task_id": LAMP})[1]["state_key"] == start
    for command in ("jump over the moon", "look", "inventory"):
        assert env.step(command)[4]["state_key"] == start
    obs, _, _, _, info = env.step(expert[0])
    moved = info["state_key"]
    assert moved != start and obs != "Nothing happens."
    nothing = env.step("jump over the moon")
    assert nothing[0] == "Nothing happens." and nothing[4]["state_key"] == moved != start
    keys = [start, moved]
    for action in expert[1:]:
        keys.append(env.step(action)[4]["state_key"])
    assert len(set(keys)) == len(keys)  # the expert never revisits a state
    other = next(t for t in env.list_tasks("train") if t != LAMP)
    assert env.reset(options={"task_id": other})[1]["state_key"] != start
