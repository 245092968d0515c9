"""Training objectives: forward pass -> per-token / per-turn log-probs -> a pure loss (DESIGN §6).

An objective is `fn(model, batch, cfg) -> (loss, metrics)`: `model` is the (possibly DeepSpeed-
or DDP-wrapped) causal LM, `batch` a `TokenBatch` (SFT), `PairBatch` (preference losses) or
`PPOBatch` (PPO), `cfg` a `rl_agents.train.config.LossConfig`. `loss` is a scalar: the mean over
the micro-batch's units (agent tokens for SFT and PPO, pairs otherwise); the training loop
re-weights micro-batches so that the step's gradient is exactly that of the global-batch mean.
`metrics` are detached scalars, means over the same units, keyed `group/name`.

Two deliberate choices:
* chosen and rejected run as one concatenated forward pass of 2B rows (one padded length);
* the LM head is applied only at the positions that predict an agent token (a forward pre-hook
  selects those hidden states), so instruction/observation tokens cost no vocabulary projection
  or log-softmax. The values equal `rl_agents.batches.token_logps` at agent tokens (tested).

Metrics of the preference objectives: `loss/<name>`, `reward/{chosen,rejected,margin,accuracy}`
(DPO's implicit rewards β·log πθ/πref, DMPO's discounted Φ), `kl/{chosen,rejected}` (the summed
log-ratio log πθ/πref over the agent tokens of the data's chosen/rejected sequences: a data-side
KL estimate, 0 at step 0), `logps/{chosen,rejected}`.

Reference log-probs come from the batch (`PairBatch.ref_*`, precomputed once per dataset) or, when
absent, from the same model with its LoRA adapter disabled (`model.disable_adapter()`).

PPO (`ppo`, examples `rl_agents.batches.PPOExample`): the old per-token log-probs are precomputed by
the training loop with the policy the update starts from, through `sequence_logps` — the very
forward and log-softmax the loss uses, on the same micro-batches — so the ratio is exactly 1 before
the first optimizer step (the engine's sampling log-probs differ by dtype and kernels and are not
used). The entropy bonus needs the full distribution at the agent positions: it is computed from
the same (N, V) logits as the log-probs, in the same forward. Metrics: `loss/ppo` (total),
`loss/policy`, `loss/entropy` (mean agent-token entropy), `kl/ref`, `ppo/clip_frac`, `ppo/ratio_mean`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from algorithms.dmpo import dmpo_loss, dmpo_rewards
from algorithms.dpo import dpo_loss, dpo_rewards
from algorithms.ppo import ppo_loss
from algorithms.sft import sft_loss
from algorithms.stepagent import step_dpo_loss
from rl_agents.batches import EncodedSequence, PairBatch, PPOBatch, TokenBatch, turn_logps

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., tuple[torch.Tensor, Metrics]]
    """`fn(model, batch, cfg) -> (loss, metrics)`."""
    paired: bool
    """Examples are (chosen, rejected) pairs of `EncodedSequence` (else single sequences)."""
    units: Callable[[object], int]
    """Weight of one example in the batch mean (1 per pair; agent tokens per SFT sequence)."""
    on_policy: bool = False
    """Examples are `PPOExample`s whose old per-token log-probs the training loop precomputes with
    the policy it starts from (`sequence_logps`, same micro-batches as the first epoch)."""


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, *, paired: bool, units: Callable[[object], int] = lambda example: 1,
             on_policy: bool = False):
    def deco(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, fn, paired, units, on_policy)
        return fn
    return deco


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; valid: {sorted(OBJECTIVES)}") from None


# ---- forward helpers ---------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DeepSpeed engine or DDP wrapper (peft models stay peft models)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# Shared-prefix packing (`rl_agents.packing`) in every forward of the objectives; the training loop
# sets it from `TrainConfig.share_prefixes`. `FORWARD_TOKENS[0]` counts the token positions the
# model computed (padded rows, or packed rows), for the loop's perf metrics.
PREFIX_SHARING = {"enabled": True}
FORWARD_TOKENS = [0]


def set_prefix_sharing(enabled: bool) -> None:
    PREFIX_SHARING["enabled"] = bool(enabled)


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


def agent_logits(model: torch.nn.Module, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits (N, V), target_mask (B, L) bool): the logits that predict the N agent tokens, in
    row-major order of `target_mask` (1 on agent tokens, never at position 0).

    The LM head sees only the N hidden states that predict an agent token: (B, L, H) -> (N, H),
    so logits are (N, V) instead of (B, L, V). Rows that share long prefixes (step pairs, several
    samples per prefix) run packed, each shared prefix once (`rl_agents.packing`), unless
    `set_prefix_sharing(False)`; the values are the same.
    """
    target_mask = tokens.action_mask.clone()
    target_mask[:, 0] = False  # nothing predicts position 0
    pack = mask = None
    window = getattr(getattr(unwrap(model), "config", None), "sliding_window", None)
    # The packed mask is plain causal per row: exact only where no row is longer than a sliding window.
    if PREFIX_SHARING["enabled"] and not (isinstance(window, int) and tokens.input_ids.shape[1] > window):
        from rl_agents.packing import pack_shared_prefixes

        pack = pack_shared_prefixes(tokens.input_ids, tokens.attention_mask)
        mask = None if pack is None else _packing_mask(model, pack)
    if mask is None:
        predict_mask = torch.zeros_like(target_mask)  # (B, L): position j predicts token j+1
        predict_mask[:, :-1] = target_mask[:, 1:]

        def select(module, args):
            return (args[0][predict_mask], *args[1:])  # hidden (B, L, H) -> (N, H)
        inputs = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        FORWARD_TOKENS[0] += tokens.input_ids.numel()
    else:
        predictors = pack.index[:, :-1][target_mask[:, 1:]]  # (N,) flat packed index of each predicting position

        def select(module, args):
            hidden = args[0]
            return (hidden.reshape(-1, hidden.shape[-1])[predictors], *args[1:])  # (R, P, H) -> (N, H)
        inputs = {"input_ids": pack.input_ids, "attention_mask": mask, "position_ids": pack.position_ids}
        FORWARD_TOKENS[0] += pack.num_tokens

    handle = unwrap(model).get_output_embeddings().register_forward_pre_hook(select)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return out.logits, target_mask


def _scatter(values: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the agent tokens -> (B, L), exactly 0 elsewhere."""
    rows, cols = target_mask.nonzero(as_tuple=True)  # row-major, the order boolean indexing used
    return values.new_zeros(target_mask.shape).index_put((rows, cols), values)


def _token_logps(logits: torch.Tensor, tokens: TokenBatch, target_mask: torch.Tensor) -> torch.Tensor:
    picked = -F.cross_entropy(logits.float(), tokens.input_ids[target_mask], reduction="none")  # (N,)
    return _scatter(picked, target_mask)


def sequence_logps(model: torch.nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """(B, L) log p(input_ids[j] | ids[<j]) at agent tokens, exactly 0 elsewhere (LM head on agent
    positions only, see `agent_logits`)."""
    logits, target_mask = agent_logits(model, tokens)
    return _token_logps(logits, tokens, target_mask)


def sequence_logps_and_entropy(model: torch.nn.Module, tokens: TokenBatch, *, entropy_grad: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log-probs as `sequence_logps` (bit-identical) and (B, L) entropy H = −Σ_v p_v log p_v of
    the full next-token distribution at each agent token's predicting position, 0 elsewhere; one
    forward. `entropy_grad=False` detaches the entropy (a metric only: no (N, V) graph kept)."""
    logits, target_mask = agent_logits(model, tokens)  # (N, V)
    logps = _token_logps(logits, tokens, target_mask)
    ent_logits = (logits if entropy_grad else logits.detach()).float()
    log_p = torch.log_softmax(ent_logits, dim=-1)  # (N, V)
    entropy = -(log_p.exp() * log_p).sum(-1)  # (N,)
    return logps, _scatter(entropy, target_mask)


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


def pair_turn_logps(model: torch.nn.Module, batch: PairBatch, *, disable_adapter: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-turn log-prob sums of both sides from one forward pass, each turn's reply and end-of-turn
    tokens apart (`turn_logps(..., parts=True)`): (B, T_chosen, 2), (B, T_rejected, 2)."""
    both = _concat(batch.chosen, batch.rejected)
    t_c, t_r = batch.chosen.max_turns, batch.rejected.max_turns
    ctx = unwrap(model).disable_adapter() if disable_adapter else nullcontext()
    with ctx:
        per_turn = turn_logps(sequence_logps(model, both), both, max(t_c, t_r, 1), parts=True)  # (2B, T, 2)
    b = len(batch)
    return per_turn[:b, :t_c], per_turn[b:, :t_r]


def reference(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's precomputed reference, or the adapter-disabled model's log-probs (no grad)."""
    if batch.ref_chosen is not None and batch.ref_rejected is not None:
        return batch.ref_chosen, batch.ref_rejected
    if not hasattr(unwrap(model), "disable_adapter"):
        raise ValueError("the batch has no reference log-probs and the model has no LoRA adapter to disable; "
                         "precompute the reference (ref='precompute') or train with lora.enabled")
    with torch.no_grad():
        return pair_turn_logps(model, batch, disable_adapter=True)


def _pair_metrics(name: str, loss, rewards, pc, rc, pr, rr) -> Metrics:
    d = lambda x: x.detach().float().mean()  # noqa: E731
    return {f"loss/{name}": d(loss), "reward/chosen": d(rewards.chosen), "reward/rejected": d(rewards.rejected),
            "reward/margin": d(rewards.margin), "reward/accuracy": d(rewards.margin > 0),
            "kl/chosen": d(pc - rc), "kl/rejected": d(pr - rr), "logps/chosen": d(pc), "logps/rejected": d(pr)}


# ---- objectives ---------------------------------------------------------------------------------
def _agent_tokens(example: EncodedSequence) -> int:
    return sum(1 for m in example.action_mask[1:] if m)


@register("sft", paired=False, units=_agent_tokens)
def sft_objective(model, batch: TokenBatch, cfg) -> tuple[torch.Tensor, Metrics]:
    """Masked token-mean NLL on agent tokens (`algorithms.sft.sft_loss`)."""
    loss = sft_loss(sequence_logps(model, batch), batch.action_mask)
    return loss, {"loss/sft": loss.detach()}


def _trajectory_dpo(name: str, loss_fn):
    def objective(model, batch: PairBatch, cfg) -> tuple[torch.Tensor, Metrics]:
        ref_c, ref_r = reference(model, batch)
        pol_c, pol_r = pair_turn_logps(model, batch)
        pc, rc, pr, rr = (x.sum((1, 2)) for x in (pol_c, ref_c, pol_r, ref_r))  # (B,) each: whole sequences
        losses = loss_fn(pc, rc, pr, rr, beta=cfg.beta)
        rewards = dpo_rewards(pc, rc, pr, rr, beta=cfg.beta)
        return losses.mean(), _pair_metrics(name, losses, rewards, pc, rc, pr, rr)
    objective.__doc__ = f"{name}: `{loss_fn.__module__}.{loss_fn.__name__}` on summed agent-token log-probs."
    return objective


register("dpo", paired=True)(_trajectory_dpo("dpo", dpo_loss))
register("step_dpo", paired=True)(_trajectory_dpo("step_dpo", step_dpo_loss))


@register("dmpo", paired=True)
def dmpo_objective(model, batch: PairBatch, cfg) -> tuple[torch.Tensor, Metrics]:
    """DMPO on per-turn log-prob sums, reply and end-of-turn apart (`algorithms.dmpo.dmpo_loss`; β, γ
    and the end-of-turn convention from `cfg`)."""
    ref_c, ref_r = reference(model, batch)
    pol_c, pol_r = pair_turn_logps(model, batch)
    mask_c, mask_r = batch.chosen.turn_mask(pol_c.shape[1]), batch.rejected.turn_mask(pol_r.shape[1])
    args = (pol_c, ref_c, mask_c, pol_r, ref_r, mask_r)
    kw = {"beta": cfg.beta, "gamma": cfg.gamma, "end_of_turn": cfg.end_of_turn}
    losses = dmpo_loss(*args, **kw)
    rewards = dmpo_rewards(*args, **kw)
    return losses.mean(), _pair_metrics("dmpo", losses, rewards, *(x.sum((1, 2)) for x in (pol_c, ref_c, pol_r, ref_r)))


def _ppo_units(example) -> int:
    return _agent_tokens(example.sequence)


@register("ppo", paired=False, units=_ppo_units, on_policy=True)
def ppo_objective(model, batch: PPOBatch, cfg) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip + entropy bonus + optional k3 KL (`algorithms.ppo.ppo_loss`; ε, λ, KL coefficient
    from `cfg`), token mean over the agent tokens, one advantage per sequence. The KL reference is
    the batch's `ref_logps` or, without them, the policy the update started from (`old_logps`)."""
    logps, entropy = sequence_logps_and_entropy(model, batch.tokens, entropy_grad=cfg.entropy_coef != 0)
    ref = batch.ref_logps if batch.ref_logps is not None else batch.old_logps
    loss, metrics = ppo_loss(logps, batch.old_logps, batch.advantages, batch.tokens.action_mask,
                             clip_eps=cfg.clip_eps, entropy=entropy, entropy_coef=cfg.entropy_coef,
                             ref_logps=ref, kl_coef=cfg.kl_coef)
    return loss, {"loss/ppo": loss.detach(), **{k: torch.tensor(v) for k, v in metrics.items()}}
