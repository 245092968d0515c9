"""TextShop: Gymnasium contract, grammar, robustness, WebShop reward, splits, expert, speed."""

import hashlib
import itertools
import math
import os
import random
import subprocess
import sys
import time

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers rl_agents/TextShop-v0)
from envs.checker import adversarial_actions
from envs.textshop import PAGE_SIZE, Product, Task, TextShopEnv, _Shop, _words, fits, looks_right, reward, shop

ENV_ID = "rl_agents/TextShop-v0"


@pytest.fixture
def env() -> TextShopEnv:
    return gym.make(ENV_ID).unwrapped


def play(env, task_id, actions):
    """Reset on `task_id`, play `actions`; the list of (obs, reward, terminated, truncated, info)."""
    obs, info = env.reset(options={"task_id": task_id})
    out = [(obs, 0.0, False, False, info)]
    for a in actions:
        out.append(env.step(a))
        if out[-1][2] or out[-1][3]:
            break
    return out


def test_gymnasium_check_env_passes():
    check_env(gym.make(ENV_ID).unwrapped)


def test_split_sizes_ids_and_no_shared_instruction(env):
    sizes = {s: len(env.list_tasks(s)) for s in env.splits}
    assert sizes == {"train": 1500, "test_seen": 200, "test_unseen": 200}
    assert env.list_tasks("train")[42] == "train-00042"
    instructions = {}
    for split in env.splits:
        ids = env.list_tasks(split)
        assert len(set(ids)) == len(ids) and all(t == f"{split}-{i:05d}" for i, t in enumerate(ids))
        for t in ids:
            assert instructions.setdefault(env.task(t).instruction, t) == t, "an instruction in two tasks"
    with pytest.raises(ValueError, match="unknown TextShop task"):
        env.reset(options={"task_id": "train-99999"})


def test_unseen_attribute_combinations_never_occur_in_training(env):
    """test_unseen = tasks asking for a held-out (type, attribute pair); train/test_seen never do."""
    held = {(ptype, pair) for ptype, pairs in shop().held_out.items() for pair in pairs}

    def pairs(t):
        return {(t.ptype, p) for p in itertools.combinations(t.attrs, 2)}

    tasks = {s: [env.task(t) for t in env.list_tasks(s)] for s in env.splits}
    assert all(pairs(t) & held for t in tasks["test_unseen"])
    assert not any(pairs(t) & held for t in tasks["train"] + tasks["test_seen"])
    train_combos = {(t.ptype, t.attrs) for t in tasks["train"]}
    assert not train_combos & {(t.ptype, t.attrs) for t in tasks["test_unseen"]}
    # ... and only the combination is new: every type and attribute asked for is trained on.
    assert {(t.ptype, a) for t in tasks["test_unseen"] for a in t.attrs} <= \
        {(t.ptype, a) for t in tasks["train"] for a in t.attrs}


def test_expert_reaches_full_reward_on_every_task_of_every_split(env):
    for split in env.splits:
        for task_id in env.list_tasks(split):
            steps = env.expert_steps(task_id)
            assert len(steps) <= env.default_max_turns and all(s.thought and s.action for s in steps)
            out = play(env, task_id, [s.action for s in steps])
            obs, r, term, trunc, info = out[-1]
            assert (term, trunc, info["won"], info["reward_total"], r) == (True, False, True, 1.0, 1.0), task_id
            assert len(out) == len(steps) + 1
            assert not any(o.startswith("Invalid action") for o, *_ in out), task_id


def test_expert_decides_from_what_the_page_shows():
    """The first result whose title and price fit is always a full fit (options included), so
    the expert's choice is learnable from observations; and the catalog has look-alikes on purpose."""
    s, traps = shop(), 0
    tasks = [t for ts in s.tasks.values() for t in ts]
    for t in tasks:
        results = s.search(_words(t.query))
        i = next(i for i, p in enumerate(results) if looks_right(t, p))
        assert fits(t, results[i]), t.task_id
        traps += any(p.ptype == t.ptype and set(t.attrs) <= set(p.attrs) for p in results[:i])
    assert traps / len(tasks) > 0.2  # an over-budget look-alike is ranked above the right product
    assert any(sum(st.action == "click[Next >]" for st in TextShopEnv().expert_steps(t.task_id)) for t in tasks)


def test_reward_function_hand_computed():
    """WebShop's r = r_type * (|U_att & Y_att| + |U_opt & Y_opt| + 1[price <= cap]) / (|U_att| + |U_opt| + 1).

    Task: cotton v-neck t-shirt, color red, size large, under $30 (denominator 2 + 2 + 1 = 5).
    * right shirt, red + large, $23.50                 -> 1 * (2 + 2 + 1) / 5 = 1.0 (won)
    * right shirt, blue + large                        -> 1 * (2 + 1 + 1) / 5 = 0.8
    * right shirt, red + large, $31.49 (over budget)   -> 1 * (2 + 2 + 0) / 5 = 0.8
    * cotton-only shirt, nothing selected              -> 1 * (1 + 0 + 1) / 5 = 0.4
    * cotton hoodie (same category), red + large, $25  -> 0.1 * (1 + 2 + 1) / 5 = 0.08
    * running shoe (other category)                    -> 0
    """
    task = Task("t", "clothing", "t-shirt", ("cotton", "v-neck"), (("color", "red"), ("size", "large")), 30, "x")
    opts = (("color", ("red", "blue")), ("size", ("large",)))
    shirt = Product("p1", "clothing", "t-shirt", "Nova", ("cotton", "slim-fit", "v-neck"), opts, 2350, 0)
    pricey = Product("p2", "clothing", "t-shirt", "Nova", ("cotton", "slim-fit", "v-neck"), opts, 3149, 0)
    plain = Product("p3", "clothing", "t-shirt", "Nova", ("cotton", "organic", "quick-dry"), opts, 1000, 0)
    hoodie = Product("p4", "clothing", "hoodie", "Nova", ("cotton", "fleece", "zip-up"), opts, 2500, 0)
    shoe = Product("p5", "shoes", "running shoe", "Nova", ("mesh", "lightweight", "cushioned"), opts, 2500, 0)
    want = {"color": "red", "size": "large"}
    assert reward(task, shirt, want)[0] == 1.0
    assert reward(task, shirt, {"color": "blue", "size": "large"})[0] == pytest.approx(0.8)
    assert reward(task, pricey, want) == (pytest.approx(0.8), {"r_type": 1.0, "attrs_matched": 2,
                                                              "options_matched": 2, "price_ok": False})
    assert reward(task, plain, {})[0] == pytest.approx(0.4)
    assert reward(task, hoodie, want)[0] == pytest.approx(0.08)
    assert reward(task, shoe, want)[0] == 0.0


def _two_option_task(env):
    """The first train task with 2 attributes and 2 options whose expert opens a page-1 item
    offering more than one value of the first option."""
    for t in map(env.task, env.list_tasks("train")):
        expert = env.expert_steps(t.task_id)
        if len(t.attrs) == 2 and len(t.options) == 2 and len(expert) == 5:
            item = shop().by_id[expert[1].action[6:-1]]
            if len(item.options[0][1]) > 1:
                return t, item
    raise AssertionError("no such task")


def test_partial_rewards_through_the_env(env):
    """A 2-attribute, 2-option task: denominator 5.
    Expert item with the wrong first option -> (2 + 1 + 1) / 5 = 0.8; no options -> (2 + 0 + 1) / 5 = 0.6;
    an over-budget look-alike offering the options -> (2 + 2 + 0) / 5 = 0.8."""
    task, item = _two_option_task(env)
    search, open_item = f"search[{task.query}]", f"click[{item.pid}]"
    (dim, want), (_, want2) = task.options
    wrong = next(v for v in dict(item.options)[dim] if v != want)
    out = play(env, task.task_id, [search, open_item, f"click[{wrong}]", f"click[{want2}]", "click[Buy Now]"])
    obs, r, term, trunc, info = out[-1]
    assert (r, term, info["won"], info["score"]) == (pytest.approx(0.8), True, False, pytest.approx(0.8))
    assert [x[1] for x in out[1:-1]] == [0.0] * 4 and obs.endswith("Reward: 0.80")
    obs, r, term, _, info = play(env, task.task_id, [search, open_item, "click[Buy Now]"])[-1]
    assert r == pytest.approx(0.6) and term and not info["won"] and info["options_matched"] == 0

    over = next((t, p) for t in map(env.task, env.list_tasks("train"))
                for p in shop().search(_words(t.query))[:PAGE_SIZE]
                if len(t.attrs) == 2 and len(t.options) == 2 and not looks_right(t, p) and p.ptype == t.ptype
                and set(t.attrs) <= set(p.attrs) and all(v in dict(p.options)[d] for d, v in t.options))
    t, p = over
    out = play(env, t.task_id, [f"search[{t.query}]", f"click[{p.pid}]"] +
               [f"click[{v}]" for _, v in t.options] + ["click[Buy Now]"])
    assert out[-1][1] == pytest.approx(0.8) and out[-1][4]["price_ok"] is False


def test_grammar_is_case_and_whitespace_tolerant_and_page_aware():
    env = gym.make(ENV_ID, max_turns=40).unwrapped  # more than the 15 turns this walk takes
    task, item = _two_option_task(env)
    pid, (_, v1), (_, v2) = item.pid, *task.options
    obs, _ = env.reset(options={"task_id": task.task_id})
    assert task.instruction in obs
    assert env.step("click[Next >]")[0].startswith("Invalid action: nothing to click")
    assert env.step(f"  SEARCH [ {task.query.upper()} ]\n")[0].startswith("Results page 1 of")
    assert env.step("click[< Prev]")[0].startswith("Invalid action")  # first page
    assert env.step("Click[NEXT>]")[0].startswith("Results page 2 of")
    assert env.step("click[ <  prev ]")[0].startswith("Results page 1 of")
    assert env.step(f"search[{task.query}]")[0].startswith("Invalid action: search is only")
    assert env.step("click[p9999]")[0].startswith("Invalid action")
    assert env.step(f"click[ {pid.upper()} ]")[0].startswith(f"{pid}: ")
    assert env.step("click[Next >]")[0].startswith("Invalid action")  # not on an item page
    assert env.step(f"click[{v1.upper().replace('-', ' ')}]")[0].startswith("Selected ")
    assert env.step("click[< Prev]")[0].startswith("Results page 1 of")
    assert env.step("click[back to search]")[0].startswith("[search page]")
    env.step(f"search[{task.query}]")
    env.step(f"click[{pid}]")
    env.step(f"click[{v1}]")
    env.step(f"click[{v2}]")
    obs, r, term, trunc, info = env.step("click[ buy   NOW ]")
    assert (r, term, info["won"], info["bought"]) == (1.0, True, True, pid)
    with pytest.raises(RuntimeError):
        env.step("click[Buy Now]")
    env.reset(options={"task_id": task.task_id})
    assert env.step("search[zzqx]")[0].startswith("No results")
    assert env.step("search[]")[0].startswith("Invalid action")


def test_turn_budget_truncates(env):
    env.reset(options={"task_id": "train-00000"})
    flags = [env.step("buy")[2:4] for _ in range(TextShopEnv.default_max_turns)]
    assert flags[:-1] == [(False, False)] * 14 and flags[-1] == (False, True)


HOSTILE = ["", " ", "\n", "click[", "click]", "search[", "search[]", "click[]", "click[[]]", "click[click[Buy Now]]",
           "search[a]b]", "search[" + "x" * 100_000 + "]", "click[" + "y" * 100_000, "z" * 100_000,
           "search[caf\u00e9 \u4e2d\u6587 \U0001f600]", "click[\u0000]", "click[Buy Now]\nclick[Buy Now]",
           "Thought: x\nAction: click[Buy Now]", "click [ Next > ] extra", "CLICK[BUY NOW", "click[Buy\nNow]"]


def test_hostile_strings_never_raise_on_any_page(env):
    """10,000 random/adversarial strings, each played from a search, results or item page."""
    rng = random.Random(0)
    actions = HOSTILE + adversarial_actions(rng, 10_000 - len(HOSTILE))
    train = env.list_tasks("train")
    done = True
    for i, a in enumerate(actions):
        if done:
            task_id = train[i % len(train)]
            prefix = [s.action for s in env.expert_steps(task_id)][:rng.randrange(4)]  # search/results/item
            play(env, task_id, prefix)
        obs, r, term, trunc, info = env.step(a)
        assert env.observation_space.contains(obs) and len(obs) < 2_000, repr(a[:50])
        assert math.isfinite(r) and 0.0 <= info["reward_total"] <= 1.0
        done = term or trunc or rng.random() < 0.1


def _transcript(seed, actions):
    env = gym.make(ENV_ID).unwrapped
    obs, info = env.reset(seed=seed)
    out = [obs, info["task_id"]]
    for a in actions + [s.action for s in env.expert_steps(info["task_id"])]:
        out.append(env.step(a))
        if out[-1][2] or out[-1][3]:
            break
    return out


def test_deterministic_under_the_same_seed_and_actions():
    actions = ["search[cotton]", "click[Next >]", "click[< Prev]", "click[Back to Search]"]
    assert _transcript(3, actions) == _transcript(3, actions)
    picks = [gym.make(ENV_ID).unwrapped.reset(seed=7)[1]["task_id"] for _ in range(2)]
    env = gym.make(ENV_ID).unwrapped
    assert picks[0] == picks[1] == env.reset(seed=7)[1]["task_id"] and picks[0] in env.list_tasks("train")
    assert len({env.reset(seed=s)[1]["task_id"] for s in range(20)}) > 10
    unseen = gym.make(ENV_ID, split="test_unseen").unwrapped
    assert unseen.reset(seed=7)[1]["task_id"].startswith("test_unseen-")


_DIGEST = ("import hashlib, envs.textshop as t; s = t.shop(); "
           "print(hashlib.sha256(repr((s.products, s.tasks, s.held_out)).encode()).hexdigest())")


def test_catalog_is_identical_across_processes_and_hash_seeds():
    """Ray actors build their own catalog: it must not depend on PYTHONHASHSEED."""
    s = shop()
    here = hashlib.sha256(repr((s.products, s.tasks, s.held_out)).encode()).hexdigest()
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.stdout.strip() == here


def test_catalog_builds_fast_and_steps_are_sub_millisecond(env):
    start = time.perf_counter()
    fresh = _Shop()
    assert time.perf_counter() - start < 1.0
    assert len(fresh.products) == 1300 and len({p.pid for p in fresh.products}) == 1300
    plays = [(t, [s.action for s in env.expert_steps(t)] + ["click[nope]"]) for t in env.list_tasks("train")[:300]]
    n, start = 0, time.perf_counter()
    for task_id, actions in plays:
        env.reset(options={"task_id": task_id})
        for a in actions[-1:] + actions[:-1]:
            env.step(a)
            n += 1
    assert (time.perf_counter() - start) / n < 1e-3


@pytest.mark.parametrize("task_id, message", [
    ("train-\x0000001", "task id 'train-\\x0000001' contains the character '\\x00', which no task id has"),
    ("train-\ud80000001", "task id 'train-\\ud80000001' contains the character '\\ud800', which no task id has"),
    ("x" * 1_000_000, "task id '" + "x" * 40 + "'... (1000000 characters) is too long (at most 256 characters)"),
    ("", "task id is empty"),
])
def test_reset_rejects_task_ids_no_env_has_without_echoing_them(env, task_id, message):
    """NULs, lone surrogates and megabyte ids end in one short message (never the id in full)."""
    from envs.base import TaskIdError

    with pytest.raises(TaskIdError) as e:
        env.reset(options={"task_id": task_id})
    assert str(e.value) == message


def test_a_train_env_says_when_it_meets_a_test_task():
    """Allowed (evaluation tooling may do it), but said once per pair of splits, and in `info`."""
    import warnings

    from envs.base import _WARNED

    env = gym.make("rl_agents/TextShop-v0", split="train").unwrapped
    _WARNED.discard(("TextShopEnv", "test_seen", "train"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = env.reset(options={"task_id": "test_seen-00003"})
        env.reset(options={"task_id": "test_seen-00004"})
        _, own = env.reset(options={"task_id": "train-00003"})
    said = [str(w.message) for w in caught if "belongs to split" in str(w.message)]
    assert said == ["TextShopEnv: task 'test_seen-00003' belongs to split 'test_seen', not to this env's split "
                    "'train' (a train run is using a test task); said once per pair of splits"]
    assert info["task_split"] == "test_seen" and "task_split" not in own
