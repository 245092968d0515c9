"""ALFWorld (Shridhar et al. 2021) as a `TextEnv`: the real TextWorld-PDDL games, played offline.

* Data: a directory with ALFWorld's `json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/
  game.tw-pddl` tree (the layout of `$ALFWORLD_DATA`), given as `data_dir=` or through the
  `ALFWORLD_DATA` environment variable. Splits: `train` = json_2.1.1/train, `test_seen` =
  valid_seen, `test_unseen` = valid_unseen. A task id is the trial's path below json_2.1.1,
  e.g. `"valid_seen/pick_and_place_simple-Watch-None-SideTable-222/trial_T20190909_051800_233558"`.
* Which games count: as ALFWorld's `AlfredTWEnv.collect_game_files` does, games marked
  `"solvable": false` (or without the mark), movable-receptacle and sliced-object games are
  skipped, each with a logged reason; so are files that do not parse. On the shipped data that
  leaves 140 test_seen and 134 test_unseen games: the sizes of ETO's Table 1.
* Dynamics, text and object names are ALFWorld's: we drive `textworld`'s PDDL engine directly
  (`textworld[pddl]==1.7.0`, no `alfworld` package) and rename entities with ALFWorld's
  demangling (`alfworld.agents.utils.misc.Demangler`, no shuffling: `drawer 3`, `sinkbasin 1`),
  so replaying a recorded `gt_traj.json` reproduces its observations exactly. As ALFWorld and ETO
  do, the first observation drops the "-= Welcome to TextWorld, ALFRED! =-" banner and step
  observations drop the "You arrive at loc N. " prefix. Commands must match an admissible one
  exactly (after stripping whitespace), else "Nothing happens." — ALFWorld's behaviour; such
  commands are answered without running the engine (the state cannot change).
* Reward: 1 when the goal is reached (then `terminated`), else 0; `info["score"]` the same.
* Turn budget: 40, the `max_steps` of ETO's released ALFWorld config (the ETO paper gives no
  number; ALFWorld's own agents use 50). 40 of the 600 shipped train games have a recorded
  expert longer than that (up to 102 actions); for those, `max_turns_for` returns the expert's
  length so that the expert can finish (pass `max_turns=40` to force a flat budget).
* Experts: the `gt_traj.json` of a trial (the shipped train games have one; valid games do not):
  its gpt turns are the actions; thoughts are short templates.
* Speed: textworld's PDDL engine spends >90% of its time in pure functions it re-runs over and
  over: the PDDL->SAS translation (twice per load, twice again per reset), tatsu parses of the
  same grammar templates and conditions at every step, deep copies of entity tables per grammar
  symbol. While our envs load, reset and step, `_FastEngine` swaps in memoised/shallow versions
  (translations: LRU of `CACHE_TRANSLATIONS`, shared by the envs of a process). Same text, to
  the character (tested against the plain engine); a step takes ~5-10 ms instead of 25-170 ms,
  a reset of a recently played game ~0.05-0.1 s instead of 0.4-2 s.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from envs.base import ExpertStep, StepResult, TextEnv

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "test_seen": "valid_seen", "test_unseen": "valid_unseen"}
CACHE_TRANSLATIONS = 32  # memoised PDDL->SAS translations: two per game, ~3 MB each
_NOTHING = "Nothing happens."
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ALFWorld data directory (the one holding json_2.1.1/): `data_dir` or `$ALFWORLD_DATA`."""
    given = data_dir if data_dir is not None else os.environ.get("ALFWORLD_DATA")
    if not given:
        raise FileNotFoundError("ALFWorldEnv needs the ALFWorld games: pass data_dir=... or set ALFWORLD_DATA to "
                                "the directory holding json_2.1.1/{train,valid_seen,valid_unseen}")
    path = Path(given).expanduser()
    if not (path / "json_2.1.1").is_dir():
        source = "data_dir" if data_dir is not None else "ALFWORLD_DATA"
        raise FileNotFoundError(f"{source}={str(given)!r} has no json_2.1.1/ directory of ALFWorld games "
                                "(expected json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/game.tw-pddl)")
    return path


@functools.lru_cache(maxsize=16)
def scan_games(json_dir: str, split_dir: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(task ids, (skipped task id, reason) pairs) of one split, in sorted order."""
    root = Path(json_dir)
    tasks, skipped = [], []
    for game in sorted((root / split_dir).glob("*/*/game.tw-pddl")):
        task_id = game.parent.relative_to(root).as_posix()
        reason = None
        if "movable" in task_id or "Sliced" in task_id:
            reason = "movable-receptacle and sliced-object games are not supported by ALFWorld's text env"
        else:
            try:
                data = json.loads(game.read_text())
                missing = {"pddl_domain", "grammar", "pddl_problem"} - set(data)
                if missing:
                    reason = f"game file lacks {sorted(missing)}"
                elif "solvable" not in data:
                    reason = "game file has no 'solvable' mark"
                elif data["solvable"] is not True:
                    reason = "game marked unsolvable"
            except (OSError, ValueError) as e:
                reason = f"game file does not load: {type(e).__name__}: {e}"
        if reason is None:
            tasks.append(task_id)
        else:
            logger.info("ALFWorld: skipping %s (%s)", task_id, reason)
            skipped.append((task_id, reason))
    if skipped:
        logger.info("ALFWorld %s: %d games, %d skipped", split_dir, len(tasks), len(skipped))
    return tuple(tasks), tuple(skipped)


def demangle_names(entity_infos: dict) -> None:
    """ALFWorld's entity names, in place: `Drawer_bar__minus_00_dot_50...` -> `drawer 3`.

    Same numbering as `alfworld.agents.utils.misc.Demangler` (shuffle=False): instances of a
    type are numbered 1..n and handed out from the top in sorted-id order.
    """
    ids = sorted(info.id for info in entity_infos.values())

    def base(id_: str) -> str:
        return id_.split("_bar_", 1)[0] + ("basin" if "basin" in id_ else "")

    counts = collections.Counter(base(i) for i in ids if "_bar_" in i)
    numbers = {name: list(range(1, n + 1)) for name, n in counts.items()}
    names = {}
    for id_ in ids:
        if "_bar_" in id_:
            name = base(id_)
            names[id_] = f"{name} {numbers[name].pop()}"
        else:
            text = (id_.replace("_minus_", "-").replace("_plus_", "+").replace("_dot_", ".").replace("_comma_", ","))
            names[id_] = f"{text} "  # ALFWorld writes "{name} {id}" with an empty id here
    for info in entity_infos.values():
        info.name = names[info.id]


class _MemoPddl2Sas:
    """Stands in for the `fast_downward` module inside textworld's PDDL logic, memoising
    `pddl2sas` (a pure function of domain and problem text); everything else is delegated."""

    def __init__(self, module, maxsize: int):
        self._module, self._maxsize = module, maxsize
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __getattr__(self, name):
        return getattr(self._module, name)

    def pddl2sas(self, domain, problem, verbose=False, optimize=False):
        key = (domain, problem, bool(optimize))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = self._module.pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
        self._cache[key] = result
        while len(self._cache) > self._maxsize:
            self._cache.popitem(last=False)
        return result


def _shallow_context(context):
    """textgen.copy_context without deep-copying `variables` and `mapping`: derivation only
    adds keys to these dicts; their values (EntityInfo, Variable) are never mutated."""
    return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}


class _FastEngine:
    """Faster stand-ins for pure functions of textworld's PDDL engine (textworld==1.7.0), swapped
    in while our envs load, reset and step. Profiled on a game reset, they took >90% of the time:

    * `fast_downward.pddl2sas` (PDDL->SAS translation, ~90% of a game load), LRU of CACHE_TRANSLATIONS;
    * the text grammar's parse of a template string (the engine re-parses every command and
      feedback template with tatsu at every step) -> a deep copy of the cached symbols, since
      derivation mutates them;
    * `Rule.parse_conjunctive_query` (grammar conditions, parsed at every use) -> the cached
      Rule, which nothing mutates (its own `_cache` memoises `instantiate`);
    * `textgen.copy_context`, which deep-copies entity infos at every grammar symbol -> shallow.

    Tests replay recorded expert games and hostile inputs through the plain engine and ours
    and require identical text.
    """

    def __init__(self):
        from textworld.envs.pddl import logic as pddl_logic
        from textworld.envs.pddl import textgen
        from textworld.logic import Rule

        self.targets = ((pddl_logic, "fast_downward", _MemoPddl2Sas(pddl_logic.fast_downward, CACHE_TRANSLATIONS)),
                        (textgen, "_parse_and_convert", self._symbols),
                        (Rule, "parse_conjunctive_query", classmethod(self._query)),
                        (textgen, "copy_context", _shallow_context))
        self._parse_symbols, self._parse_query = textgen._parse_and_convert, Rule.parse_conjunctive_query
        self._symbol_cache: dict = {}
        self._query_cache: dict = {}

    def _symbols(self, text, rule_name=None, **kwargs):
        key = (text, rule_name)
        if key not in self._symbol_cache:
            if len(self._symbol_cache) > 100_000:
                self._symbol_cache.clear()
            self._symbol_cache[key] = self._parse_symbols(text, rule_name=rule_name)
        return copy.deepcopy(self._symbol_cache[key])

    def _query(self, cls, expr):
        if expr not in self._query_cache:
            if len(self._query_cache) > 100_000:
                self._query_cache.clear()
            self._query_cache[expr] = self._parse_query(expr)
        return self._query_cache[expr]


_memo_lock = threading.Lock()
_memo: _FastEngine | None = None


@contextlib.contextmanager
def _fast_engine():
    """Within the block, textworld's PDDL engine runs with `_FastEngine`'s stand-ins."""
    global _memo
    with _memo_lock:
        if _memo is None:
            _memo = _FastEngine()
        originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in _memo.targets]
        for owner, name, memo in _memo.targets:
            setattr(owner, name, memo)
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def strip_location(observation: str) -> str:
    """Drop ALFWorld's "You arrive at loc N. " prefix (as ALFWorld's and ETO's agents do)."""
    if observation.startswith("You arrive at loc "):
        observation = observation[observation.find(". ") + 2:]
    return observation


def _thought(action: str, held: str | None) -> str:
    """A short templated rationale for an ALFWorld action (`held`: the object carried, if any)."""
    a = action.strip()
    if a.startswith("go to "):
        target = a[6:]
        return f"I carry the {held} to the {target}." if held else f"I look for what I need at the {target}."
    if a.startswith("open "):
        return f"The {a[5:]} is closed; I open it to see inside."
    if a.startswith("close "):
        return f"I close the {a[6:]} again."
    if a.startswith("take ") and " from " in a:
        obj, recep = a[5:].split(" from ", 1)
        return f"I found the {obj.rsplit(' ', 1)[0]} I need; I take the {obj} from the {recep}."
    if a.startswith("put ") and " in/on " in a:
        obj, recep = a[4:].split(" in/on ", 1)
        return f"I put the {obj} in/on the {recep}."
    for verb in ("heat", "cool", "clean"):
        if a.startswith(verb + " ") and " with " in a:
            obj, tool = a[len(verb) + 1:].split(" with ", 1)
            return f"I {verb} the {obj} with the {tool}."
    if a.startswith("use "):
        return f"I turn on the {a[4:]} to look at the {held or 'object'} in its light."
    if a.startswith("examine "):
        return f"I examine the {a[8:]}."
    if a == "inventory":
        return "I check what I am carrying."
    if a == "look":
        return "I look around."
    return f"Next: {a}."


def _holding_after(action: str, held: str | None) -> str | None:
    if action.startswith("take ") and " from " in action:
        return action[5:].split(" from ", 1)[0]
    if action.startswith("put ") and " in/on " in action:
        return None
    return held


# ALFWorld's six task types (its base_config.yaml numbers them 1-6 in this order).
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")


def task_type(task_id: str) -> str:
    """Of an id 'train/pick_heat_then_place_in_recep-Egg-None-Fridge-13/trial_...': the part of the
    task directory before its first '-'."""
    return task_id.split("/")[1].split("-")[0]


def interleave_by_type(task_ids: list[str]) -> list[str]:
    """Round robin over task types (types in sorted order, each type's ids in the given order)."""
    by_type: dict[str, list[str]] = collections.defaultdict(list)
    for t in task_ids:
        by_type[task_type(t)].append(t)
    queues = [by_type[k] for k in sorted(by_type)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


class ALFWorldEnv(TextEnv):
    """ALFWorld's text games (TextWorld PDDL), with ALFWorld's splits and ETO's turn budget.

    Args:
        split: "train", "test_seen" (valid_seen) or "test_unseen" (valid_unseen).
        max_turns: a flat budget for every task (default: 40, or an expert's longer length).
        data_dir: the ALFWorld data directory (holding json_2.1.1/); default `$ALFWORLD_DATA`.
        valid_actions: add the admissible commands as `info["valid_actions"]` at every reset and
            step (free here: the engine computes them anyway). A reset option
            `{"valid_actions": bool}` overrides it for one episode.
        task_order: "sorted" (default: ids sort by task type, so the first N tasks of a split are
            all one type) or "interleaved" (round robin over the six task types, each type in
            sorted order: the first N tasks are a type-balanced subset, for small-scale runs).
        task_types: keep only these task types (ALFWorld's `env.task_types`, by name: any of
            `TASK_TYPES`); None = all six.
    """

    default_max_turns = 40  # ETO's released config (eval_agent/configs/task/alfworld.json)
    action_help = (
        "Actions: go to RECEP | open RECEP | close RECEP | take OBJ from RECEP | put OBJ in/on RECEP | "
        "use LAMP | heat OBJ with microwave N | cool OBJ with fridge N | clean OBJ with sinkbasin N | "
        "examine OBJ | inventory | look.\n"
        "Write objects and receptacles exactly as the observations do, with their number (e.g. "
        "'take mug 1 from countertop 2'); anything else gets 'Nothing happens.'"
    )

    def __init__(self, split: str = "train", max_turns: int | None = None, render_mode: str | None = None, *,
                 data_dir: str | os.PathLike | None = None, valid_actions: bool = False,
                 task_order: str = "sorted", task_types: list[str] | tuple[str, ...] | None = None):
        if task_order not in ("sorted", "interleaved"):
            raise ValueError(f"task_order={task_order!r} is not one of ['sorted', 'interleaved']")
        if task_types is not None:
            if isinstance(task_types, str) or not task_types:
                raise ValueError(f"task_types={task_types!r}: give a non-empty list of {list(TASK_TYPES)}")
            unknown = [t for t in task_types if t not in TASK_TYPES]
            if unknown:
                raise ValueError(f"task_types: unknown {unknown}; valid: {list(TASK_TYPES)}")
        self.task_types = None if task_types is None else frozenset(task_types)
        super().__init__(split=split, max_turns=max_turns, render_mode=render_mode)
        self.task_order = task_order
        try:
            import textworld  # noqa: F401
            from textworld.envs.pddl import pddl  # noqa: F401
        except ImportError as e:
            raise ImportError("ALFWorldEnv needs TextWorld with its PDDL engine: pip install 'textworld[pddl]==1.7.0' "
                              "(or 'rl-agents[alfworld]')") from e
        self.data_dir = resolve_data_dir(data_dir)
        self._json_dir = self.data_dir / "json_2.1.1"
        self.valid_actions = valid_actions
        self._episode_valid = valid_actions
        self._tw = None  # textworld.envs.pddl.PddlEnv, created at the first reset
        self._loaded: str | None = None  # game file currently loaded in self._tw
        self._state = None  # the engine's current GameState
        self._valid: frozenset[str] = frozenset()
        self._experts: dict[str, tuple[str, tuple[str, ...]] | None] = {}  # task id -> (goal, actions)

    # ---- tasks -----------------------------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        if split not in SPLIT_DIRS:
            raise ValueError(f"split={split!r} is not one of {list(SPLIT_DIRS)}")
        tasks = list(scan_games(str(self._json_dir), SPLIT_DIRS[split])[0])
        if self.task_types is not None:
            tasks = [t for t in tasks if task_type(t) in self.task_types]
        return tasks if self.task_order == "sorted" else interleave_by_type(tasks)

    def skipped_tasks(self, split: str) -> dict[str, str]:
        """Games of a split left out of `list_tasks`, with the reason."""
        return dict(scan_games(str(self._json_dir), SPLIT_DIRS[split])[1])

    def _trial_dir(self, task_id: str) -> Path:
        path = (self._json_dir / task_id).resolve()
        if (self._json_dir.resolve() not in path.parents or not (path / "game.tw-pddl").is_file()):
            raise ValueError(f"ALFWorld task id {task_id!r} is not a trial below {self._json_dir} "
                             "('<split dir>/<task>/<trial>' with a game.tw-pddl)")
        return path

    def _expert_actions(self, task_id: str) -> tuple[str, ...] | None:
        if task_id not in self._experts:
            traj = self._trial_dir(task_id) / "gt_traj.json"
            turns = json.loads(traj.read_text()) if traj.is_file() else None
            self._experts[task_id] = None if turns is None else (
                turns[0]["value"].rsplit("Your task is to: ", 1)[-1].strip(),
                tuple(t["value"].strip() for t in turns if t.get("from") == "gpt"))
        entry = self._experts[task_id]
        return None if entry is None else entry[1]

    def max_turns_for(self, task_id: str) -> int:
        expert = self._expert_actions(task_id)
        return max(self.default_max_turns, len(expert) if expert else 0)

    # ---- engine ----------------------------------------------------------------------------
    def _engine(self):
        if self._tw is None:
            import textworld
            from textworld.envs.pddl import PddlEnv

            self._tw = PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))
        return self._tw

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        wanted = (options or {}).get("valid_actions")
        self._episode_valid = self.valid_actions if wanted is None else bool(wanted)
        return super().reset(seed=seed, options=options)

    def _reset_task(self, task_id: str) -> tuple[str, str, dict[str, Any]]:
        game = str(self._trial_dir(task_id) / "game.tw-pddl")
        engine = self._engine()
        with _fast_engine():
            if self._loaded != game:
                self._loaded = None
                try:
                    engine.load(game)
                except Exception as e:  # e.g. some games marked unsolvable: KeyError in textworld
                    raise RuntimeError(f"ALFWorld game {task_id!r} does not load: {type(e).__name__}: {e}") from e
                demangle_names(engine._entity_infos)  # what ALFWorld's AlfredDemangler wrapper does
                self._loaded = game
            self._state = engine.reset()
        self._valid = frozenset(self._state["_valid_commands"])
        text = self._state.feedback.strip()
        paragraphs = text.split("\n\n")
        if paragraphs[0].strip() == _BANNER:
            paragraphs = paragraphs[1:]
        obs = "\n".join(paragraphs)
        instruction = obs.rsplit("Your task is to: ", 1)[-1].strip()
        extra: dict[str, Any] = {}
        if self._episode_valid:
            extra["valid_actions"] = list(self._state["admissible_commands"])
        return obs, instruction, extra

    def _step_action(self, action: str) -> StepResult:
        command = action.strip()  # what PddlEnv.step does before matching
        if command in self._valid:
            with _fast_engine():
                self._state, _, _ = self._tw.step(command)
            self._valid = frozenset(self._state["_valid_commands"])
            obs = strip_location(self._state.feedback)
        else:  # PddlEnv would answer exactly this, with the state unchanged
            obs = _NOTHING
        won = bool(self._state["won"])
        info = {"valid_actions": list(self._state["admissible_commands"])} if self._episode_valid else None
        return StepResult(obs, score=float(won), progress=float(won), done=won, won=won, info=info)

    def state_key(self) -> str | None:
        """A digest of the PDDL state's facts (where everything is, what is open, held, hot, ...): the
        exact state, which "Nothing happens." and "You arrive at cabinet 1." do not tell apart. The
        `checked(...)` facts (what the agent has looked at: look, inventory, examine, ...) are left
        out: they change no outcome."""
        if self._state is None:
            return None
        import hashlib

        facts = sorted(s for s in map(str, self._state["_facts"]) if not s.startswith("checked("))
        return hashlib.blake2b("\n".join(facts).encode(), digest_size=12).hexdigest()

    # ---- experts ---------------------------------------------------------------------------
    def expert_steps(self, task_id: str) -> list[ExpertStep]:
        """The recorded expert of `task_id` (its gt_traj.json), with templated thoughts."""
        actions = self._expert_actions(task_id)
        if actions is None:
            raise LookupError(f"ALFWorld task {task_id!r} has no recorded expert (gt_traj.json)")
        goal = self._experts[task_id][0]
        steps, held = [], None
        for i, a in enumerate(actions):
            thought = _thought(a, held)
            steps.append(ExpertStep(f"My task is to {goal} {thought}" if i == 0 else thought, a))
            held = _holding_after(a, held)
        return steps

    def close(self):
        if self._tw is not None:
            self._tw.close()
        self._tw, self._loaded, self._state, self._valid = None, None, None, frozenset()
        self._done = True
        super().close()
