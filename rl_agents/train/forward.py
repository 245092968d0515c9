"""The forward passes every objective is made of: agent-token log-probs, per-turn sums, the reference.

`Forward(model, share_prefixes=...)` wraps the (possibly DeepSpeed- or DDP-wrapped) causal LM of
one training worker; an objective (`rl_agents.train.objective`) calls its methods and never the
model directly. Two deliberate choices:

* the LM head is applied only at the positions that predict an agent token (a forward pre-hook
  selects those hidden states), so instruction/observation tokens cost no vocabulary projection
  or log-softmax. The values equal `rl_agents.batches.token_logps` at agent tokens (tested);
* with `share_prefixes`, rows that share long prefixes (step pairs, several samples per prefix)
  run packed, each shared prefix once (`rl_agents.packing`); the values are the same.

Chosen and rejected run as one concatenated forward pass of 2B rows (`pair_turn_logps`).
Reference log-probs come from the batch (`PairBatch.ref_*`, precomputed once per dataset) or,
when absent, from the same model with its LoRA adapter disabled (`model.disable_adapter()`).
`Forward.tokens` counts the token positions the model computed (padded rows, or packed rows):
the training loop's `perf/forward_tokens`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F

from rl_agents.batches import PairBatch, TokenBatch, turn_logps


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DeepSpeed engine or DDP wrapper (peft models stay peft models)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _packing_mask(model: torch.nn.Module, pack) -> torch.Tensor | None:
    """The packed batch's 4D mask in the form the model's attention implementation takes, or None
    when that implementation cannot take an arbitrary mask."""
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return pack.attention_mask
    if impl == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        return torch.zeros(pack.attention_mask.shape, dtype=dtype, device=pack.attention_mask.device).masked_fill(
            ~pack.attention_mask, torch.finfo(dtype).min)
    return None


def _scatter(values: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the agent tokens -> (B, L), exactly 0 elsewhere."""
    rows, cols = target_mask.nonzero(as_tuple=True)  # row-major, the order boolean indexing used
    return values.new_zeros(target_mask.shape).index_put((rows, cols), values)


def _token_logps(logits: torch.Tensor, tokens: TokenBatch, target_mask: torch.Tensor) -> torch.Tensor:
    picked = -F.cross_entropy(logits.float(), tokens.input_ids[target_mask], reduction="none")  # (N,)
    return _scatter(picked, target_mask)


def _concat(chosen: TokenBatch, rejected: TokenBatch) -> TokenBatch:
    """Stack both sides into one (2B, L) batch, right-padding the shorter one."""
    length = max(chosen.input_ids.shape[1], rejected.input_ids.shape[1])

    def pad(batch: TokenBatch) -> TokenBatch:
        extra = length - batch.input_ids.shape[1]
        if not extra:
            return batch
        return replace(batch, input_ids=F.pad(batch.input_ids, (0, extra)),
                       attention_mask=F.pad(batch.attention_mask, (0, extra)),
                       action_mask=F.pad(batch.action_mask, (0, extra)),
                       turn_index=F.pad(batch.turn_index, (0, extra), value=-1),
                       end_of_turn=None if batch.end_of_turn is None else F.pad(batch.end_of_turn, (0, extra)))

    def eot(batch: TokenBatch) -> torch.Tensor:
        return batch.end_of_turn if batch.end_of_turn is not None else torch.zeros_like(batch.action_mask)

    c, r = pad(chosen), pad(rejected)
    return TokenBatch(*(torch.cat([getattr(c, f), getattr(r, f)]) for f in
                        ("input_ids", "attention_mask", "action_mask", "turn_index", "num_turns")),
                      end_of_turn=torch.cat([eot(c), eot(r)]))


class Forward:
    """The objectives' view of one model. `share_prefixes`: run the shared prefixes of a batch's
    rows once (`rl_agents.packing`; exact, needs sdpa or eager attention, else rows run padded)."""

    def __init__(self, model: torch.nn.Module, *, share_prefixes: bool = True):
        self.model = model
        self.share_prefixes = share_prefixes
        self.tokens = 0
        """Token positions computed so far (padded rows, or fewer when packed)."""

    def agent_logits(self, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (N, V), target_mask (B, L) bool): the logits that predict the N agent tokens, in
        row-major order of `target_mask` (1 on agent tokens, never at position 0).

        The LM head sees only the N hidden states that predict an agent token: (B, L, H) -> (N, H),
        so logits are (N, V) instead of (B, L, V)."""
        model = self.model
        target_mask = tokens.action_mask.clone()
        target_mask[:, 0] = False  # nothing predicts position 0
        pack = mask = None
        window = getattr(getattr(unwrap(model), "config", None), "sliding_window", None)
        # The packed mask is plain causal per row: exact only where no row is longer than a sliding window.
        if self.share_prefixes and not (isinstance(window, int) and tokens.input_ids.shape[1] > window):
            from rl_agents.packing import pack_shared_prefixes

            pack = pack_shared_prefixes(tokens.input_ids, tokens.attention_mask)
            mask = None if pack is None else _packing_mask(model, pack)
        if mask is None:
            predict_mask = torch.zeros_like(target_mask)  # (B, L): position j predicts token j+1
            predict_mask[:, :-1] = target_mask[:, 1:]

            def select(module, args):
                return (args[0][predict_mask], *args[1:])  # hidden (B, L, H) -> (N, H)
            inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
            self.tokens += tokens.input_ids.numel()
        else:
            predictors = pack.index[:, :-1][target_mask[:, 1:]]  # (N,) flat packed index of each predicting position

            def select(module, args):
                hidden = args[0]
                return (hidden.reshape(-1, hidden.shape[-1])[predictors], *args[1:])  # (R, P, H) -> (N, H)
            inputs = {"input_ids": pack.input_ids, "attention_mask": mask, "position_ids": pack.position_ids}
            self.tokens += pack.num_tokens

        handle = unwrap(model).get_output_embeddings().register_forward_pre_hook(select)
        try:
            out = model(**inputs, use_cache=False)
        finally:
            handle.remove()
        return out.logits, target_mask

    def sequence_logps(self, tokens: TokenBatch) -> torch.Tensor:
        """(B, L) log p(input_ids[j] | ids[<j]) at agent tokens, exactly 0 elsewhere."""
        logits, target_mask = self.agent_logits(tokens)
        return _token_logps(logits, tokens, target_mask)

    def sequence_logps_and_entropy(self, tokens: TokenBatch, *, entropy_grad: bool = True
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) log-probs as `sequence_logps` (bit-identical) and (B, L) entropy H = −Σ_v p_v log p_v
        of the full next-token distribution at each agent token's predicting position, 0 elsewhere;
        one forward. `entropy_grad=False` detaches the entropy (a metric only: no (N, V) graph kept)."""
        logits, target_mask = self.agent_logits(tokens)  # (N, V)
        logps = _token_logps(logits, tokens, target_mask)
        ent_logits = (logits if entropy_grad else logits.detach()).float()
        log_p = torch.log_softmax(ent_logits, dim=-1)  # (N, V)
        entropy = -(log_p.exp() * log_p).sum(-1)  # (N,)
        return logps, _scatter(entropy, target_mask)

    def pair_turn_logps(self, batch: PairBatch, *, disable_adapter: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-turn log-prob sums of both sides from one forward pass, each turn's reply and
        end-of-turn tokens apart (`turn_logps(..., parts=True)`): (B, T_chosen, 2), (B, T_rejected, 2)."""
        both = _concat(batch.chosen, batch.rejected)
        t_c, t_r = batch.chosen.max_turns, batch.rejected.max_turns
        ctx = unwrap(self.model).disable_adapter() if disable_adapter else nullcontext()
        with ctx:
            per_turn = turn_logps(self.sequence_logps(both), both, max(t_c, t_r, 1), parts=True)  # (2B, T, 2)
        b = len(batch)
        return per_turn[:b, :t_c], per_turn[b:, :t_r]

    def reference(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's precomputed reference, or the adapter-disabled model's log-probs (no grad)."""
        if batch.ref_chosen is not None and batch.ref_rejected is not None:
            return batch.ref_chosen, batch.ref_rejected
        if not hasattr(unwrap(self.model), "disable_adapter"):
            raise ValueError("the batch has no reference log-probs and the model has no LoRA adapter to disable; "
                             "precompute the reference (ref='precompute') or train with lora.enabled")
        with torch.no_grad():
            return self.pair_turn_logps(batch, disable_adapter=True)


def sequence_logps(model: torch.nn.Module, tokens: TokenBatch, *, share_prefixes: bool = True) -> torch.Tensor:
    """`Forward(model).sequence_logps(tokens)`: (B, L) agent-token log-probs, 0 elsewhere."""
    return Forward(model, share_prefixes=share_prefixes).sequence_logps(tokens)


def pair_turn_logps(model: torch.nn.Module, batch: PairBatch, *, share_prefixes: bool = True,
                    disable_adapter: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`Forward(model).pair_turn_logps(batch)`: per-turn [reply, end-of-turn] sums of both sides."""
    return Forward(model, share_prefixes=share_prefixes).pair_turn_logps(batch, disable_adapter=disable_adapter)
