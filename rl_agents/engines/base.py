"""The generation-engine interface: token-id prompts + sampling params -> ids, text, log-probs.

Every engine (Hugging Face `generate` on CPU, vLLM on GPU, a scripted policy for env-bound
benchmarks) takes *token ids*, never text, so the rollout worker controls the context token by
token and the engine never re-tokenises it.

An engine returns, per prompt, a `Generation`: the generated ids trimmed after the first stop
token (the stop token is kept: it is part of what the policy emitted), the sampling log-prob of
each of those ids, the decoded text without special tokens, and why generation stopped.

`logprob_diff(model, prompts, generations)` is the guard against the most common silent bug of RL
systems (stale rollout weights): the engines generate greedily, the trainer-side `model` scores
the same tokens teacher-forced, and the largest absolute log-prob difference comes back
(`rl_agents.rollout_group.RolloutGroup.check_weight_sync` runs it on every rollout worker).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. The same fields mean the same thing on every engine."""

    temperature: float = 1.0
    """0 = greedy (argmax); > 0 = sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with cumulative probability >= top_p."""
    max_new_tokens: int = 128
    """Generation stops after this many tokens (finish_reason 'length')."""
    seed: int | None = None
    """Seed of the sampling RNG for this call (HF: one seed per batched call, see HFEngine)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence stops after it emits any of these (the stop token is kept)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One generated continuation."""

    token_ids: list[int]
    """Generated ids, trimmed after the first stop token (inclusive)."""
    logprobs: list[float]
    """Log-prob of each id: by default under the model's own distribution (temperature 1, no
    top-p: what the trainer computes); `logprobs_mode="processed"` gives the tempered, truncated
    distribution actually sampled from."""
    text: str
    """`token_ids` decoded without special tokens."""
    finish_reason: str
    """'stop' (emitted a stop token) or 'length' (hit max_new_tokens)."""


ENGINE_KINDS = ("hf", "vllm", "scripted")
"""What `EngineSpec.kind` may name (`rl_agents.engines.make_engine` builds each)."""


@dataclass(frozen=True)
class EngineSpec:
    """What a rollout worker builds its engine from (picklable; the engine is made in the actor).

    kind: 'hf' (Hugging Face generate, CPU default), 'vllm' (GPU, optional extra) or 'scripted'
    (a fixed policy, no model: for env-bound benchmarks and tests).
    """

    kind: str = "hf"
    model: str = ""
    """HF model dir (or a name `rl_agents.models.resolve_model` knows); for 'scripted', the tokenizer dir."""
    dtype: str = "float32"
    """'float32' or 'bfloat16' (HF/vLLM)."""
    device: str = "cpu"
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the engine class (e.g. vLLM's gpu_memory_utilization)."""

    def __post_init__(self):
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind {self.kind!r} is not one of {sorted(ENGINE_KINDS)}")


class Engine(abc.ABC):
    """Generate from token-id prompts. Subclasses set `self.tokenizer` (a HF tokenizer)."""

    tokenizer: Any

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """One batched call: one `Generation` per prompt, in order."""

    def update_weights(self, path: str | Path) -> None:
        """Load new weights: an HF checkpoint dir (full weights) or a peft LoRA adapter dir."""
        raise NotImplementedError(f"{type(self).__name__} has no weights to update")

    def reserve_prefix_cache(self, sequences: int, tokens: int) -> None:
        """Room to keep `sequences` contexts of `tokens` between calls (a rollout worker's K episodes)."""

    def release_cache(self) -> None:
        """Free memory kept between calls (the HF engine's prefix cache); the engine stays usable."""

    def close(self) -> None:
        """Release the model (and the GPU); the engine is unusable afterwards."""

    def _finish(self, ids: list[int], lps: list[float], params: SamplingParams) -> Generation:
        """Trim after the first stop token and decode (shared by the engines)."""
        stops = set(params.stop_token_ids)
        reason = "length"
        for i, t in enumerate(ids):
            if t in stops:
                ids, lps, reason = ids[: i + 1], lps[: i + 1], "stop"
                break
        ids, lps = ids[: params.max_new_tokens], lps[: params.max_new_tokens]
        return Generation(list(ids), [float(x) for x in lps],
                          self.tokenizer.decode(ids, skip_special_tokens=True), reason)


def is_lora_adapter(path: str | Path) -> bool:
    """A peft adapter dir (has adapter_config.json) rather than a full checkpoint."""
    return (Path(path) / "adapter_config.json").is_file()


def import_object(path: str) -> Any:
    """'package.module:attr' -> the object."""
    mod, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    return getattr(importlib.import_module(mod), attr)


class ScriptedEngine(Engine):
    """A policy without a model: `policy(prompt_text) -> reply text`, encoded + end of turn.

    For env-bound benchmarks and tests, where the engine must cost ~nothing. `policy` is a
    callable or an import path 'module:function'; by default the same `reply` every turn.
    Log-probs are 0 (the policy is deterministic).
    """

    def __init__(self, model: str, reply: str = "Thought: I look around.\nAction: look around",
                 policy: str | Callable[[str], str] | None = None, end_of_turn: str | None = None, **_):
        from rl_agents.models import load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.policy = import_object(policy) if isinstance(policy, str) else policy
        self.reply = reply
        eot = end_of_turn or self.tokenizer.eos_token
        self.end_ids = self.tokenizer.encode(eot, add_special_tokens=False)

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = self.policy(self.tokenizer.decode(p)) if self.policy else self.reply
            ids = self.tokenizer.encode(text, add_special_tokens=False) + self.end_ids
            out.append(self._finish(ids, [0.0] * len(ids), params))
        return out


# ---- weight-sync check ------------------------------------------------------------------------
@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, prompt: Sequence[int], generated: Sequence[int]) -> list[float]:
    """log p(generated[i] | prompt + generated[:i]) under `model`, teacher-forced, in fp32."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(generated)], device=device)  # (1, L)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (G, V)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)  # (G,)
    return lp.tolist()


def logprob_diff(model: torch.nn.Module, prompts: Sequence[Sequence[int]], generations: Sequence[Generation]) -> float:
    """Max |engine log-prob - trainer log-prob| over all generated tokens (greedy generations)."""
    worst = 0.0
    for prompt, gen in zip(prompts, generations, strict=True):
        if not gen.token_ids:
            continue
        ref = trainer_logprobs(model, prompt, gen.token_ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, gen.logprobs, strict=True)))
    return worst


def sync_probe_prompts(tokenizer, n: int = 4) -> list[list[int]]:
    """A few fixed chat prompts for `check_weight_sync` (any tokens would do; these read well)."""
    texts = ["Thought: I should search for the item.\nAction:", "You are in a kitchen. There is a fridge.",
             "Instruction: buy a red shirt under 30 dollars.", "The number is higher. Next guess:"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in (texts * n)[:n]]
