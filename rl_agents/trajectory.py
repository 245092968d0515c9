"""Trajectories: the record of one episode, token-exact when a rollout produced it (DESIGN §5).

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
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
        return [t for t in self.turns if t.role == "assistant"]

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
        """ETO/FastChat conversation record (text only; readable by FastChat, ETO, TRL tooling)."""
        conv = [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[t.role], "value": t.text}
                for t in self.turns]
        return {"id": self.id or self.task_id, "task_id": self.task_id, "env_id": self.env_id,
                "reward": self.reward, "success": self.success, "conversations": conv}

    @classmethod
    def from_conversation(cls, d: Any, env_id: str = "", where: str = "record") -> Trajectory:
        """Read `{"id", "conversations": [{"from", "value"}]}` or `{"id", "messages": [{"role", "content"}]}`."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if "conversations" in d:
            key, rk, vk = "conversations", "from", "value"
        elif "messages" in d:
            key, rk, vk = "messages", "role", "content"
        else:
            raise TrajectoryFormatError(f"{where}: field 'conversations' (or 'messages') is missing")
        items = d[key]
        if not isinstance(items, list) or not items:
            raise TrajectoryFormatError(f"{where}: field {key!r} must be a non-empty list")
        turns = []
        for i, m in enumerate(items):
            fw = f"{where}: field '{key}[{i}]"
            if not isinstance(m, dict):
                raise TrajectoryFormatError(f"{fw}' must be an object")
            # FastChat files sometimes use role/content inside "conversations" and vice versa.
            r = m.get(rk, m.get("role", m.get("from")))
            v = m.get(vk, m.get("content", m.get("value")))
            if r not in _FASTCHAT_ROLE:
                raise TrajectoryFormatError(f"{fw}.{rk}' must be one of {sorted(_FASTCHAT_ROLE)}, got {r!r}")
            if not isinstance(v, str):
                raise TrajectoryFormatError(f"{fw}.{vk}' must be a string")
            turns.append(Turn(role=_FASTCHAT_ROLE[r], text=v))
        rid = str(d.get("id", ""))
        reward = d.get("reward", 1.0)
        if not isinstance(reward, (int, float)) or isinstance(reward, bool):
            raise TrajectoryFormatError(f"{where}: field 'reward' must be a number, got {reward!r}")
        return cls(task_id=str(d.get("task_id", rid)), env_id=str(d.get("env_id", env_id)), turns=turns,
                   reward=float(reward), success=bool(d.get("success", reward >= 1.0)), id=rid,
                   metadata={"source": "conversation"})


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
    return Turn(role=role, text=t["text"], reward=float(reward), token_ids=ids,
                logprobs=[float(x) for x in lps] if lps is not None else None)


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
