"""Data builders of the algorithms: pure functions from trajectories to training examples.

* `trajectory_pairs` — ETO §3.2 / Alg. 1: pair each explored trajectory with the expert
  trajectory of the same task by final reward (higher = chosen); pairs with equal rewards are
  dropped (both succeeded, or both failed equally). Optionally cap the rejected side's length
  (`max_rejected_steps`), as ETO's released code does, keeping whole turns so token ids stay exact.
* `is_noisy` — DMPO §5 "noisy" vs "clean": SFT agents "generate trajectories with repeated actions
  or meaningless words". Clean = drop those from the lose side; noisy = keep them.
* `step_prefixes` — StepAgent §3 inspection: cut an expert trajectory before each of its actions,
  giving the expert prefix (history up to step i) and the expert's action there.
* `successful` — RFT: the agent's own trajectories that reached full reward.
* `encode_within_context` / `within_context` — encode examples and drop the sequences longer
  than the policy's context (`context_length`), with one warning saying how many and where from;
  a cheap character-count bound (`min_tokens`) skips tokenizing a megabyte turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rl_agents.prompting import parse_action
from rl_agents.trajectory import Trajectory, Turn, source_of

logger = logging.getLogger(__name__)


def trajectory_pairs(explored: Iterable[Trajectory], experts: dict[str, Trajectory], *,
                     max_rejected_steps: int | None = None, min_margin: float = 0.0) -> list[tuple[Trajectory, Trajectory]]:
    """(chosen, rejected) pairs: each explored trajectory vs the expert of its task, by final reward.

    Explored trajectories without an expert, with an error, or within `min_margin` of the
    expert's reward are skipped.
    """
    pairs = []
    for traj in explored:
        expert = experts.get(traj.task_id)
        if expert is None or traj.metadata.get("error") or abs(expert.reward - traj.reward) <= min_margin:
            continue
        chosen, rejected = (expert, traj) if expert.reward > traj.reward else (traj, expert)
        if max_rejected_steps is not None:
            rejected = truncate_steps(rejected, max_rejected_steps)
        pairs.append((chosen, rejected))
    return pairs


def truncate_steps(traj: Trajectory, max_steps: int) -> Trajectory:
    """The trajectory through its first `max_steps` agent turns (and the observation after the last)."""
    if traj.num_steps <= max_steps:
        return traj
    turns, seen = [], 0
    for turn in traj.turns:
        if turn.is_agent:
            if seen == max_steps:
                break
            seen += 1
        turns.append(turn)
    return dataclasses.replace(traj, turns=turns, metadata={**traj.metadata, "truncated_to_steps": max_steps})


def is_noisy(traj: Trajectory, *, max_repeats: int = 3) -> bool:
    """DMPO's noisy lose trajectory: an action repeated `max_repeats` times in a row, an output with
    no `Action:` line or an empty action, or mostly non-text characters."""
    actions = []
    for turn in traj.agent_turns:
        text = turn.text
        if "Action:" not in text or not parse_action(text):
            return True
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if letters < 0.6 * len(text):
            return True
        actions.append(parse_action(text).lower())
    run = 1
    for prev, cur in zip(actions, actions[1:]):
        run = run + 1 if cur == prev else 1
        if run >= max_repeats:
            return True
    return False


@dataclass(frozen=True)
class StepPrompt:
    """An expert prefix (every turn before agent turn `step`) and the expert's action at `step`."""

    prefix: Trajectory
    step: int
    expert_turn: Turn


def step_prefixes(expert: Trajectory) -> list[StepPrompt]:
    """Inspection points of StepAgent: one per agent turn of the expert trajectory."""
    out, step = [], 0
    for i, turn in enumerate(expert.turns):
        if turn.is_agent:
            prefix = dataclasses.replace(expert, turns=expert.turns[:i], metadata={**expert.metadata, "prefix_step": step})
            out.append(StepPrompt(prefix=prefix, step=step, expert_turn=turn))
            step += 1
    return out


def successful(trajectories: Iterable[Trajectory], threshold: float = 1.0) -> list[Trajectory]:
    """RFT data: the agent's own trajectories that reached `threshold` final reward, without errors."""
    return [t for t in trajectories if t.reward >= threshold - 1e-9 and not t.metadata.get("error")]


# ---- sequence length vs the policy's context ---------------------------------------------------
def context_length(model: str | os.PathLike) -> int | None:
    """The context of the checkpoint `model` (a directory): `max_position_embeddings` of its
    config.json (`n_positions` / `max_sequence_length` for models that name it so); None if unknown."""
    from rl_agents import storage

    try:
        cfg = json.loads(storage.read_text(storage.join(model, "config.json")))  # a path or a URI
    except (FileNotFoundError, ValueError):
        return None
    except OSError:
        if storage.is_uri(model):
            raise  # the store cannot be read: not "no context length", which would skip the length check
        return None
    cfg = {**cfg.get("text_config", {}), **cfg} if isinstance(cfg.get("text_config"), dict) else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


def longest_token_chars(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry: no token covers more characters of
    a text (byte-level vocabularies spell a token with one character per byte)."""
    return max((len(tok) for tok in tokenizer.get_vocab()), default=1) or 1


def min_tokens(turns: Iterable[Turn], chars_per_token: int) -> int:
    """A lower bound on the tokens `turns` encode to, without tokenizing: an agent turn's stored ids
    are used as they are; any other turn has at least len(text) / (2 * chars_per_token) tokens (the
    factor 2 leaves room for normalisers that merge characters) or, with stored ids, as many."""
    n = 0
    for t in turns:
        if t.role == "assistant" and t.token_ids is not None:
            n += len(t.token_ids)
        else:
            text_bound = len(t.text) // (2 * chars_per_token)
            n += min(text_bound, len(t.token_ids)) if t.token_ids is not None else text_bound
    return n


def trajectory_min_tokens(traj: Trajectory, chars_per_token: int) -> int:
    """`min_tokens` of what `encode_trajectory` encodes: the turns through the last agent turn."""
    last = max((i for i, t in enumerate(traj.turns) if t.is_agent), default=len(traj.turns) - 1)
    return min_tokens(traj.turns[:last + 1], chars_per_token)


def sequence_length(example: Any) -> int:
    """Tokens of an example's longest sequence: an `EncodedSequence`, an object with `.sequence`
    (`PPOExample`) or a tuple/list of them (a preference pair)."""
    if isinstance(example, (tuple, list)):
        return max((sequence_length(e) for e in example), default=0)
    if hasattr(example, "sequence"):
        return len(example.sequence)
    return len(example)


def within_context(examples: Sequence, sources: Sequence[str], max_length: int | None, *,
                   what: str = "training examples") -> list[int]:
    """Indices of the `examples` whose every sequence fits `max_length` tokens (None: all of them).
    The others are dropped with one warning (how many, where they came from: `sources[i]`); if
    none fits, ValueError, before any training starts."""
    keep = [i for i, e in enumerate(examples) if max_length is None or sequence_length(e) <= max_length]
    _report_dropped([(sources[i], f"{sequence_length(examples[i])} tokens")
                     for i in sorted(set(range(len(examples))) - set(keep))], len(examples), max_length, what)
    return keep


def encode_within_context(items: Sequence, encode: Callable[[Any], Any], max_length: int | None, *,
                          source: Callable[[Any], str], lower_bound: Callable[[Any], int] | None = None,
                          what: str = "training examples") -> list:
    """`[encode(item) for item in items]` without the examples longer than `max_length` tokens
    (see `within_context`). `lower_bound(item)` (e.g. `trajectory_min_tokens`), when given, is a
    token count the item cannot be under: items whose bound is already over the context are
    dropped without being tokenized (a 10 MB observation never reaches the tokenizer)."""
    kept, dropped = [], []
    for item in items:
        if max_length is not None and lower_bound is not None:
            bound = lower_bound(item)
            if bound > max_length:
                dropped.append((source(item), f"at least {bound} tokens"))
                continue
        example = encode(item)
        n = sequence_length(example)
        if max_length is not None and n > max_length:
            dropped.append((source(item), f"{n} tokens"))
        else:
            kept.append(example)
    _report_dropped(dropped, len(items), max_length, what)
    return kept


def _report_dropped(dropped: list[tuple[str, str]], total: int, max_length: int | None, what: str) -> None:
    """One warning line for the dropped examples (the first five named); ValueError if all were."""
    if not dropped:
        return
    shown = ", ".join(f"{src} ({size})" for src, size in dropped[:5])
    more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
    msg = (f"{len(dropped)} of {total} {what} are longer than the policy's context ({max_length} tokens) "
           f"and were dropped: {shown}{more}")
    if len(dropped) == total:
        raise ValueError(f"every one of the {total} {what} is longer than the policy's context "
                         f"({max_length} tokens): {shown}{more}; nothing left to train on")
    logger.warning(msg)


def step_source(expert: Trajectory, step: int) -> str:
    """Where a step example came from: its expert trajectory's `source_of`, and the step."""
    return f"{source_of(expert)} step {step}"


def encode_trajectories(trajectories: Sequence[Trajectory], segmenter, max_length: int | None, *,
                        what: str = "trajectories") -> list:
    """`encode_trajectory` of each trajectory that fits `max_length` tokens (`encode_within_context`;
    dropped ones are named by `source_of`: file:line, or task)."""
    from rl_agents.tokenization import encode_trajectory

    cpt = longest_token_chars(segmenter.tokenizer)
    return encode_within_context(trajectories, lambda t: encode_trajectory(t, segmenter), max_length, source=source_of,
                                 lower_bound=lambda t: trajectory_min_tokens(t, cpt), what=what)


def encode_pairs(pairs: Sequence[tuple[Trajectory, Trajectory]], segmenter, max_length: int | None, *,
                 what: str = "preference pairs") -> list:
    """(chosen, rejected) `encode_trajectory` pairs whose both sequences fit `max_length` tokens."""
    from rl_agents.tokenization import encode_trajectory

    cpt = longest_token_chars(segmenter.tokenizer)
    return encode_within_context(pairs, lambda p: tuple(encode_trajectory(t, segmenter) for t in p), max_length,
                                 source=lambda p: f"{source_of(p[0])} / {source_of(p[1])}",
                                 lower_bound=lambda p: max(trajectory_min_tokens(t, cpt) for t in p), what=what)
