"""StepAgent-inverse (Deng et al., WWW'25, §4.2.2, eq. 8-11, Alg. 1): GAIL with a PPO policy step.

One iteration (`StepGAIL.training_step`):

1. Inspection (Alg. 1 line 7): `algorithms.stepagent.inspect_steps`, shared with StepAgent-implicit —
   every expert trajectory is cut before each action and the current policy samples
   `practice_samples` actions a_i^θ per expert prefix ŝ_i on the Ray rollout workers.
2. Discriminator (lines 9-11, eq. 10-11): D(s, a) = σ(head(φ(s, a))) = P(expert | s, a), trained with
   `gail_discriminator_loss` on expert steps (ŝ_i, â_i) vs agent steps (ŝ_i, a_i^θ).
3. Policy (line 12): reward r_i = log D(ŝ_i, a_i^θ) (`gail_reward`) with the updated head, advantage
   r_i − mean reward of the samples of the same prefix (`step_advantages`), PPO-clip steps with the
   entropy bonus λH of eq. (8)/(10) on the agent steps (`PPOObjective` on Ray Train).

Discriminator architecture (the paper specifies none; its Fig. 2 marks some parts frozen):

    φ(s, a) = mean over the action's tokens of the final-layer hidden states (after the final norm)
              of a FROZEN copy of the run's starting policy's backbone, computed once per step and
              iteration without grad, in the driver process: one forward per expert prefix, whose KV
              cache then serves that step's expert action and agent samples, `feature_batch_size`
              actions at a time;
    head    = LayerNorm(H) → Linear(H, disc_hidden) → ReLU → Linear(disc_hidden, 1)   (logit of D).

The action's hidden states attend to the whole prefix, so φ depends on s and a. The LayerNorm puts
the pooled features on one scale (LM hidden states have a few huge outlier dimensions). Only the
head trains: `disc_epochs` epochs of Adam (lr `disc_lr`, a fresh optimizer per iteration) over
mini-batches that each hold both classes. The head persists across iterations — GAIL alternates
D and π — and is saved next to `state.json` as `discriminator.safetensors` (weights + metadata;
no pickle). Freezing the backbone keeps φ fixed while the policy moves (a stationary feature space
for a head that keeps training) and costs one forward per step instead of a second trainable LLM.

`discriminator.backbone: lora` (#20) makes the backbone trainable too: a LoRA adapter (rank
`discriminator.lora_r` on the attention projections) on the starting policy, trained with the head
by backpropagation through φ, so that D can read the state and not only the action's words. Each
step is then read as its last `discriminator.max_tokens` tokens (the recent turns and the action;
a full-prefix forward with gradients is too slow on CPU), `feature_batch_size` steps per forward,
gradients accumulated over a mini-batch (the same loss as one forward of the whole mini-batch).

Held-out accuracy: `discriminator.held_out` of the expert prefixes (with their agent samples) are
left out of D's training each iteration; `disc/heldout_acc_expert`, `disc/heldout_acc_agent` and
`disc/heldout_acc` (the mean of the two) are D's accuracy on them after its update, i.e. on states
it was not trained on. The PPO rewards still come from every sample.

Deviations: D = P(expert) label convention (see `algorithms.losses.gail`); value-free group-mean
baseline (see `algorithms.losses.ppo`); the KL penalty (off by default) is to the policy each update
starts from, not to the SFT model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.base import Algorithm, AlgorithmConfig, register_algorithm
from algorithms.losses.gail import gail_discriminator_loss
from algorithms.losses.ppo import PPOObjective
from algorithms.stepagent import agrees_with_expert, inspect_steps, reflection_train, write_inspection
from rl_agents.batches import EncodedSequence, TokenBatch
from rl_agents.config import ConfigError
from rl_agents.train.config import TrainConfig

DISC_FILE = "discriminator.safetensors"


# ─────────────────────────────── discriminator ───────────────────────────────


def pooled_hidden(backbone: nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """φ: (B, H) float32, the mean of the backbone's final-layer hidden states over each row's
    action tokens (`action_mask` == 1: the tokens of the step's action, never the prefix); with
    gradients when the backbone has trainable parameters (the LoRA discriminator)."""
    out = backbone.base_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False)
    hidden = out.last_hidden_state.float()  # (B, L, H)
    mask = tokens.action_mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)


@torch.no_grad()
def action_features(backbone: nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """`pooled_hidden` without gradients (the frozen backbone)."""
    return pooled_hidden(backbone, tokens)


@torch.no_grad()
def sequence_features(backbone: nn.Module, seqs: list[EncodedSequence], *, batch_size: int,
                      pad_id: int = 0) -> torch.Tensor:
    """φ of every sequence, (N, H) float32 on CPU, in `seqs` order.

    Sequences with the same tokens before their action (a step's expert action and the agent's
    samples at that prefix) share ONE forward of the prefix: its KV cache then serves every
    member's action tokens, `batch_size` actions at a time (right-padded: a padded row's action
    positions see exactly what they would alone). Same hidden states as running each whole
    sequence, up to float rounding (tested), for (1 + samples) x fewer prefix tokens.
    """
    from transformers import DynamicCache

    device = next(backbone.parameters()).device
    decoder = backbone.base_model
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # prefix ids -> [(sequence, action start)]
    for i, s in enumerate(seqs):
        start = s.action_mask.index(1) if 1 in s.action_mask else len(s)
        groups.setdefault(tuple(s.input_ids[:start]), []).append((i, start))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    hidden_size = backbone.config.hidden_size
    for prefix, members in groups.items():
        kv = None
        if prefix:
            past = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
            kv = [(layer.keys, layer.values) for layer in past.layers]  # each (1, kv_heads, P, head_dim)
        for c in range(0, len(members), batch_size):
            chunk = members[c:c + batch_size]
            rows = [(seqs[i].input_ids[start:], seqs[i].action_mask[start:]) for i, start in chunk]
            width = max(len(ids) for ids, _ in rows)
            if width == 0:  # nothing after the prefix: no action tokens
                for i, _ in chunk:
                    out[i] = torch.zeros(hidden_size)
                continue
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            valid = torch.zeros((len(rows), width), dtype=torch.long)
            action = torch.zeros((len(rows), width))
            for r, (row_ids, row_mask) in enumerate(rows):
                ids[r, :len(row_ids)], valid[r, :len(row_ids)] = torch.tensor(row_ids), 1
                action[r, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.float32)
            mask = torch.cat([torch.ones((len(rows), len(prefix)), dtype=torch.long), valid], dim=1)
            cache = None
            if kv is not None:
                cache = DynamicCache(ddp_cache_data=[(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                                     for k, v in kv], config=backbone.config)
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                             use_cache=cache is not None).last_hidden_state.float().cpu()  # (B, width, H)
            weights = action[..., None]
            feats = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            for r, (i, _) in enumerate(chunk):
                out[i] = feats[r]
    return torch.stack(out) if out else torch.zeros((0, hidden_size))


def window(seq: EncodedSequence, max_tokens: int) -> EncodedSequence:
    """The last `max_tokens` tokens of a step (its action whole, however long): what a trainable D reads."""
    start = max(0, min(len(seq) - max_tokens, seq.action_mask.index(1) if 1 in seq.action_mask else len(seq)))
    cut = lambda x: None if x is None else x[start:]  # noqa: E731
    return EncodedSequence(seq.input_ids[start:], seq.action_mask[start:], seq.turn_index[start:],
                           cut(seq.end_of_turn))


def pooled_features(model: nn.Module, seqs: list[EncodedSequence], pad_id: int = 0) -> torch.Tensor:
    """`pooled_hidden` of `seqs`, one right-padded forward: (N, H) float32."""
    from rl_agents.collate import collate_sequences

    device = next(model.parameters()).device
    return pooled_hidden(model, collate_sequences(seqs, pad_id).to(device))


class DiscriminatorHead(nn.Module):
    """The trainable part of D: features (N, H) -> logits (N,), D = σ(logit) = P(expert | s, a)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def _alternate(head: DiscriminatorHead, opt: torch.optim.Optimizer, step, n_e: int, n_a: int, *, epochs: int,
               batch_size: int, seed: int, progress: bool = False) -> float:
    """The discriminator's training loop: `epochs` passes, each over mini-batches that hold a shuffled
    share of both classes; `step(expert_idx, agent_idx)` backpropagates one mini-batch's loss and
    returns it. Returns the last epoch's mean loss. `progress`: a bar over the mini-batches (the
    LoRA backbone's updates take minutes)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, min(math.ceil((n_e + n_a) / batch_size), n_e, n_a))
    head.train()
    last = float("nan")
    with tqdm(total=epochs * n_batches, desc="train discriminator", dynamic_ncols=True, disable=not progress) as bar:
        for _ in range(epochs):
            losses = []
            for ie, ia in zip(torch.randperm(n_e, generator=gen).tensor_split(n_batches),
                              torch.randperm(n_a, generator=gen).tensor_split(n_batches)):
                opt.zero_grad(set_to_none=True)
                losses.append(step(ie, ia))
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            last = sum(losses) / len(losses)
    head.eval()
    return last


def train_discriminator(head: DiscriminatorHead, expert: torch.Tensor, agent: torch.Tensor, *, epochs: int,
                        lr: float, batch_size: int, seed: int) -> float:
    """Adam on `gail_discriminator_loss`: `epochs` passes over expert (N_e, H) and agent (N_a, H)
    features, each mini-batch holding a shuffled share of both classes. Returns the last epoch's
    mean loss."""
    def step(ie, ia) -> float:
        loss = gail_discriminator_loss(head(expert[ie]), head(agent[ia]))
        loss.backward()
        return loss.item()

    return _alternate(head, torch.optim.Adam(head.parameters(), lr=lr), step, len(expert), len(agent),
                      epochs=epochs, batch_size=batch_size, seed=seed)


def train_lora_discriminator(lm: nn.Module, head: DiscriminatorHead, expert: list[EncodedSequence],
                             agent: list[EncodedSequence], *, epochs: int, lr: float, lora_lr: float, batch_size: int,
                             micro_batch_size: int, seed: int, pad_id: int = 0) -> float:
    """`train_discriminator` with a trainable backbone: Adam on the head (lr `lr`) and on `lm`'s
    trainable (LoRA) parameters (lr `lora_lr`), by backpropagation through φ, each mini-batch's
    gradient accumulated over small forwards (`accumulate_gradients`). Returns the last epoch's
    mean loss."""
    trainable = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": list(head.parameters()), "lr": lr}, {"params": trainable, "lr": lora_lr}])
    step = lambda ie, ia: accumulate_gradients(lm, head, [expert[i] for i in ie], [agent[i] for i in ia],  # noqa: E731
                                               micro_batch_size=micro_batch_size, pad_id=pad_id)
    return _alternate(head, opt, step, len(expert), len(agent), epochs=epochs, batch_size=batch_size, seed=seed,
                      progress=True)


def accumulate_gradients(lm: nn.Module, head: DiscriminatorHead, expert: list[EncodedSequence],
                         agent: list[EncodedSequence], *, micro_batch_size: int, pad_id: int = 0) -> float:
    """Backpropagate `gail_discriminator_loss` of one mini-batch (expert vs agent steps) into the head's and
    `lm`'s trainable parameters, `micro_batch_size` sequences of one class per forward: ½ Σ softplus(∓logit)
    / N_class each, which sums to the mini-batch's loss. Returns that loss."""
    import torch.nn.functional as F

    total = 0.0
    for seqs, sign in ((expert, -1.0), (agent, 1.0)):
        for c in range(0, len(seqs), micro_batch_size):
            logits = head(pooled_features(lm, seqs[c:c + micro_batch_size], pad_id))
            loss = 0.5 * F.softplus(sign * logits).sum() / len(seqs)  # expert: -log D, agent: -log(1 - D)
            loss.backward()
            total += loss.item()
    return total


def release_freed_memory() -> dict[str, float]:
    """Hand the memory that D's forwards and backwards freed back to the OS (glibc keeps freed arenas:
    on ALFWorld the LoRA backbone's updates left this process at 7.7 GB, and the PPO trainer that
    starts next, beside two vLLM engines, then ran a 24 GB machine out of memory). Returns this
    process's peak and current resident memory in GB, as metrics."""
    import ctypes
    import gc
    import resource

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
    rss = 0.0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"perf/driver_peak_rss_gb": peak, "perf/driver_rss_gb": rss}


@torch.no_grad()
def lora_logits(lm: nn.Module, head: DiscriminatorHead, seqs: list[EncodedSequence], *, batch_size: int,
                pad_id: int = 0, desc: str = "score steps") -> torch.Tensor:
    """D's logits (N,) with the trainable backbone, no gradients, `batch_size` sequences per forward
    (with a progress bar: `desc`, and minutes on CPU)."""
    from tqdm import tqdm

    out = [head(pooled_features(lm, seqs[c:c + batch_size], pad_id))
           for c in tqdm(range(0, len(seqs), batch_size), desc=desc, dynamic_ncols=True, disable=not seqs)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def discriminator_metrics(le: torch.Tensor, la: torch.Tensor) -> dict[str, float]:
    """From D's logits on expert (le) and agent (la) steps: loss, accuracy per class (D > ½ on expert,
    D < ½ on agent) and mean D per class."""
    return {"loss": gail_discriminator_loss(le, la).item(), "acc_expert": (le > 0).float().mean().item(),
            "acc_agent": (la < 0).float().mean().item(), "d_expert": torch.sigmoid(le).mean().item(),
            "d_agent": torch.sigmoid(la).mean().item()}


def held_out_prefixes(n: int, fraction: float, seed: int) -> set[int]:
    """Which of `n` expert prefixes D does not train on: round(fraction · n) of them (at least one
    when fraction > 0, none when fewer than 2 prefixes), drawn with `seed`."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(fraction * n)))
    return set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


BACKBONE_PREFIX = "backbone."


def save_head(head: DiscriminatorHead, path: str | os.PathLike, *, iteration: int,
              backbone: dict[str, torch.Tensor] | None = None) -> None:
    """safetensors weights + metadata (dims, iteration), written atomically; `backbone`: the LoRA
    discriminator's adapter weights, stored beside the head's under `backbone.`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    state.update({BACKBONE_PREFIX + k: v.detach().cpu().contiguous() for k, v in (backbone or {}).items()})
    save_file(state, str(tmp), metadata={"format": "pt", "rl_agents": json.dumps(
        {"dim": head.dim, "hidden": head.hidden, "iteration": iteration, "backbone": "lora" if backbone else "frozen"})})
    os.replace(tmp, path)


def load_head(path: str | os.PathLike) -> tuple[DiscriminatorHead, int, dict[str, torch.Tensor] | None]:
    """-> (head, the iteration it was saved at, the LoRA backbone's adapter weights or None)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rl_agents"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    head = DiscriminatorHead(meta["dim"], meta["hidden"])
    head.load_state_dict({k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}, strict=True)
    return head.eval(), int(meta["iteration"]), (backbone if meta.get("backbone") == "lora" else None)


# ─────────────────────────────── algorithm ───────────────────────────────


BACKBONES = ("frozen", "lora")


@dataclass
class DiscriminatorSection:
    """D(s, a) = σ(head(φ(s, a))) (module docstring); none of these is reported by the paper."""

    backbone: str = "frozen"
    """"frozen": φ from a frozen copy of the starting policy, only the head trains; "lora": a LoRA
    adapter on that copy trains with the head, so that D can read the state."""
    hidden: int = 256
    """Hidden width of the head."""
    lr: float = 1e-3
    """Adam learning rate of the head."""
    epochs: int = 5
    """Passes over each iteration's expert and agent steps."""
    batch_size: int = 64
    """Steps (expert + agent) per update."""
    feature_batch_size: int = 8
    """Steps per forward of the backbone (bounds the driver's memory)."""
    device: str = "cpu"
    """Device of the backbone in the driver ('cpu': float32; 'cuda[:k]': bfloat16 when frozen)."""
    lora_r: int = 8
    """backbone lora: adapter rank, on q/k/v/o projections."""
    lora_alpha: int = 16
    lora_lr: float = 1e-4
    """backbone lora: Adam learning rate of the adapter."""
    max_tokens: int = 512
    """backbone lora: D reads each step's last `max_tokens` tokens (recent turns + the action)."""
    held_out: float = 0.2
    """Share of the expert prefixes (with their agent samples) D does not train on; its accuracy on
    them is `disc/heldout_acc*` (0 = train on all, no held-out metrics)."""

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ConfigError(f"discriminator.backbone: must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        for name in ("hidden", "epochs", "batch_size", "feature_batch_size", "lora_r", "lora_alpha", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"discriminator.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lora_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"discriminator.{name}: must be a finite number > 0, got {getattr(self, name)}")
        if not (0 <= self.held_out < 1):
            raise ConfigError(f"discriminator.held_out: must be in [0, 1), got {self.held_out}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"discriminator.device: not a torch device, got {self.device!r}") from None


@dataclass
class StepGAILConfig(AlgorithmConfig):
    """StepAgent-inverse: D(s, a) = σ(head(φ(s, a))) (`discriminator`), PPO on r = log D (module
    docstring)."""

    practice_samples: int = 3
    """Agent actions sampled per expert prefix (StepAgent §7.4: gains up to 3, none beyond). ≥ 2:
    the advantage baseline is the mean reward of a prefix's samples."""
    max_steps_per_task: int | None = None
    """Inspect at most this many steps of each expert trajectory (None = all)."""
    iterations: int = 7
    """Inspection-reflection rounds (StepAgent Fig. 4a: the inverse variant peaks at 7 on WebShop)."""
    loss: PPOObjective = field(default_factory=lambda: PPOObjective(entropy_coef=1e-3))
    """The policy step: `loss.clip_eps` (not reported; Schulman et al. 2017: 0.2), `loss.entropy_coef`
    (λ of eq. 8/10, not reported; 1e-3 as in verl's PPO defaults), `loss.kl_coef` (k3 KL to the policy
    each update starts from; 0 = off, the paper uses none)."""
    discriminator: DiscriminatorSection = field(default_factory=DiscriminatorSection)
    train: TrainConfig = field(default_factory=reflection_train)
    """Paper defaults (StepAgent reflection, §6.4): lr 5e-7, batch 16, 1 epoch."""
    algo = "step_gail"
    moved_keys = {**AlgorithmConfig.moved_keys, "disc_hidden": "discriminator.hidden", "disc_lr": "discriminator.lr",
                  "disc_epochs": "discriminator.epochs", "disc_batch_size": "discriminator.batch_size",
                  "feature_batch_size": "discriminator.feature_batch_size", "feature_device": "discriminator.device"}

    def __post_init__(self):
        super().__post_init__()
        if self.practice_samples < 2:
            raise ConfigError(f"practice_samples: the baseline is the mean reward of a prefix's samples, "
                              f"needs >= 2, got {self.practice_samples}")


@register_algorithm
class StepGAIL(Algorithm):
    config_class = StepGAILConfig

    def __init__(self, config: StepGAILConfig):
        super().__init__(config)
        self._backbone: nn.Module | None = None
        self._peft = None  # the PeftModel around `_backbone` (discriminator.backbone: lora)
        self._head: DiscriminatorHead | None = None
        self._head_dir = self.run_dir  # where a restored run's head lies

    # ---- discriminator state ---------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """φ's model, built from the run's starting policy (not the current one): frozen, or with a
        trainable LoRA adapter (seeded; its weights restored with the head)."""
        if self._backbone is None:
            from rl_agents.models import load_model

            d = self.config.discriminator
            device = torch.device(d.device)
            frozen = d.backbone == "frozen"
            dtype = torch.float32 if device.type == "cpu" or not frozen else torch.bfloat16
            model = load_model(self.config.model, dtype=dtype).to(device).eval().requires_grad_(False)
            if not frozen:
                from peft import LoraConfig, get_peft_model

                with torch.random.fork_rng():
                    torch.manual_seed(self.config.seed)
                    self._peft = get_peft_model(model, LoraConfig(
                        r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
                model = self._peft.get_base_model()  # the causal LM, adapters injected
            self._backbone = model
        return self._backbone

    def _adapter_state(self) -> dict[str, torch.Tensor] | None:
        if self._peft is None:
            return None
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self._peft)

    def discriminator(self) -> DiscriminatorHead:
        """The head: new (seeded) at iteration 0, else the one saved with this iteration's state (and,
        with the LoRA backbone, its adapter)."""
        if self._head is None:
            if self.iteration == 0:
                with torch.random.fork_rng():
                    torch.manual_seed(self.config.seed)
                    dim = self.backbone().config.get_text_config().hidden_size
                    self._head = DiscriminatorHead(dim, self.config.discriminator.hidden).eval()
            else:
                path = self._head_dir / DISC_FILE
                if not path.exists():
                    raise FileNotFoundError(f"{path}: no discriminator saved with this run's state (iteration "
                                            f"{self.iteration})")
                head, saved_at, adapter = load_head(path)
                if saved_at != self.iteration:
                    raise RuntimeError(f"{path} is from iteration {saved_at}, the run state from {self.iteration}")
                want = self.config.discriminator.backbone
                if (adapter is not None) != (want == "lora"):
                    raise RuntimeError(f"{path} holds a discriminator with a {'lora' if adapter else 'frozen'} "
                                       f"backbone, the config asks for discriminator.backbone: {want}")
                if adapter is not None:
                    from peft import set_peft_model_state_dict

                    self.backbone()
                    set_peft_model_state_dict(self._peft, adapter)
                self._head = head
        return self._head

    def save(self, path: str | Path | None = None) -> str:
        """`state.json` plus `discriminator.safetensors` (written first: a crash in between leaves a
        mismatch that `discriminator()` reports, never a silently stale head)."""
        out = Path(path) if path else self.run_dir
        if self._head is not None:
            save_head(self._head, out / DISC_FILE, iteration=self.iteration, backbone=self._adapter_state())
        return super().save(out)

    def _restored(self, path: Path) -> None:
        self._head_dir = path
        self._head = None
        if self.iteration:
            self.discriminator()  # load now: a missing or mismatched head fails here

    # ---- one iteration -----------------------------------------------------------------------
    def training_step(self) -> dict[str, Any]:
        from algorithms.data import context_length, step_source, within_context
        from algorithms.losses.ppo import step_advantages
        from algorithms.losses.gail import gail_reward
        from rl_agents.batches import PPOExample
        from rl_agents.tokenization import encode_step

        cfg, seg = self.config, self.segmenter()
        head = self.discriminator()  # exists from the first iteration on, so every saved state has one
        samples = [p for p in inspect_steps(self, cfg.practice_samples, cfg.max_steps_per_task) if p.action_ids]
        agrees = [agrees_with_expert(seg, p) for p in samples]
        metrics: dict[str, Any] = {"inspect/steps": len(samples), "inspect/expert_agreement":
                                   sum(agrees) / max(len(samples), 1)}
        if not samples:
            return metrics
        prefixes: dict[tuple[str, int], int] = {}
        expert_seqs, agent_seqs, groups = [], [], []
        for p in samples:
            key = (p.expert.task_id, p.prompt.step)
            if key not in prefixes:
                prefixes[key] = len(expert_seqs)
                expert_seqs.append(encode_step(p.expert, p.prompt.step, p.prompt.expert_turn.text, seg))
            groups.append(prefixes[key])
            agent_seqs.append(encode_step(p.expert, p.prompt.step, p.action_ids, seg))
        keep = within_context([(expert_seqs[g], a) for g, a in zip(groups, agent_seqs)],
                              [step_source(p.expert, p.prompt.step) for p in samples], context_length(self.policy),
                              what="practice steps")  # drops (and names) the steps over the policy's context
        if len(keep) < len(samples):
            samples, agrees, agent_seqs = ([x[i] for i in keep] for x in (samples, agrees, agent_seqs))
            used = sorted({groups[i] for i in keep})
            expert_seqs, groups = [expert_seqs[g] for g in used], [used.index(groups[i]) for i in keep]

        backbone, d = self.backbone(), cfg.discriminator
        pad_id = backbone.config.pad_token_id or 0
        held = held_out_prefixes(len(expert_seqs), d.held_out, cfg.seed * 1000 + self.iteration)
        train_e = [i for i in range(len(expert_seqs)) if i not in held]
        train_a = [j for j, g in enumerate(groups) if g not in held]
        if d.backbone == "frozen":
            # One call: a prefix's expert step and its agent samples share the prefix forward.
            feats = sequence_features(backbone, expert_seqs + agent_seqs, batch_size=d.feature_batch_size,
                                      pad_id=pad_id)
            fe, fa = feats[:len(expert_seqs)], feats[len(expert_seqs):]
            score = lambda: (head(fe), head(fa))  # noqa: E731  (D's logits on every step, no grad)
            before = [x.detach() for x in score()]
            train_discriminator(head, fe[train_e], fa[train_a], epochs=d.epochs, lr=d.lr, batch_size=d.batch_size,
                                seed=cfg.seed * 1000 + self.iteration)
        else:
            we, wa = ([window(x, d.max_tokens) for x in seqs] for seqs in (expert_seqs, agent_seqs))
            score = lambda: tuple(  # noqa: E731
                lora_logits(backbone, head, w, batch_size=d.feature_batch_size, pad_id=pad_id, desc=f"score {what} steps")
                for w, what in ((we, "expert"), (wa, "agent")))
            before = score()
            train_lora_discriminator(backbone, head, [we[i] for i in train_e], [wa[j] for j in train_a],
                                     epochs=d.epochs, lr=d.lr, lora_lr=d.lora_lr, batch_size=d.batch_size,
                                     micro_batch_size=d.feature_batch_size, seed=cfg.seed * 1000 + self.iteration,
                                     pad_id=pad_id)
        with torch.no_grad():
            le, la = score()
        metrics.update(release_freed_memory())  # before the update's trainer starts beside the rollout engines
        fit = lambda e, a: discriminator_metrics(e[train_e], a[train_a])  # noqa: E731  (on the steps D trained on)
        rewards = gail_reward(la)  # (N_a,) log D(ŝ_i, a_i^θ), with the updated D
        advantages = step_advantages(rewards, groups)
        metrics.update({f"disc/{k}": v for k, v in fit(le, la).items()})
        if held:
            out_e, out_a = sorted(held), [j for j, g in enumerate(groups) if g in held]
            acc_e, acc_a = (le[out_e] > 0).float().mean().item(), (la[out_a] < 0).float().mean().item()
            metrics.update({"disc/heldout_acc_expert": acc_e, "disc/heldout_acc_agent": acc_a,
                            "disc/heldout_acc": (acc_e + acc_a) / 2, "disc/heldout_steps": len(out_e) + len(out_a)})
        metrics.update({"disc/loss_before": fit(*before)["loss"], "data/expert_steps": len(expert_seqs),
                        "data/ppo_examples": len(agent_seqs), "reward/mean": rewards.mean().item(),
                        "reward/min": rewards.min().item(), "advantage/abs_mean": advantages.abs().mean().item()})
        data = [PPOExample(s, a, r) for s, a, r in zip(agent_seqs, advantages.tolist(), rewards.tolist())]
        write_inspection(self, samples, agrees, reward=[d.reward for d in data], advantage=[d.advantage for d in data])
        metrics.update(self.update(data))
        return metrics
