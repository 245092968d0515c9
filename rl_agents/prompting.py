"""ReAct prompting: the messages an agent sees and how its output becomes an env action.

The agent writes `Thought: ...\nAction: ...`; the env receives only the action (docs/design.md §2).
The whole model output (thought + action) is the agent turn that training sees.
"""

from __future__ import annotations

import re

import gymnasium as gym

SYSTEM_TEMPLATE = (
    "You are an agent acting in a text environment. Each turn, reply with exactly two lines:\n"
    "Thought: <your short reasoning>\n"
    "Action: <one action>\n"
    "{action_help}"
)

_ACTION_RE = re.compile(r"Action:[ \t]*(.*)")


def system_prompt(env: gym.Env) -> str:
    help_text = getattr(env.unwrapped, "action_help", "")
    return SYSTEM_TEMPLATE.format(action_help=help_text).rstrip() + "\n"


def initial_messages(env: gym.Env, observation: str) -> list[dict[str, str]]:
    """The chat an episode starts from: system prompt (format + action grammar), first observation."""
    return [{"role": "system", "content": system_prompt(env)}, {"role": "user", "content": observation}]


def format_react(thought: str, action: str) -> str:
    """The agent-turn text for a thought and an action (what experts 'say')."""
    return f"Thought: {thought}\nAction: {action}" if thought else f"Action: {action}"


def parse_action(text: str) -> str:
    """The env action in a model output: the first line after the last `Action:`.

    With no `Action:` at all, the whole output (stripped) goes to the env, which answers
    with its invalid-action feedback; nothing the model writes is ever evaluated.
    """
    matches = _ACTION_RE.findall(text)
    if matches:
        return matches[-1].strip()
    return text.strip()
