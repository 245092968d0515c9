"""Typed training batches.

Every batch is built from `TokenBatch`: right-padded token ids with an agent-token mask and,
per token, the index of the agent turn it belongs to. Per-turn log-prob sums, which all the
preference losses take, are then one `scatter_add` away (`turn_logps`).

Conventions, fixed for every producer and consumer:
* `action_mask[b, j] = 1` iff `input_ids[b, j]` is a token the agent generated (it carries loss).
  Its log-prob is predicted by the logits at position j-1 (`token_logps` does the shift), so
  `action_mask[:, 0]` is always 0.
* `turn_index[b, j]` = t in 0..T-1 for the agent turn of that token, -1 for every other token.
  For a step pair (shared expert prefix + one action), only the final action is turn 0 and the
  prefix's agent turns carry no loss.
* `num_turns[b]` = number of agent turns that carry loss in sequence b; `turn_mask()` gives (B, T).
* `end_of_turn[b, j] = 1` iff `input_ids[b, j]` is an agent turn's closing end-of-turn token (ChatML's
  `<|im_end|>`, Llama-3's `<|eot_id|>`, a generated EOS): part of the turn, with its loss, but
  told apart from the reply so that a loss can weight it on its own (DMPO's released trainer gives
  it weight 1, DMPO's `loss.end_of_turn`). `turn_logps(..., parts=True)` sums the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class EncodedSequence:
    """One encoded sequence before collation (a trajectory, or a prefix + one action).

    Lists of equal length; `action_mask`/`turn_index` follow the module conventions.
    """

    input_ids: list[int]
    action_mask: list[int]
    turn_index: list[int]
    end_of_turn: list[int] | None = None
    """1 on agent turns' closing end-of-turn tokens (module conventions); None = no such marks."""

    @property
    def num_turns(self) -> int:
        return max(self.turn_index, default=-1) + 1

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    action_mask: torch.Tensor  # (B, L) bool, 1 = agent token (carries loss)
    turn_index: torch.Tensor  # (B, L) long, agent turn of the token or -1
    num_turns: torch.Tensor  # (B,) long
    end_of_turn: torch.Tensor | None = None  # (B, L) bool, 1 = a turn's closing end-of-turn token

    @property
    def max_turns(self) -> int:
        return int(self.num_turns.max().item()) if self.num_turns.numel() else 0

    def turn_mask(self, num_turns: int | None = None) -> torch.Tensor:
        """(B, T) float, 1 for real agent turns."""
        t = self.max_turns if num_turns is None else num_turns
        return (torch.arange(t, device=self.num_turns.device)[None, :] < self.num_turns[:, None]).float()

    def to(self, device) -> TokenBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class PairBatch:
    """Chosen vs rejected trajectories (ETO/DPO/DMPO), or a step pair (Step-DPO, T = 1).

    `ref_*` are the reference policy's per-turn log-prob sums, reply and end-of-turn apart
    (`turn_logps(..., parts=True)`), precomputed once per dataset (None until filled, or when the
    reference is computed on the fly: LoRA adapter disabled).
    """

    chosen: TokenBatch
    rejected: TokenBatch
    ref_chosen: torch.Tensor | None = None  # (B, T_chosen, 2) float
    ref_rejected: torch.Tensor | None = None  # (B, T_rejected, 2) float

    def to(self, device) -> PairBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return PairBatch(self.chosen.to(device), self.rejected.to(device), move(self.ref_chosen), move(self.ref_rejected))

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class PPOExample:
    """One PPO training example before collation: a sequence and its advantage.

    StepAgent-inverse: an expert prefix + one sampled agent action (the action is the only agent
    turn); PPO baseline: a whole explored trajectory (every agent turn). `old_logps` (per token,
    aligned with `sequence.input_ids`, 0 off the agent tokens) are the log-probs of the policy the
    update starts from: None until the training loop precomputes them with that policy (the same
    forward as the loss, so the ratio is exactly 1 before the first optimizer step). `ref_logps`:
    optional per-token reference log-probs for the KL penalty, same alignment.
    `advantage`: one number for every agent token of the sequence, or one per token (same
    alignment; GiGPO gives each agent turn its own).
    """

    sequence: EncodedSequence
    advantage: float | list[float]
    reward: float
    old_logps: list[float] | None = None
    ref_logps: list[float] | None = None

    def __len__(self) -> int:
        return len(self.sequence)


@dataclass
class PPOBatch:
    """PPO examples collated: one-step episodes (StepAgent-inverse) or whole trajectories (PPO baseline).

    `old_logps`/`ref_logps` are per token (B, L), aligned with `tokens.input_ids` (0 off the
    action); `rewards` are per sequence (B,), `advantages` too (B,), or per token (B, L) when any
    example has per-token ones.
    """

    tokens: TokenBatch
    old_logps: torch.Tensor  # (B, L)
    advantages: torch.Tensor  # (B,) or (B, L)
    rewards: torch.Tensor  # (B,)
    ref_logps: torch.Tensor | None = None  # (B, L)

    def to(self, device) -> PPOBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return PPOBatch(self.tokens.to(device), self.old_logps.to(device), self.advantages.to(device),
                        self.rewards.to(device), move(self.ref_logps))

    def __len__(self) -> int:
        return len(self.tokens)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits, (B, L) ids -> (B, L) log p(input_ids[j] | ids[<j]); position 0 is 0."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    return torch.nn.functional.pad(picked, (1, 0))


def turn_logps(tok_logps: torch.Tensor, batch: TokenBatch, num_turns: int | None = None, *,
               parts: bool = False) -> torch.Tensor:
    """Sum token log-probs per agent turn: (B, L) -> (B, T). Non-agent tokens contribute exactly 0.

    `parts=True`: (B, T, 2), each turn's reply tokens `[..., 0]` and its end-of-turn tokens `[..., 1]`
    summed apart (`batch.end_of_turn`; without it every agent token is reply); `.sum(-1)` is (B, T)."""
    t = batch.max_turns if num_turns is None else num_turns
    masked = tok_logps * batch.action_mask.to(tok_logps.dtype)
    slots = batch.turn_index.clamp(min=0)  # (B, L)
    width = max(t, 1)
    if parts:
        eot = batch.end_of_turn if batch.end_of_turn is not None else torch.zeros_like(batch.action_mask)
        slots = slots * 2 + eot.long()  # turn t: reply -> 2t, end-of-turn -> 2t + 1
        width *= 2
    out = torch.zeros(tok_logps.shape[0], width, dtype=tok_logps.dtype, device=tok_logps.device)
    out = out.scatter_add(1, slots, masked)
    if parts:
        return out.view(out.shape[0], -1, 2)[:, :t]
    return out[:, :t]
