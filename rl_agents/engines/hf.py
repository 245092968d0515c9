"""Hugging Face `generate` engine: the CPU default (also runs on one GPU).

* Batched with LEFT padding and an attention mask. `generate` derives position ids from the
  mask (cumsum), so a left-padded row sees exactly the positions it would see alone: batched
  greedy decoding gives the same ids as one prompt at a time (tests/rl_agents/test_engines.py).
* KV cache: `generate`'s dynamic cache within a call, plus a prefix cache across calls
  (on by default; `prefix_cache_mb=0` turns it off). A multi-turn episode's next prompt is its
  previous prompt + the generated ids + the observation; instead of prefilling all of it again,
  the engine keeps each sequence's KV after a call and feeds a later prompt only the tokens past
  its longest common prefix with a kept sequence (`PrefixCache.take`): a whole kept sequence
  for the next turn of an episode (used up: the extended sequence replaces it), a part of one
  for a new episode sharing the system prompt, or for StepAgent's step prefixes (prefix k + 1
  of an expert trajectory extends prefix k; the kept entry is prefix k + the agent's sample).
  Rows with different cached lengths share a batch through the mask: each row is
  `[pad][cached tokens][pad][new tokens]` (holes are masked out, positions still come from the
  mask's cumsum). Entries are evicted least-recently-used beyond the budget and dropped on
  `update_weights` (KV computed with old weights is stale). Cached KV equals recomputed KV up
  to float rounding.
  Budget: `prefix_cache_mb` if given; else (None) 1 GiB, grown by a rollout worker to hold all
  its K episodes at full context (`reserve_prefix_cache(K, max_context)`): with less than K
  live episodes' KV, LRU over K entries put together misses on every turn once contexts grow.
* Log-probs, per generated token, from `generate`'s per-step outputs:
  - `logprobs_mode="raw"` (default): log_softmax of `output_logits`, the model's own
    distribution at temperature 1 without top-p. This is what the trainer computes, so the two
    are directly comparable (and it is vLLM's default `raw_logprobs`).
  - `logprobs_mode="processed"`: log_softmax of `output_scores`, the distribution actually
    sampled from (after temperature and top-p; tokens outside the nucleus are -inf).
  Greedy decoding uses no logits processors, so both modes agree there.
* Seeds: `generate` samples the whole batch from torch's global RNG, so `params.seed` seeds one
  batched call (under `torch.random.fork_rng`, leaving the caller's RNG alone). Sampled ids thus
  depend on the batch's composition; greedy ids do not.
* Memory: `generate` keeps one (batch, vocab) float tensor per step for the log-probs; batches
  are split into micro-batches of `max_batch_size` prompts.
"""

from __future__ import annotations

import gc
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rl_agents.engines.base import Engine, Generation, SamplingParams, is_lora_adapter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PREFIX_CACHE_MB = 1024  # floor of the automatic budget


class PrefixCache:
    """KV of recent sequences. `take(prompt)` returns the KV of the longest common prefix of
    `prompt` with any kept sequence (at most len(prompt) - 1 tokens: one must be fed).

    A kept sequence that is a whole prefix of the prompt is used up (the extended sequence will
    replace it: multi-turn episodes). One that matches only in part (another episode sharing the
    system prompt; a step prefix of an expert trajectory whose kept entry went on with the agent's
    own action instead of the expert's) lends a view of its first tokens and stays, marked as
    recently used. KV at position i depends only on tokens <= i, so any prefix of a kept KV is
    the KV of that prefix."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[int, tuple[list[int], torch.Tensor]] = OrderedDict()
        self._arrays: dict[int, np.ndarray] = {}
        self._ids = itertools.count()
        self.hits = self.reused_tokens = 0

    def take(self, prompt: list[int]) -> tuple[int, torch.Tensor | None]:
        x = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for key, ids in self._arrays.items():
            m = min(len(ids), len(x) - 1)
            if m <= best_n:
                continue
            diff = np.flatnonzero(ids[:m] != x[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return 0, None
        ids, kv = self.entries[best]
        if best_n == len(ids):
            self._drop(best)
        else:
            kv = kv[:, :, :, :best_n]
            self.entries.move_to_end(best)
        self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + best_n
        return best_n, kv

    def put(self, ids: list[int], kv: torch.Tensor) -> None:
        """kv: (layers, 2, kv_heads, len(ids), head_dim)."""
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return
        key = next(self._ids)
        self.entries[key], self._arrays[key] = (ids, kv), np.asarray(ids, dtype=np.int64)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        _, kv = self.entries.pop(key)
        del self._arrays[key]
        self.bytes -= kv.numel() * kv.element_size()

    def clear(self) -> None:
        self.entries.clear()
        self._arrays.clear()
        self.bytes = 0


class HFEngine(Engine):
    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", logprobs_mode: str = "raw",
                 max_batch_size: int = 64, num_threads: int | None = None, prefix_cache_mb: int | None = None,
                 tokenizer: str | None = None):
        """`model`: HF checkpoint dir or alias; `tokenizer`: its dir if the checkpoint has none."""
        from rl_agents.models import load_tokenizer, resolve_model

        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.base_path = Path(resolve_model(model))
        self.dtype, self.device = _DTYPES[dtype], torch.device(device)
        self.logprobs_mode, self.max_batch_size = logprobs_mode, max_batch_size
        self.tokenizer = load_tokenizer(tokenizer or self.base_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.model = self._load(self.base_path)
        self.weights_path = str(self.base_path)
        self.auto_prefix_cache = prefix_cache_mb is None
        mb = DEFAULT_PREFIX_CACHE_MB if prefix_cache_mb is None else prefix_cache_mb
        self.prefix_cache = PrefixCache(mb * 2**20) if mb > 0 else None
        self.prompt_tokens = 0

    def kv_bytes_per_token(self) -> int:
        """Bytes of cached K and V per token: layers x 2 x kv_heads x head_dim x dtype size."""
        c = self.model.config
        c = getattr(c, "text_config", None) or c
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return c.num_hidden_layers * 2 * kv_heads * head_dim * self.dtype.itemsize

    def reserve_prefix_cache(self, sequences: int, tokens: int) -> None:
        """Automatic budget (prefix_cache_mb=None): grow it to hold `sequences` contexts of `tokens`."""
        if self.prefix_cache is not None and self.auto_prefix_cache:
            need = sequences * tokens * self.kv_bytes_per_token()
            self.prefix_cache.max_bytes = max(self.prefix_cache.max_bytes, need)

    def _load(self, path: Path) -> torch.nn.Module:
        from rl_agents.models import load_model

        return load_model(path, dtype=self.dtype).to(self.device).eval()

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        self.prompt_tokens += sum(len(p) for p in prompts)  # prefilled = this - prefix_cache.reused_tokens
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch_size):
            out += self._generate_batch([list(p) for p in prompts[i : i + self.max_batch_size]], params)
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from transformers import DynamicCache, GenerationConfig

        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        hits = [self.prefix_cache.take(p) if self.prefix_cache else (0, None) for p in prompts]
        cached = max(n for n, _ in hits)  # C: width of the cached region
        fresh = max(len(p) - n for p, (n, _) in zip(prompts, hits))  # N: width of the new region
        width = cached + fresh
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, C + N)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, (p, (n, _)) in enumerate(zip(prompts, hits)):  # row: [pad][cached][pad][new]
            ids[b, cached - n : cached], mask[b, cached - n : cached] = torch.tensor(p[:n], dtype=torch.long), 1
            ids[b, width - len(p) + n :], mask[b, width - len(p) + n :] = torch.tensor(p[n:], dtype=torch.long), 1
        past = None
        if cached:
            like = next(kv for _, kv in hits if kv is not None)
            kv = torch.stack([torch.nn.functional.pad(kv, (0, 0, cached - n, 0)) if kv is not None else
                              like.new_zeros((*like.shape[:3], cached, like.shape[4])) for n, kv in hits])
            # kv: (B, layers, 2, kv_heads, C, head_dim)
            past = DynamicCache(ddp_cache_data=[(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])],
                                config=self.model.config)
        raw = self.logprobs_mode == "raw"
        sample = not params.greedy
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, min_new_tokens=0, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
            top_k=0 if sample else None, repetition_penalty=None,
            eos_token_id=list(params.stop_token_ids) or None, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=raw, output_scores=not raw)
        with torch.random.fork_rng(devices=[]):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      past_key_values=past, generation_config=config)
        new = res.sequences[:, width:].cpu()  # (B, G)
        steps = res.logits if raw else res.scores  # G x (B, V)
        lps = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(-1, new[:, t, None].to(s.device)).squeeze(-1)
                           for t, s in enumerate(steps)], dim=1).cpu()  # (B, G)
        gens = [self._finish(new[b].tolist(), lps[b].tolist(), params) for b in range(len(prompts))]
        if self.prefix_cache is not None:
            self._keep(prompts, gens, mask, width, res.past_key_values)
        return gens

    def _keep(self, prompts, gens, mask, width, past) -> None:
        """Cache each row's KV for prompt + generated[:-1] (the last generated token was never fed)."""
        layers = past.layers
        for b, (p, g) in enumerate(zip(prompts, gens)):
            idx = torch.cat([mask[b].nonzero().squeeze(-1), width + torch.arange(len(g.token_ids) - 1)])
            idx = idx.to(layers[0].keys.device)
            kv = torch.stack([torch.stack([la.keys[b].index_select(1, idx), la.values[b].index_select(1, idx)])
                              for la in layers])  # (layers, 2, kv_heads, n, head_dim)
            self.prefix_cache.put(p + g.token_ids[:-1], kv)

    # ---- weights ---------------------------------------------------------------------------
    def update_weights(self, path: str | Path) -> None:
        """Full checkpoint dir: load it. LoRA adapter dir: merge it into a fresh copy of the base model
        (the checkpoint this engine was created from), so adapters never stack."""
        path = Path(path)
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # KV computed with the old weights
        old, self.model = self.model, None
        del old
        gc.collect()
        if is_lora_adapter(path):
            from peft import PeftModel

            base = self._load(self.base_path)
            self.model = PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
        else:
            self.model = self._load(path)
        self.weights_path = str(path)

    def release_cache(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        gc.collect()

    def close(self) -> None:
        self.model = None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        gc.collect()
