"""Shared-prefix packing: forward the common prefixes of a micro-batch once (tree attention).

Step-level data repeats long prefixes. A Step-DPO pair is (expert prefix + expert action, expert
prefix + agent action); StepAgent-inverse's PPO samples 2-3 actions per prefix; and prefix k + 1
of an expert trajectory extends prefix k, so step k's chosen sequence is a prefix of step k + 1's.
As rows of a padded batch, every row recomputes its prefix.

`pack_shared_prefixes` lays such rows out as trees. Rows are taken longest first; a row either
starts a group (it is the group's trunk) or joins the group whose trunk shares the longest common
prefix (LCP) with it, adding only its tokens after the LCP, as a branch. A 4D attention mask lets
a branch token see the trunk before its attachment point and its own branch causally, and its
position id is its position in its own row. So every token of every original row is computed in
exactly the context it has alone: per-token log-probs equal the unpacked ones up to float
summation order (tested at 1e-5 in fp32, gradients included), and backward sums the branches'
gradients through the shared prefix, as separate rows would.

When a row joins (module constants): it shares >= `MIN_SHARED` tokens and >= `SHARE_FRACTION` of
its length with the trunk, and the packed row stays <= `MAX_GROWTH` x the batch's padded length
(mask and attention scores grow with the square of the packed length). SFT trajectories, which
share only the system prompt, therefore stay apart, and `pack_shared_prefixes` returns None.

Needs an attention implementation that takes an arbitrary 4D mask: sdpa (bool mask) and eager
(additive float mask). Others (flash_attention_2) get the plain padded forward, and so does a
batch longer than the model's sliding window (the packed mask is plain causal per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_SHARED = 32
SHARE_FRACTION = 0.5
MAX_GROWTH = 2.0
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, P) long
    position_ids: torch.Tensor  # (R, P) long: each token's position in its own original row
    attention_mask: torch.Tensor  # (R, 1, P, P) bool, True = the query (dim 2) may attend to the key (dim 3)
    index: torch.Tensor  # (B, L) long: flat index r * P + p of each original token, -1 on padding

    @property
    def num_tokens(self) -> int:
        """Token positions the packed forward computes (R x P, padding included)."""
        return self.input_ids.numel()

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask, self.index)))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def shares_prefix(lcp: int, length: int) -> bool:
    """Whether a row of `length` tokens sharing `lcp` with a trunk is worth a branch."""
    return lcp >= MIN_SHARED and lcp >= SHARE_FRACTION * length


def pack_shared_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch | None:
    """Right-padded (B, L) rows -> a `PackedBatch`, or None when no row shares enough with another."""
    b_size, length = input_ids.shape
    lengths = attention_mask.sum(1).tolist()
    ids = input_ids.cpu().numpy()
    rows = [ids[b, :n] for b, n in enumerate(lengths)]
    cap = int(MAX_GROWTH * length)
    groups: list[tuple[int, list[tuple[int, int]], list[int]]] = []  # (trunk, [(row, lcp)], [packed length])
    for b in sorted(range(b_size), key=lambda b: (-lengths[b], b)):
        best, best_lcp = None, -1
        for g in groups:
            lcp = common_prefix(rows[b], rows[g[0]])
            if lcp > best_lcp:
                best, best_lcp = g, lcp
        n = lengths[b]
        if best is not None and shares_prefix(best_lcp, n) and best[2][0] + n - best_lcp <= cap:
            best[1].append((b, best_lcp))
            best[2][0] += n - best_lcp
        else:
            groups.append((b, [], [n]))
    if all(not members for _, members, _ in groups):
        return None
    r_size, p_size = len(groups), max(size[0] for *_, size in groups)
    packed = np.zeros((r_size, p_size), dtype=np.int64)
    position = np.zeros((r_size, p_size), dtype=np.int64)
    segment = np.full((r_size, p_size), -1, dtype=np.int64)  # 0 trunk, s >= 1 branch s, -1 padding
    anchor = np.zeros((r_size, p_size), dtype=np.int64)  # a branch token sees trunk positions < anchor
    index = np.full((b_size, length), -1, dtype=np.int64)
    for r, (trunk, members, _) in enumerate(groups):
        n0 = lengths[trunk]
        base = r * p_size
        packed[r, :n0], position[r, :n0], segment[r, :n0] = rows[trunk], np.arange(n0), 0
        index[trunk, :n0] = base + np.arange(n0)
        start = n0
        for s, (b, lcp) in enumerate(members, 1):
            n, k = lengths[b], lengths[b] - lcp
            sl = slice(start, start + k)
            packed[r, sl], position[r, sl], segment[r, sl], anchor[r, sl] = rows[b][lcp:], np.arange(lcp, n), s, lcp
            index[b, :lcp] = base + np.arange(lcp)
            index[b, lcp:n] = base + start + np.arange(k)
            start += k
    seg, anc = torch.from_numpy(segment), torch.from_numpy(anchor)
    q, k = torch.arange(p_size)[:, None], torch.arange(p_size)[None, :]
    own = (seg[:, :, None] == seg[:, None, :]) & (k <= q)  # causal within a segment (padding: among padding)
    trunk_ctx = (seg[:, :, None] > 0) & (seg[:, None, :] == 0) & (k < anc[:, :, None])
    mask = (own | trunk_ctx)[:, None]
    dev = input_ids.device
    return PackedBatch(torch.from_numpy(packed).to(dev), torch.from_numpy(position).to(dev), mask.to(dev),
                       torch.from_numpy(index).to(dev))


def sort_keys(sequences: Sequence[Sequence[int]]) -> list[int] | None:
    """Ranks of the sequences in lexicographic order, when that order puts prefix-sharing sequences
    side by side for at least half of them (step-level data); None otherwise (keep length order).

    The training loop groups and cuts batches by these keys (`rl_agents.train.loop.batch_keys`),
    so rows that share prefixes land in one micro-batch."""
    if len(sequences) < 2:
        return None
    order = sorted(range(len(sequences)), key=lambda i: (list(sequences[i]), i))
    arrays = [np.asarray(sequences[i]) for i in order]
    shared = sum(shares_prefix(common_prefix(a, b), min(len(a), len(b))) for a, b in zip(arrays, arrays[1:]))
    if shared < len(sequences) / 2:
        return None
    ranks = [0] * len(sequences)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks
