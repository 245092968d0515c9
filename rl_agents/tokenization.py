"""Incremental, exact chat-template encoding of trajectories (docs/design.md §3).

The policy's context is built incrementally, never by re-rendering and re-tokenising the whole
chat: `prompt_ids` once, then per turn the ids the engine generated, then the ids of the next
observation. `ChatSegmenter` derives each piece from the tokenizer's own chat template by
rendering a probe conversation and cutting it at an assistant turn's end-of-turn token
(special tokens split the text, so what follows one tokenises the same alone or in context).

Token layout of a `Trajectory` (concatenating `turn.token_ids` over the turns gives exactly
the sequence the policy saw):

* leading system/user turns (before the first agent turn; prompt turns such as ETO's "OK" among them): `prompt_ids(those messages)`, the
  whole context through the assistant generation prompt. Each turn gets its own span when the
  template renders the messages as a token-prefix-consistent sequence (ChatML and Llama-3 do);
  otherwise all prompt ids go on the last leading turn and the earlier ones get `[]`.
* an agent (assistant) turn: exactly the ids generated, including the generated end-of-turn
  token, which carries loss (the model must learn to stop). Built from text as
  `encode(text) + end_of_turn_ids`, so an expert's text-only trajectory encodes like a rollout
  that generated the same ids.
* an observation (user) turn after an agent turn: `close_turn_ids(previous agent ids)` (the
  end-of-turn when generation stopped without it, e.g. at max_new_tokens) followed by
  `observation_ids(text)`: the template's separator (ChatML's newline after `<|im_end|>`), the
  user turn and the next generation prompt. Several non-agent turns in a row share one span
  on the last of them (`[]` on the others).
* a trailing observation (the env's answer to the last action) is left out of the training
  sequence: it carries no loss and nothing after it does. An unclosed final agent turn stays
  unclosed: nothing is appended that the policy did not generate.

Masks: `action_mask` is 1 exactly on agent-turn tokens, `turn_index` is t on the t-th agent turn
and -1 elsewhere, `end_of_turn` is 1 on each agent turn's closing end-of-turn token (batches.py). A rollout worker fills `Turn.token_ids` like this:

    seg = ChatSegmenter(tokenizer)
    for turn, ids in zip(prompt_turns, seg.prompt_turn_ids(messages)): turn.token_ids = ids
    context = seg.prompt_ids(messages)
    generated = engine.generate(context, stop_token_ids=seg.stop_token_ids)   # agent turn ids
    obs_ids = seg.close_turn_ids(generated) + seg.observation_ids(observation)  # next user turn
    context += generated + obs_ids

Text never becomes control tokens. A special-token string written *as text* (`<|im_end|>` in an
env observation, an expert's turn or the system prompt) would tokenise to the real control token
and let that text close turns or open new ones. So message content and agent-turn text are
encoded with special tokens split (`split_special_tokens=True`: ordinary sub-word tokens that
decode to the same text), and only the template's own scaffolding is special. When no content
holds a special-token string the ids are today's plain encoding of the rendering (fast path).
Otherwise the chat is rendered once more with a placeholder per message's content; the real
rendering must equal that one with the contents (or, for templates that `trim`, the stripped
contents) put back, else ValueError (the template rewrites content in a way that cannot be traced);
then the template's text is cut at its special tokens (encoded as their ids) and each text run
between them, content included, is encoded with special tokens split.

Where the tokenizer's pre-tokeniser merges whitespace across the generation-prompt boundary
(e.g. a Llama-3 template on a GPT-2-regex tokenizer: `"\\n\\n"` alone is one token, `"\\n\\nThought"`
is three), re-tokenising the full chat gives different ids than the policy saw; this module gives
the policy's ids (tested).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from rl_agents.batches import EncodedSequence
from rl_agents.trajectory import Trajectory, Turn

_SENTINEL = "RLAGENTSxq7SENTINEL"  # stands for an assistant turn's content in probe renderings
_PLACEHOLDER = "RLAGENTSph{}Q"  # stands for message i's content when tracing what the template wrote
_PLACEHOLDER_RE = re.compile(r"RLAGENTSph(\d+)Q")


class ChatSegmenter:
    """Cuts a tokenizer's chat template into the token spans of an incrementally built context.

    `end_of_turn` overrides the detected end-of-turn token (a token string) for templates that
    close assistant turns with ordinary text.
    """

    def __init__(self, tokenizer, *, end_of_turn: str | None = None):
        self.tokenizer = tokenizer
        added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self._special_tokens = added  # special-token string -> AddedToken (its lstrip/rstrip), if known
        strings = sorted({*tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, strings))) if strings else None
        # end-of-turn detection and the `end_of_turn=` override encode special tokens on purpose
        if end_of_turn is not None:
            self.end_of_turn_ids = self._encode(end_of_turn)
        else:
            first = self._encode(self._after_assistant_turn([{"role": "user", "content": "x"}]))[:1]
            specials = set(tokenizer.all_special_ids) | {
                i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
            if not first or first[0] not in specials:
                raise ValueError("cannot find the end-of-turn token of this chat template (the text after an "
                                 "assistant message does not start with a special token); pass end_of_turn=")
            self.end_of_turn_ids = first
        eos = tokenizer.eos_token_id
        self.stop_token_ids = list(dict.fromkeys(self.end_of_turn_ids + ([eos] if eos is not None else [])))

    # ---- the contract ----------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """system/user messages (and assistant ones inside, ETO's "OK") -> ids of the whole context
        through the assistant generation prompt."""
        _check_prompt(messages, assistant_ok=True)
        return self._chat_ids(messages, add_generation_prompt=True)

    def observation_ids(self, text: str) -> list[int]:
        """ids that follow a finished assistant turn (one ending in end_of_turn_ids): the template's
        separator, the user turn holding `text`, and the next assistant generation prompt."""
        return self.followup_ids([{"role": "user", "content": text}])

    def close_turn_ids(self, generated: list[int]) -> list[int]:
        """Scaffolding to append after a generated turn that did not end with end-of-turn
        (e.g. hit max_new_tokens): the end-of-turn ids; [] if it already ends with them."""
        n = len(self.end_of_turn_ids)
        return [] if list(generated[-n:]) == self.end_of_turn_ids else list(self.end_of_turn_ids)

    # ---- helpers on the same cut ---------------------------------------------------------------
    def followup_ids(self, messages: list[dict]) -> list[int]:
        """Like `observation_ids` for any run of system/user messages after an assistant turn."""
        _check_prompt(messages)
        if not self._has_special(messages):
            ids = self._encode(self._after_assistant_turn(messages))
        else:
            probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}, *messages]
            pieces = self._pieces(probe, add_generation_prompt=True)
            cut = next(k for k, (_, i) in enumerate(pieces) if i == 1)  # right after the assistant's content
            ids = self._encode_pieces(pieces[cut + 1:])
        n = len(self.end_of_turn_ids)
        if ids[:n] != self.end_of_turn_ids:
            raise ValueError(f"the chat template does not close an assistant turn with {self.end_of_turn_ids} "
                             f"before the next message (got {ids[:n]}); pass end_of_turn=")
        return ids[n:]

    def action_ids(self, text: str) -> list[int]:
        """Ids of an agent turn given as text: what a policy generating `text` then stopping emits
        (special-token strings in `text` stay text)."""
        return self._encode_text(text) + self.end_of_turn_ids

    def prompt_turn_ids(self, messages: list[dict]) -> list[list[int]]:
        """`prompt_ids(messages)` split into one span per message (see module docstring)."""
        full = self.prompt_ids(messages)
        safe = self._has_special(messages)  # the prefixes take the same path as the whole
        spans, start = [], 0
        for i in range(1, len(messages)):
            try:
                prefix = self._chat_ids(messages[:i], add_generation_prompt=False, safe=safe)
            except Exception:  # templates may reject a partial conversation (e.g. system only)
                prefix = None
            if prefix is None or len(prefix) < start or full[:len(prefix)] != prefix:
                return [[] for _ in messages[:-1]] + [full]
            spans.append(full[start:len(prefix)])
            start = len(prefix)
        return spans + [full[start:]]

    def _encode(self, text: str) -> list[int]:
        """Plain `encode`: special-token strings in `text` become special tokens (scaffolding only)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_text(self, text: str) -> list[int]:
        """Text -> ids with special-token strings in it encoded as ordinary sub-word tokens."""
        if not self._has_special_text(text):
            return self._encode(text)
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _has_special_text(self, text) -> bool:
        return self._special_re is not None and isinstance(text, str) and self._special_re.search(text) is not None

    def _has_special(self, messages: Sequence[dict]) -> bool:
        return any(self._has_special_text(m.get("content")) for m in messages)

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool, safe: bool | None = None) -> list[int]:
        """Ids of the rendering of `messages`, content kept as text (fast path: no special string in it)."""
        if not (self._has_special(messages) if safe is None else safe):
            return self._encode(self._render(messages, add_generation_prompt))
        return self._encode_pieces(self._pieces(messages, add_generation_prompt))

    def _pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, int]]:
        """The rendering of `messages` as [(text, i)]: template text (i = -1) and message i's content as
        the template wrote it, checked to concatenate to the real rendering."""
        contents = [m.get("content") for m in messages]
        if not all(isinstance(c, str) for c in contents):
            raise ValueError("cannot keep special-token strings as text in non-string message content")
        if any(_PLACEHOLDER_RE.search(c) for c in contents):
            raise ValueError(f"message content contains the reserved placeholder pattern {_PLACEHOLDER_RE.pattern!r}")
        real = self._render(messages, add_generation_prompt)
        traced = self._render([{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)],
                              add_generation_prompt)
        parts = _PLACEHOLDER_RE.split(traced)  # template text, index, template text, ..., template text
        literals = parts[0::2]
        if [int(i) for i in parts[1::2]] != list(range(len(messages))):
            raise ValueError("cannot keep special-token strings in message content as text: the chat template does "
                             "not write each message's content exactly once, in order")
        written = _align(real, literals, contents)
        if written is None:
            raise ValueError("cannot keep special-token strings in message content as text: the chat template "
                             "rewrites the content (beyond stripping whitespace), so the text cannot be traced")
        pieces = [(literals[0], -1)]
        for i, text in enumerate(written):
            pieces += [(text, i), (literals[i + 1], -1)]
        return pieces

    def _encode_pieces(self, pieces: Sequence[tuple[str, int]]) -> list[int]:
        """Template text cut at its special tokens (their ids); each text run between them, content
        included, encoded with special tokens split."""
        runs: list[str | tuple[str]] = [""]  # text runs, and (special token,) between them
        for text, i in pieces:
            parts = [text] if i >= 0 else self._special_re.split(text) if self._special_re else [text]
            specials = [] if i >= 0 else self._special_re.findall(text) if self._special_re else []
            runs[-1] += parts[0]
            for tok, after in zip(specials, parts[1:]):
                runs += [(tok,), after]
        for k in range(1, len(runs), 2):  # what the tokenizer does around an lstrip/rstrip special token
            added = self._special_tokens.get(runs[k][0])
            if added is not None and added.lstrip:
                runs[k - 1] = runs[k - 1].rstrip()
            if added is not None and added.rstrip:
                runs[k + 1] = runs[k + 1].lstrip()
        ids: list[int] = []
        for k, run in enumerate(runs):
            if k % 2:
                ids.append(self.tokenizer.convert_tokens_to_ids(run[0]))
            elif run:
                ids += self.tokenizer.encode(run, add_special_tokens=False, split_special_tokens=True)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _after_assistant_turn(self, messages: list[dict]) -> str:
        """Rendered text after an assistant turn's content, through `messages` + generation prompt."""
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}, *messages]
        text = self._render(probe, add_generation_prompt=True)
        return text[text.index(_SENTINEL) + len(_SENTINEL):]


def _align(real: str, literals: list[str], contents: list[str]) -> list[str] | None:
    """How the template wrote each content: `real == literals[0] + w[0] + literals[1] + ... + literals[-1]`
    with each w[i] the content or the content stripped (`trim`); None if there is no such w."""
    def match(i: int, pos: int) -> list[str] | None:
        if not real.startswith(literals[i], pos):
            return None
        pos += len(literals[i])
        if i == len(contents):
            return [] if pos == len(real) else None
        for written in dict.fromkeys((contents[i], contents[i].strip())):
            if real.startswith(written, pos):
                rest = match(i + 1, pos + len(written))
                if rest is not None:
                    return [written, *rest]
        return None
    return match(0, 0)


def _check_prompt(messages: Sequence[dict], *, assistant_ok: bool = False) -> None:
    """system/user messages; with `assistant_ok` (a prompt) also assistant messages before the last one
    (ETO's "OK" acknowledgement, a prompt turn)."""
    if not messages:
        raise ValueError("need at least one system/user message")
    roles = ("system", "user", "assistant") if assistant_ok else ("system", "user")
    bad = [m.get("role") for m in messages if m.get("role") not in roles]
    if bad or messages[-1].get("role") == "assistant":
        raise ValueError(f"prompt/observation messages must be system or user"
                         f"{' (assistant ones only before the last)' if assistant_ok else ''}, got role(s) "
                         f"{bad or [messages[-1].get('role')]}")


def _messages(turns: Sequence[Turn]) -> list[dict]:
    return [{"role": t.role, "content": t.text} for t in turns]


def tokenize_rollout_turns(turns: Sequence[Turn], segmenter: ChatSegmenter) -> list[list[int]]:
    """The token ids of every turn under the module's layout, trailing observations included.

    Stored `token_ids` are used as they are (agent turns one by one; a run of non-agent turns
    when all of its turns have them); everything else is built from text by `segmenter`.
    """
    first = next((i for i, t in enumerate(turns) if t.is_agent), len(turns))
    if first == 0:
        raise ValueError("a trajectory must start with its prompt (system/user turns) before the first agent turn")
    out: list[list[int]] = []
    prev_action: list[int] = []
    i = 0
    while i < len(turns):
        if turns[i].is_agent:
            if i > 0 and turns[i - 1].role == "assistant":
                raise ValueError(f"turns {i - 1} and {i} are consecutive assistant turns; "
                                 "an observation must separate them")
            t = turns[i]
            prev_action = list(t.token_ids) if t.token_ids is not None else segmenter.action_ids(t.text)
            out.append(prev_action)
            i += 1
            continue
        j = i
        while j < len(turns) and not turns[j].is_agent:
            j += 1
        run = turns[i:j]
        if all(t.token_ids is not None for t in run):
            out.extend(list(t.token_ids) for t in run)
        elif i == 0:
            out.extend(segmenter.prompt_turn_ids(_messages(run)))
        else:
            ids = segmenter.close_turn_ids(prev_action) + segmenter.followup_ids(_messages(run))
            out.extend([[] for _ in run[:-1]] + [ids])
        i = j
    return out


def with_token_ids(traj: Trajectory, segmenter: ChatSegmenter) -> Trajectory:
    """A copy of `traj` whose every turn has `token_ids` (a text-only expert made token-exact)."""
    ids = tokenize_rollout_turns(traj.turns, segmenter)
    turns = [dataclasses.replace(t, token_ids=i) for t, i in zip(traj.turns, ids)]
    return Trajectory(traj.task_id, traj.env_id, turns, traj.reward, traj.success, traj.id, dict(traj.metadata))


def _last_agent_turn(turns: Sequence[Turn]) -> int:
    last = max((i for i, t in enumerate(turns) if t.is_agent), default=-1)
    if last < 0:
        raise ValueError("the trajectory has no agent (assistant) turn: nothing to train on")
    return last


def end_of_turn_marks(ids: Sequence[int], segmenter: ChatSegmenter) -> list[int]:
    """1 on an agent turn's closing end-of-turn tokens: its trailing `end_of_turn_ids`, or a final stop
    token (a generated EOS); 0 elsewhere. Text never encodes to these special tokens (module doc), so
    they are scaffolding the policy generated, never reply text."""
    ids = list(ids)
    n = len(segmenter.end_of_turn_ids)
    k = n if n and ids[-n:] == segmenter.end_of_turn_ids else int(bool(ids) and ids[-1] in segmenter.stop_token_ids)
    return [0] * (len(ids) - k) + [1] * k


def encode_trajectory(traj: Trajectory, segmenter: ChatSegmenter) -> EncodedSequence:
    """The training sequence of a trajectory: every agent turn carries loss (turn t = t-th agent turn)."""
    turns = traj.turns[:_last_agent_turn(traj.turns) + 1]  # drop the trailing observation(s)
    input_ids: list[int] = []
    action_mask: list[int] = []
    turn_index: list[int] = []
    end_of_turn: list[int] = []
    t = 0
    for turn, ids in zip(turns, tokenize_rollout_turns(turns, segmenter)):
        agent = turn.is_agent
        input_ids += ids
        action_mask += [int(agent)] * len(ids)
        turn_index += [t if agent else -1] * len(ids)
        end_of_turn += end_of_turn_marks(ids, segmenter) if agent else [0] * len(ids)
        t += agent
    if action_mask[0]:
        raise ValueError("the trajectory's prompt encodes to no tokens; an agent token cannot come first")
    return EncodedSequence(input_ids, action_mask, turn_index, end_of_turn)


def encode_step(traj: Trajectory, step: int, action_ids_or_text: list[int] | str,
                segmenter: ChatSegmenter) -> EncodedSequence:
    """Expert prefix (all turns before agent turn `step`) + one action, which alone carries loss (turn 0).

    The action is the ids an engine generated (kept as they are) or a text (encoded plus end-of-turn).
    """
    agent_idx = [i for i, t in enumerate(traj.turns) if t.is_agent]
    if not 0 <= step < len(agent_idx):
        raise IndexError(f"step {step} out of range: the trajectory has {len(agent_idx)} agent turns")
    prefix = [i for ids in tokenize_rollout_turns(traj.turns[:agent_idx[step]], segmenter) for i in ids]
    if isinstance(action_ids_or_text, str):
        action = segmenter.action_ids(action_ids_or_text)
    else:
        action = [int(i) for i in action_ids_or_text]
    if not action:
        raise ValueError("the action has no tokens")
    n, m = len(prefix), len(action)
    return EncodedSequence(prefix + action, [0] * n + [1] * m, [-1] * n + [0] * m,
                           [0] * n + end_of_turn_marks(action, segmenter))
