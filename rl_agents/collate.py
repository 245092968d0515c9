"""Collation of encoded sequences into typed batches, and length grouping to cut padding.

Right padding only: every real token keeps its position (0..len-1) and, with a causal mask, never
attends to padding, so a padded batch gives each sequence exactly its unpadded log-probs
(tested on a tiny Llama with sdpa attention, fp32). Padding is marked by `attention_mask == 0`;
nothing downstream compares ids with `pad_id`. Rows that share long prefixes are packed at the
forward (`rl_agents.packing`, used by `rl_agents.train.forward.Forward`); unrelated sequences
are not packed together (padding waste is already small with `length_grouped_batches`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from rl_agents.batches import EncodedSequence, PairBatch, PPOBatch, PPOExample, TokenBatch


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def collate_sequences(seqs: Sequence[EncodedSequence], pad_id: int, pad_to_multiple_of: int | None = None,
                      pad_to_length: int | None = None) -> TokenBatch:
    """Right-pad sequences into a `TokenBatch`: attention_mask, action_mask and end_of_turn 0, turn_index -1
    on padding.

    `pad_to_length` pads to at least that many tokens (to give two batches one shape).
    """
    if not seqs:
        raise ValueError("cannot collate an empty list of sequences")
    for k, s in enumerate(seqs):
        if not (len(s.input_ids) == len(s.action_mask) == len(s.turn_index)) or not s.input_ids:
            raise ValueError(f"sequence {k}: input_ids, action_mask and turn_index must be non-empty "
                             "and of equal length")
    length = _padded_length(max(max(len(s) for s in seqs), pad_to_length or 0), pad_to_multiple_of)
    b = len(seqs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    action_mask = torch.zeros((b, length), dtype=torch.bool)
    turn_index = torch.full((b, length), -1, dtype=torch.long)
    end_of_turn = torch.zeros((b, length), dtype=torch.bool)
    for k, s in enumerate(seqs):
        n = len(s)
        input_ids[k, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[k, :n] = 1
        action_mask[k, :n] = torch.tensor(s.action_mask, dtype=torch.bool)
        turn_index[k, :n] = torch.tensor(s.turn_index, dtype=torch.long)
        if s.end_of_turn is not None:
            if len(s.end_of_turn) != n:
                raise ValueError(f"sequence {k}: end_of_turn must have one entry per token")
            end_of_turn[k, :n] = torch.tensor(s.end_of_turn, dtype=torch.bool)
    num_turns = torch.tensor([s.num_turns for s in seqs], dtype=torch.long)
    return TokenBatch(input_ids, attention_mask, action_mask, turn_index, num_turns, end_of_turn & action_mask)


def _per_turn(ref, batch: TokenBatch, name: str) -> torch.Tensor | None:
    """Reference per-turn log-probs, reply and end-of-turn apart (`turn_logps(..., parts=True)`) ->
    (B, T, 2) float, T = batch.max_turns, 0 past each row's turns. A row may also give one number per
    turn (the whole turn's sum): it is taken as the reply part, with 0 for the end-of-turn part."""
    if ref is None:
        return None
    b, t = len(batch), batch.max_turns
    if isinstance(ref, torch.Tensor):
        if ref.dim() != 3 or ref.shape[0] != b or ref.shape[1] < t or ref.shape[2] != 2:
            raise ValueError(f"{name}: expected shape ({b}, >={t}, 2), got {tuple(ref.shape)}")
        return ref[:, :t].float()
    if len(ref) != b:
        raise ValueError(f"{name}: expected {b} rows, got {len(ref)}")
    out = torch.zeros(b, t, 2, dtype=torch.float32)
    for k, (row, n) in enumerate(zip(ref, batch.num_turns.tolist())):
        row = torch.as_tensor(row, dtype=torch.float32)
        if row.dim() == 1:  # whole turns
            row = torch.stack([row, torch.zeros_like(row)], dim=-1)
        if tuple(row.shape) != (n, 2):
            raise ValueError(f"{name}[{k}]: expected {n} per-turn [reply, end-of-turn] values (one pair per agent "
                             f"turn), got shape {tuple(row.shape)}")
        out[k, :n] = row
    return out


def collate_pairs(chosen: Sequence[EncodedSequence], rejected: Sequence[EncodedSequence], pad_id: int,
                  ref_chosen=None, ref_rejected=None, pad_to_multiple_of: int | None = None) -> PairBatch:
    """Chosen/rejected sequences -> `PairBatch`, both sides padded to one length so a trainer can
    run them as one concatenated forward pass. `ref_*`: (B, T, 2) tensors or per-row lists of
    per-turn [reply, end-of-turn] reference log-prob sums."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen vs {len(rejected)} rejected sequences")
    longest = max(len(s) for s in [*chosen, *rejected])
    c = collate_sequences(chosen, pad_id, pad_to_multiple_of, pad_to_length=longest)
    r = collate_sequences(rejected, pad_id, pad_to_multiple_of, pad_to_length=longest)
    return PairBatch(c, r, _per_turn(ref_chosen, c, "ref_chosen"), _per_turn(ref_rejected, r, "ref_rejected"))


def _per_token(rows: Sequence[list[float] | None], batch: TokenBatch, name: str) -> torch.Tensor:
    """Per-token values aligned with each sequence -> (B, L) float32, right-padded with 0."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    for k, row in enumerate(rows):
        n = int(batch.attention_mask[k].sum())
        if row is None or len(row) != n:
            raise ValueError(f"{name}[{k}]: expected {n} per-token values (one per token of the sequence), "
                             f"got {None if row is None else len(row)}")
        out[k, :n] = torch.as_tensor(row, dtype=torch.float32)
    return out


def collate_ppo(examples: Sequence[PPOExample], pad_id: int, pad_to_multiple_of: int | None = None) -> PPOBatch:
    """PPO examples -> `PPOBatch`: sequences right-padded as in `collate_sequences`, per-token
    `old_logps` (required: precompute them first) and `ref_logps` (all or none) padded with 0,
    rewards as (B,) float32, advantages too, or (B, L) when any example has per-token ones (a
    number is then spread over its row)."""
    if not examples:
        raise ValueError("cannot collate an empty list of PPO examples")
    tokens = collate_sequences([e.sequence for e in examples], pad_id, pad_to_multiple_of)
    old = _per_token([e.old_logps for e in examples], tokens, "old_logps")
    has_ref = [e.ref_logps is not None for e in examples]
    if any(has_ref) and not all(has_ref):
        raise ValueError("ref_logps: give them for every example of a batch or for none")
    ref = _per_token([e.ref_logps for e in examples], tokens, "ref_logps") if all(has_ref) else None
    if any(isinstance(e.advantage, (list, tuple)) for e in examples):
        rows = [e.advantage if isinstance(e.advantage, (list, tuple)) else [float(e.advantage)] * len(e.sequence)
                for e in examples]
        advantages = _per_token(rows, tokens, "advantage")
    else:
        advantages = torch.tensor([float(e.advantage) for e in examples], dtype=torch.float32)
    rewards = torch.tensor([float(e.reward) for e in examples], dtype=torch.float32)
    return PPOBatch(tokens, old, advantages, rewards, ref)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           megabatch_size: int = 50) -> list[list[int]]:
    """Index batches of similar lengths, deterministic given `seed`.

    Shuffle, cut into megabatches of `megabatch_size` batches, sort each megabatch by length and
    cut it into batches, then shuffle the batch order (the scheme of HF's LengthGroupedSampler):
    little padding, still random. Every index appears once; only the last batch may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    step = batch_size * max(1, megabatch_size)
    batches = []
    for start in range(0, len(order), step):
        group = sorted(order[start:start + step], key=lambda i: lengths[i], reverse=True)
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_stats(batches: Iterable[TokenBatch | Sequence[int]]) -> dict[str, float]:
    """Fraction of computed tokens that are real, over `TokenBatch`es or lists of sequence lengths
    (a list of lengths is taken as padded to its longest)."""
    real = computed = 0
    for batch in batches:
        if isinstance(batch, TokenBatch):
            real += int(batch.attention_mask.sum())
            computed += batch.attention_mask.numel()
        elif len(batch):
            real += sum(batch)
            computed += max(batch) * len(batch)
    return {"padding/real_tokens": real, "padding/computed_tokens": computed,
            "padding/real_fraction": real / computed if computed else 1.0}
