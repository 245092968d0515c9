"""Trajectories: the record of one episode, token-exact when a rollout produced it (docs/design.md §3).

A `Trajectory` is a list of chat `Turn`s (`system`, `user`, `assistant`). `user` turns are the
instruction and the environment's observations; `assistant` turns are the agent's whole output
(thought + action), which is what the agent is trained on. When a rollout produced the
trajectory, every turn also holds the exact token ids of its span in the running context
(for assistant turns: the ids the engine generated, plus their sampling log-probs), so the
training sequence is the concatenation of those ids, never a re-tokenisation of the text.

Storage is JSONL, one trajectory per line. Import/export of the ETO/FastChat conversation
format (`{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`, and `role/content`
`messages`) lets other tools read our data and us read theirs. Malformed records raise
`TrajectoryFormatError` naming the file, the line and the field; `read_trajectories` reads
either format (decided once per file, so its errors are that format's, at the true line).

ETO's and DMPO's data open with the instruction and the agent's acknowledgement, `[human:
instruction, gpt: "OK", human: task, gpt: first action, ...]`. Both treat that opening as prompt:
ETO's pair builder puts it in `prompt`, DMPO's trainer skips round 0 when it weights turns. We
import the "OK" as a turn with `prompt=True`: rendered as the assistant message it is, but not an
agent turn (no loss, not counted by `agent_turns`, so DMPO's turn 0 is the first action), and
exported back as it came. Ids keep their JSON type (ETO's WebShop ids are integers), and fields
we do not use (ALFWorld's `game_file`) are kept and written back.

Preference pairs (`read_pairs`, `write_pairs`): ETO's format, a JSON list of `{"id", "prompt":
[...], "chosen": [...], "rejected": [...]}` conversation lists as ETO's `construct_preference.py`
writes them (`prompt` = instruction, "OK" and the task; both sides end with an agent turn), and
ours, JSONL of `{"id", "chosen": <trajectory>, "rejected": <trajectory>}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rl_agents.fileio import atomic_write_text, read_utf8  # noqa: F401  (atomic_write_text: re-exported)

ROLES = ("system", "user", "assistant")
_FASTCHAT_ROLE = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class TrajectoryFormatError(ValueError):
    """A record that is not a valid trajectory; the message names file, line and field."""


@dataclass
class Turn:
    role: str
    """'system', 'user' (instruction / observation) or 'assistant' (the agent's output)."""
    text: str
    reward: float = 0.0
    """Reward the env paid for the action in this (assistant) turn."""
    token_ids: list[int] | None = None
    """Exact ids of this turn's span in the running context (scaffolding included for non-agent
    turns; for agent turns exactly what the engine generated). None for text-only records."""
    logprobs: list[float] | None = None
    """Sampling log-probs of `token_ids` (agent turns from a rollout)."""
    prompt: bool = False
    """Part of the prompt although written by the assistant (ETO's "OK" acknowledgement of the
    instruction): rendered as its role, carries no loss, not an agent turn."""

    @property
    def is_agent(self) -> bool:
        """An agent turn: the assistant's output that training sees (not a prompt turn)."""
        return self.role == "assistant" and not self.prompt


@dataclass
class Trajectory:
    task_id: str
    env_id: str
    turns: list[Turn]
    reward: float = 0.0
    """Final reward in [0, 1] (the papers' metric)."""
    success: bool = False
    id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form: split, seed, model, error, source, ..."""

    # ---- views ------------------------------------------------------------------------------
    @property
    def agent_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.is_agent]

    @property
    def num_steps(self) -> int:
        return len(self.agent_turns)

    def messages(self) -> list[dict[str, str]]:
        """The chat as `[{"role", "content"}]`, what a chat template takes."""
        return [{"role": t.role, "content": t.text} for t in self.turns]

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["turns"]:  # keep text-only records small and readable
            for k in ("token_ids", "logprobs"):
                if t[k] is None:
                    del t[k]
            if not t["prompt"]:
                del t["prompt"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "record") -> Trajectory:
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for key in ("task_id", "env_id", "turns"):
            if key not in d:
                raise TrajectoryFormatError(f"{where}: field {key!r} is missing")
        if not isinstance(d["turns"], list):
            raise TrajectoryFormatError(f"{where}: field 'turns' must be a list")
        turns = [_turn_from_dict(t, f"{where}: field 'turns[{i}]") for i, t in enumerate(d["turns"])]
        first_agent = next((i for i, t in enumerate(turns) if t.is_agent), len(turns))
        late = next((i for i, t in enumerate(turns) if t.prompt and i > first_agent), None)
        if late is not None:
            raise TrajectoryFormatError(f"{where}: field 'turns[{late}].prompt': a prompt turn must come before the "
                                        "first agent turn")
        unknown = set(d) - {"task_id", "env_id", "turns", "reward", "success", "id", "metadata"}
        if unknown:
            raise TrajectoryFormatError(f"{where}: unknown field(s) {sorted(unknown)}")
        reward = d.get("reward", 0.0)
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise TrajectoryFormatError(f"{where}: field 'reward' must be a number, got {reward!r}")
        metadata = d.get("metadata", {})
        if not isinstance(metadata, dict):
            raise TrajectoryFormatError(f"{where}: field 'metadata' must be an object")
        return cls(task_id=str(d["task_id"]), env_id=str(d["env_id"]), turns=turns, reward=float(reward),
                   success=bool(d.get("success", False)), id=str(d.get("id", "")), metadata=metadata)

    def to_conversation(self) -> dict[str, Any]:
        """ETO/FastChat conversation record (text only; readable by FastChat, ETO, TRL tooling).
        An imported record comes back with its id as it came and its other fields."""
        conv = [{"from": _TO_FASTCHAT[t.role], "value": t.text} for t in self.turns]
        rid = self.metadata["conversation_id"] if "conversation_id" in self.metadata else self.id or self.task_id
        return {**self.metadata.get("conversation_extra", {}), "id": rid, "task_id": self.task_id,
                "env_id": self.env_id, "reward": self.reward, "success": self.success, "conversations": conv}

    @classmethod
    def from_conversation(cls, d: Any, env_id: str = "", where: str = "record") -> Trajectory:
        """Read `{"id", "conversations": [{"from", "value"}]}` or `{"id", "messages": [{"role", "content"}]}`.

        ETO's opening (human, gpt "OK", human, ...) makes the "OK" a prompt turn (module docstring)."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if "conversations" in d:
            key = "conversations"
        elif "messages" in d:
            key = "messages"
        else:
            raise TrajectoryFormatError(f"{where}: field 'conversations' (or 'messages') is missing")
        turns = conversation_turns(d[key], f"{where}: field '{key}", names=_NAMES[key])
        rid = d.get("id", "")
        reward = d.get("reward", 1.0)
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise TrajectoryFormatError(f"{where}: field 'reward' must be a number, got {reward!r}")
        metadata: dict[str, Any] = {"source": "conversation"}
        if not isinstance(rid, str):
            metadata["conversation_id"] = rid  # written back as it came (an int stays an int)
        extra = {k: v for k, v in d.items() if k not in _CONVERSATION_FIELDS}
        if extra:
            metadata["conversation_extra"] = extra
        return cls(task_id=str(d.get("task_id", rid)), env_id=str(d.get("env_id", env_id)), turns=turns,
                   reward=float(reward), success=bool(d.get("success", reward >= 1.0)), id=str(rid),
                   metadata=metadata)


_TO_FASTCHAT = {"user": "human", "assistant": "gpt", "system": "system"}
_CONVERSATION_FIELDS = {"id", "task_id", "env_id", "reward", "success", "conversations", "messages"}
ETO_ACKNOWLEDGEMENT = "OK"


_NAMES = {"conversations": ("from", "value"), "messages": ("role", "content")}


def conversation_turns(items: Any, where: str, names: tuple[str, str] = ("from", "value")) -> list[Turn]:
    """`[{"from", "value"}]` (or `role/content`) -> turns; `where` is "file:line: field 'key" for errors.
    The ETO/DMPO opening (user, assistant "OK", user, ...) makes that "OK" a prompt turn."""
    if not isinstance(items, list) or not items:
        raise TrajectoryFormatError(f"{where}' must be a non-empty list")
    turns = []
    for i, m in enumerate(items):
        fw = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise TrajectoryFormatError(f"{fw}' must be an object")
        # FastChat files sometimes use role/content inside "conversations" and vice versa.
        rk, vk = names
        r, v = m.get(rk, m.get("role", m.get("from"))), m.get(vk, m.get("content", m.get("value")))
        if r not in _FASTCHAT_ROLE:
            raise TrajectoryFormatError(f"{fw}.{rk}' must be one of {sorted(_FASTCHAT_ROLE)}, got {r!r}")
        if not isinstance(v, str):
            raise TrajectoryFormatError(f"{fw}.{vk}' must be a string")
        turns.append(Turn(role=_FASTCHAT_ROLE[r], text=v))
    roles = [t.role for t in turns[:3]]
    if roles == ["user", "assistant", "user"] and turns[1].text.strip() == ETO_ACKNOWLEDGEMENT:
        turns[1].prompt = True
    return turns


def _turn_from_dict(t: Any, where: str) -> Turn:
    if not isinstance(t, dict):
        raise TrajectoryFormatError(f"{where}' must be an object")
    role = t.get("role")
    if role not in ROLES:
        raise TrajectoryFormatError(f"{where}.role' must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(t.get("text"), str):
        raise TrajectoryFormatError(f"{where}.text' must be a string")
    ids, lps = t.get("token_ids"), t.get("logprobs")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in ids)):
        raise TrajectoryFormatError(f"{where}.token_ids' must be a list of integers")
    if lps is not None:
        if not (isinstance(lps, list) and all(isinstance(x, (int, float)) for x in lps)):
            raise TrajectoryFormatError(f"{where}.logprobs' must be a list of numbers")
        if ids is None or len(ids) != len(lps):
            raise TrajectoryFormatError(f"{where}.logprobs' must have one entry per token id")
    reward = t.get("reward", 0.0)
    if not isinstance(reward, (int, float)) or isinstance(reward, bool):
        raise TrajectoryFormatError(f"{where}.reward' must be a number")
    prompt = t.get("prompt", False)
    if not isinstance(prompt, bool) or (prompt and role != "assistant"):
        raise TrajectoryFormatError(f"{where}.prompt' must be true (an assistant turn that is part of the prompt) "
                                    f"or false, got {prompt!r} on a {role} turn")
    return Turn(role=role, text=t["text"], reward=float(reward), token_ids=ids,
                logprobs=[float(x) for x in lps] if lps is not None else None, prompt=prompt)


# ---- files ------------------------------------------------------------------------------------
_JSON_WS = " \t\n\r"
_WS = re.compile(r"[ \t\n\r]*")


def _read_text(path: str | os.PathLike) -> str:
    """The file's text, newlines made `\n`; unreadable files raise `TrajectoryFormatError` naming
    the file (and, for bytes that are not UTF-8, the line and column)."""
    return read_utf8(path, TrajectoryFormatError)


def _json_msg(msg: str) -> str:
    return msg.removesuffix(" at")  # "Unterminated string starting at" + " at column N"


def _iter_json_lines(path: str | os.PathLike, text: str | None = None) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) for every non-blank line of a JSONL file."""
    for lineno, line in enumerate((_read_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryFormatError(f"{where}: invalid JSON ({_json_msg(e.msg)} at column {e.colno})") from None


def _iter_json_list(path: str | os.PathLike, text: str) -> Iterator[tuple[str, str, Any]]:
    """(`file:line: record i`, `file:line`, record) for every element of a JSON list file, `line`
    being where the element starts."""
    dec = json.JSONDecoder()

    def fail(pos: int, msg: str):
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        raise TrajectoryFormatError(f"{path}:{line}: invalid JSON ({_json_msg(msg)} at column {col})")

    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        fail(pos, "Expecting '['")
    pos = _WS.match(text, pos + 1).end()
    index, line, counted = 0, 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                fail(e.pos, e.msg)
            line, counted = line + text.count("\n", counted, pos), pos
            yield f"{path}:{line}: record {index}", f"{path}:{line}", record
            index += 1
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(pos, "Expecting ',' delimiter" if pos < len(text) else "Expecting ',' or ']'")
    pos = _WS.match(text, pos).end()
    if pos < len(text):
        fail(pos, "Extra data")


def read_jsonl(path: str | os.PathLike) -> list[Trajectory]:
    """Read trajectories written by `write_jsonl`."""
    return [Trajectory.from_dict(d, where) for where, d in _iter_json_lines(path)]


def read_conversations(path: str | os.PathLike, env_id: str = "") -> list[Trajectory]:
    """Read ETO/FastChat conversations from a JSONL file or a JSON list file."""
    return [t for _, t in _read_conversation_records(path, _read_text(path), env_id)]


def _read_conversation_records(path, text: str, env_id: str) -> list[tuple[str, Trajectory]]:
    if text.lstrip(_JSON_WS).startswith("["):
        return [(loc, Trajectory.from_conversation(d, env_id, where)) for where, loc, d in _iter_json_list(path, text)]
    return [(where, Trajectory.from_conversation(d, env_id, where)) for where, d in _iter_json_lines(path, text)]


def read_trajectories(path: str | os.PathLike, env_id: str = "", *, record_source: bool = True) -> list[Trajectory]:
    """Read a file of either format: rl_agents JSONL (`write_jsonl`) or ETO/FastChat conversations
    (JSONL or a JSON list file; `env_id` fills the records that have none).

    The format is decided once, from the first record (a JSON list, or a record with
    `conversations`/`messages`: conversations; a record with `turns`: rl_agents), and the whole
    file is read with that format's reader, so an error names the true line and field. With
    `record_source`, each trajectory's `metadata["source_line"]` is the `file:line` it came from.
    A missing, unreadable, non-UTF-8 or empty file raises `TrajectoryFormatError` too.
    """
    text = _read_text(path)
    if not text.strip(_JSON_WS):
        raise TrajectoryFormatError(f"{path}: no trajectories (the file is empty)")
    if text.lstrip(_JSON_WS).startswith("["):
        records = _read_conversation_records(path, text, env_id)
    else:
        where, first = next(_iter_json_lines(path, text))
        if not isinstance(first, dict):
            raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(first).__name__}")
        if "conversations" in first or "messages" in first:
            records = _read_conversation_records(path, text, env_id)
        elif "turns" in first:
            records = [(where, Trajectory.from_dict(d, where)) for where, d in _iter_json_lines(path, text)]
        else:
            raise TrajectoryFormatError(f"{where}: not a trajectory of either format: no field 'turns' (rl_agents) "
                                        "and no field 'conversations' or 'messages' (ETO/FastChat conversation)")
    if not records:
        raise TrajectoryFormatError(f"{path}: no trajectories (the list is empty)")
    if record_source:
        for loc, t in records:
            t.metadata["source_line"] = loc
    return [t for _, t in records]


def source_of(traj: Trajectory) -> str:
    """Where a trajectory came from: its `file:line` when `read_trajectories` read it, else its task."""
    return traj.metadata.get("source_line") or f"task {traj.task_id}"


def require_agent_turns(trajectories: list[Trajectory], path: str | os.PathLike | None = None) -> list[Trajectory]:
    """`trajectories`, checked to have an agent (assistant) turn each (nothing else can be trained
    on); else `TrajectoryFormatError` naming the first offender's `file:line` (see `source_of`)."""
    bad = [t for t in trajectories if not t.agent_turns]
    if bad:
        first = source_of(bad[0])
        if path is not None and "source_line" not in bad[0].metadata:
            first = f"{path}: {first}"
        more = f" (and {len(bad) - 1} more of the {len(trajectories)} trajectories)" if len(bad) > 1 else ""
        raise TrajectoryFormatError(f"{first}: the trajectory has no agent (assistant) turn{more}")
    return trajectories


def write_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_dict()) + "\n" for t in trajectories))


def write_conversations(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> None:
    atomic_write_text(path, "".join(json.dumps(t.to_conversation()) + "\n" for t in trajectories))


# ---- preference pairs ----------------------------------------------------------------------------
Pair = tuple[Trajectory, Trajectory]


def pair_from_eto(d: Any, env_id: str = "", where: str = "record") -> Pair:
    """ETO's `{"id", "prompt", "chosen", "rejected"}` -> (chosen, rejected) trajectories, each the
    prompt followed by its side. ETO's pairs carry no rewards: chosen is recorded as 1, rejected as 0."""
    if not isinstance(d, dict):
        raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in d:
            raise TrajectoryFormatError(f"{where}: field {key!r} is missing (ETO's pair format: "
                                        "'id', 'prompt', 'chosen', 'rejected')")
    prompt = conversation_turns(d["prompt"], f"{where}: field 'prompt")
    rid = d.get("id", "")
    sides = []
    for key, reward in (("chosen", 1.0), ("rejected", 0.0)):
        side = conversation_turns(d[key], f"{where}: field '{key}")
        if not side[-1].is_agent:
            raise TrajectoryFormatError(f"{where}: field '{key}' must end with an agent (gpt) turn")
        turns = [dataclasses.replace(t) for t in prompt] + side  # the "OK" is already a prompt turn
        metadata: dict[str, Any] = {"source": "eto_pair", "pair_side": key}
        if not isinstance(rid, str):
            metadata["conversation_id"] = rid
        sides.append(Trajectory(task_id=str(d.get("task_id", rid)), env_id=str(d.get("env_id", env_id)),
                                turns=turns, reward=reward, success=reward >= 1.0, id=str(rid), metadata=metadata))
    return sides[0], sides[1]


def pair_to_eto(chosen: Trajectory, rejected: Trajectory) -> dict[str, Any]:
    """(chosen, rejected) -> ETO's pair record: `prompt` = the turns before the first agent turn
    (the same on both sides, else ValueError), each side through its last agent turn."""
    def split(traj: Trajectory) -> tuple[list[Turn], list[Turn]]:
        agent = [i for i, t in enumerate(traj.turns) if t.is_agent]
        if not agent:
            raise TrajectoryFormatError(f"{source_of(traj)}: trajectory {traj.id or traj.task_id} has no agent turn")
        return traj.turns[:agent[0]], traj.turns[agent[0]:agent[-1] + 1]

    (pc, c), (pr, r) = split(chosen), split(rejected)
    if [(t.role, t.text) for t in pc] != [(t.role, t.text) for t in pr]:
        raise TrajectoryFormatError(f"{source_of(chosen)}: pair {chosen.id or chosen.task_id}: chosen and rejected start "
                                    "from different prompts, which ETO's pair format (one 'prompt') cannot hold")
    conv = lambda turns: [{"from": _TO_FASTCHAT[t.role], "value": t.text} for t in turns]  # noqa: E731
    rid = chosen.metadata["conversation_id"] if "conversation_id" in chosen.metadata else chosen.id or chosen.task_id
    return {"id": rid, "prompt": conv(pc), "chosen": conv(c), "rejected": conv(r)}


def _pair_from_dict(d: Any, where: str) -> Pair:
    if not isinstance(d, dict):
        raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return (Trajectory.from_dict(d.get("chosen"), f"{where}: field 'chosen'"),
            Trajectory.from_dict(d.get("rejected"), f"{where}: field 'rejected'"))


def is_pair_record(d: Any) -> bool:
    """A record of a pair file (either format): it has a side; a missing other side is then an error
    naming that field, not a misread trajectory."""
    return isinstance(d, dict) and ("chosen" in d or "rejected" in d)


def _first_record(path: str | os.PathLike, text: str) -> tuple[str, Any] | None:
    if text.lstrip(_JSON_WS).startswith("["):
        return next(((where, d) for where, _, d in _iter_json_list(path, text)), None)
    return next(_iter_json_lines(path, text), None)


def is_pairs_file(path: str | os.PathLike) -> bool:
    """Whether the file's first record is a preference pair (either format) rather than a trajectory."""
    first = _first_record(path, _read_text(path))
    return first is not None and is_pair_record(first[1])


def read_pairs(path: str | os.PathLike, env_id: str = "") -> list[Pair]:
    """Preference pairs of either format (module docstring), JSONL or a JSON list; the format is
    decided from the first record (`prompt`: ETO's, else ours); errors name file:line and field."""
    text = _read_text(path)
    if not text.strip(_JSON_WS):
        raise TrajectoryFormatError(f"{path}: no pairs (the file is empty)")
    if text.lstrip(_JSON_WS).startswith("["):
        records = [(where, d) for where, _, d in _iter_json_list(path, text)]
    else:
        records = list(_iter_json_lines(path, text))
    if not records:
        raise TrajectoryFormatError(f"{path}: no pairs (the list is empty)")
    where, first = records[0]
    if not is_pair_record(first):
        raise TrajectoryFormatError(f"{where}: not a preference pair: fields 'chosen' and 'rejected' are missing")
    if "prompt" in first:
        pairs = [pair_from_eto(d, env_id, w) for w, d in records]
    else:
        for w, d in records:
            missing = [k for k in ("chosen", "rejected") if not isinstance(d, dict) or k not in d]
            if missing:
                raise TrajectoryFormatError(f"{w}: field {missing[0]!r} is missing (a pair: 'id', 'chosen', 'rejected')")
        pairs = [_pair_from_dict(d, w) for w, d in records]
    for (where, _), (c, r) in zip(records, pairs):
        c.metadata["source_line"] = r.metadata["source_line"] = where.split(": record")[0]
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> None:
    """Our pair format: JSONL of `{"id", "chosen": <trajectory>, "rejected": <trajectory>}`."""
    atomic_write_text(path, "".join(json.dumps({"id": c.id or c.task_id, "chosen": c.to_dict(), "rejected": r.to_dict()})
                                    + "\n" for c, r in pairs))


def write_eto_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> None:
    """ETO's pair format, as its `construct_preference.py` writes it (a JSON list, indent 4)."""
    atomic_write_text(path, json.dumps([pair_to_eto(c, r) for c, r in pairs], indent=4) + "\n")
