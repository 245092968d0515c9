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


@torch.no_grad()
def action_features(backbone: nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """φ: (B, H) float32, the mean of the backbone's final-layer hidden states over each row's
    action tokens (`action_mask` == 1: the tokens of the step's action, never the prefix)."""
    out = backbone.base_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False)
    hidden = out.last_hidden_state.float()  # (B, L, H)
    mask = tokens.action_mask.to(hidden.dtype)[..., None]  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)


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


class DiscriminatorHead(nn.Module):
    """The trainable part of D: features (N, H) -> logits (N,), D = σ(logit) = P(expert | s, a)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def train_discriminator(head: DiscriminatorHead, expert: torch.Tensor, agent: torch.Tensor, *, epochs: int,
                        lr: float, batch_size: int, seed: int) -> float:
    """Adam on `gail_discriminator_loss`: `epochs` passes over expert (N_e, H) and agent (N_a, H)
    features, each mini-batch holding a shuffled share of both classes. Returns the last epoch's
    mean loss."""
    gen = torch.Generator().manual_seed(seed)
    n_e, n_a = len(expert), len(agent)
    n_batches = max(1, min(math.ceil((n_e + n_a) / batch_size), n_e, n_a))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    last = float("nan")
    for _ in range(epochs):
        losses = []
        for ie, ia in zip(torch.randperm(n_e, generator=gen).tensor_split(n_batches),
                          torch.randperm(n_a, generator=gen).tensor_split(n_batches)):
            loss = gail_discriminator_loss(head(expert[ie]), head(agent[ia]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        last = sum(losses) / len(losses)
    head.eval()
    return last


@torch.no_grad()
def discriminator_metrics(head: DiscriminatorHead, expert: torch.Tensor, agent: torch.Tensor) -> dict[str, float]:
    """loss, accuracy per class (D > ½ on expert, D < ½ on agent) and mean D per class."""
    le, la = head(expert), head(agent)
    return {"loss": gail_discriminator_loss(le, la).item(), "acc_expert": (le > 0).float().mean().item(),
            "acc_agent": (la < 0).float().mean().item(), "d_expert": torch.sigmoid(le).mean().item(),
            "d_agent": torch.sigmoid(la).mean().item()}


def save_head(head: DiscriminatorHead, path: str | os.PathLike, *, iteration: int) -> None:
    """safetensors weights + metadata (dims, iteration), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "rl_agents": json.dumps(
        {"dim": head.dim, "hidden": head.hidden, "iteration": iteration})})
    os.replace(tmp, path)


def load_head(path: str | os.PathLike) -> tuple[DiscriminatorHead, int]:
    """-> (head, the iteration it was saved at)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rl_agents"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    head = DiscriminatorHead(meta["dim"], meta["hidden"])
    head.load_state_dict(state, strict=True)
    return head.eval(), int(meta["iteration"])


# ─────────────────────────────── algorithm ───────────────────────────────


@dataclass
class StepGAILConfig(AlgorithmConfig):
    """StepAgent-inverse. D(s, a) = σ(head(φ(s, a))): φ = mean final-layer hidden state over the action
    tokens of a frozen copy of the starting policy (`model`), head = LayerNorm → Linear(H, disc_hidden)
    → ReLU → Linear(disc_hidden, 1), trained with Adam; PPO on r = log D (module docstring)."""

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
    disc_hidden: int = 256
    """Hidden width of the discriminator head (not reported)."""
    disc_lr: float = 1e-3
    """Adam learning rate of the head (not reported)."""
    disc_epochs: int = 5
    """Passes of the head over each iteration's expert and agent steps (not reported)."""
    disc_batch_size: int = 64
    """Steps (expert + agent) per head update."""
    feature_batch_size: int = 8
    """Actions per no-grad backbone forward on a cached prefix when computing φ in the driver (bounds its memory)."""
    feature_device: str = "cpu"
    """Device of the frozen backbone in the driver ('cpu': float32; 'cuda[:k]': bfloat16)."""
    train: TrainConfig = field(default_factory=reflection_train)
    """Paper defaults (StepAgent reflection, §6.4): lr 5e-7, batch 16, 1 epoch."""
    algo = "step_gail"

    def __post_init__(self):
        super().__post_init__()
        if self.practice_samples < 2:
            raise ConfigError(f"practice_samples: the baseline is the mean reward of a prefix's samples, "
                              f"needs >= 2, got {self.practice_samples}")
        for name in ("disc_hidden", "disc_epochs", "disc_batch_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.disc_lr) and self.disc_lr > 0):
            raise ConfigError(f"disc_lr: must be a finite number > 0, got {self.disc_lr}")
        try:
            torch.device(self.feature_device)
        except RuntimeError:
            raise ConfigError(f"feature_device: not a torch device, got {self.feature_device!r}") from None


@register_algorithm
class StepGAIL(Algorithm):
    config_class = StepGAILConfig

    def __init__(self, config: StepGAILConfig):
        super().__init__(config)
        self._backbone: nn.Module | None = None
        self._head: DiscriminatorHead | None = None
        self._head_dir = self.run_dir  # where a restored run's head lies

    # ---- discriminator state ---------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The frozen feature extractor: the run's starting policy (not the current one)."""
        if self._backbone is None:
            from rl_agents.models import load_model

            device = torch.device(self.config.feature_device)
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
            self._backbone = load_model(self.config.model, dtype=dtype).to(device).eval().requires_grad_(False)
        return self._backbone

    def discriminator(self) -> DiscriminatorHead:
        """The head: new (seeded) at iteration 0, else the one saved with this iteration's state."""
        if self._head is None:
            if self.iteration == 0:
                with torch.random.fork_rng():
                    torch.manual_seed(self.config.seed)
                    dim = self.backbone().config.get_text_config().hidden_size
                    self._head = DiscriminatorHead(dim, self.config.disc_hidden).eval()
            else:
                path = self._head_dir / DISC_FILE
                if not path.exists():
                    raise FileNotFoundError(f"{path}: no discriminator saved with this run's state (iteration "
                                            f"{self.iteration})")
                head, saved_at = load_head(path)
                if saved_at != self.iteration:
                    raise RuntimeError(f"{path} is from iteration {saved_at}, the run state from {self.iteration}")
                self._head = head
        return self._head

    def save(self, path: str | Path | None = None) -> str:
        """`state.json` plus `discriminator.safetensors` (written first: a crash in between leaves a
        mismatch that `discriminator()` reports, never a silently stale head)."""
        out = Path(path) if path else self.run_dir
        if self._head is not None:
            save_head(self._head, out / DISC_FILE, iteration=self.iteration)
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

        backbone = self.backbone()
        pad_id = backbone.config.pad_token_id or 0
        # One call: a prefix's expert step and its agent samples share the prefix forward.
        feats = sequence_features(backbone, expert_seqs + agent_seqs, batch_size=cfg.feature_batch_size, pad_id=pad_id)
        fe, fa = feats[:len(expert_seqs)], feats[len(expert_seqs):]
        before = discriminator_metrics(head, fe, fa)  # last iteration's D on this iteration's samples
        train_discriminator(head, fe, fa, epochs=cfg.disc_epochs, lr=cfg.disc_lr, batch_size=cfg.disc_batch_size,
                            seed=cfg.seed * 1000 + self.iteration)
        after = discriminator_metrics(head, fe, fa)
        with torch.no_grad():
            rewards = gail_reward(head(fa))  # (N_a,) log D(ŝ_i, a_i^θ), with the updated head
        advantages = step_advantages(rewards, groups)
        metrics.update({f"disc/{k}": v for k, v in after.items()})
        metrics.update({"disc/loss_before": before["loss"], "data/expert_steps": len(expert_seqs),
                        "data/ppo_examples": len(agent_seqs), "reward/mean": rewards.mean().item(),
                        "reward/min": rewards.min().item(), "advantage/abs_mean": advantages.abs().mean().item()})
        data = [PPOExample(s, a, r) for s, a, r in zip(agent_seqs, advantages.tolist(), rewards.tolist())]
        write_inspection(self, samples, agrees, reward=[d.reward for d in data], advantage=[d.advantage for d in data])
        metrics.update(self.update(data))
        return metrics
