"""Generation engines behind one interface (token-id prompts -> ids, text, log-probs).

`HFEngine` (Hugging Face `generate`, the CPU default), `VLLMEngine` (vLLM, optional extra,
imported lazily) and `ScriptedEngine` (a fixed policy for env-bound benchmarks). Rollout workers
build theirs from a picklable `EngineSpec` with `make_engine`.
"""

from collections.abc import Callable

from rl_agents.engines.base import (
    ENGINE_KINDS,
    Engine,
    EngineSpec,
    Generation,
    SamplingParams,
    ScriptedEngine,
    logprob_diff,
    sync_probe_prompts,
    trainer_logprobs,
)


def _hf(**kw) -> Engine:
    from rl_agents.engines.hf import HFEngine

    return HFEngine(**kw)


def _vllm(**kw) -> Engine:
    from rl_agents.engines.vllm import VLLMEngine

    return VLLMEngine(**kw)


ENGINES: dict[str, Callable[..., Engine]] = {"hf": _hf, "vllm": _vllm, "scripted": ScriptedEngine}
"""`EngineSpec.kind` -> constructor (keyword arguments: model, dtype, device and the spec's kwargs)."""
assert set(ENGINES) == set(ENGINE_KINDS)


def make_engine(spec: EngineSpec) -> Engine:
    """Build the engine a spec describes (inside the rollout actor)."""
    return ENGINES[spec.kind](model=spec.model, dtype=spec.dtype, device=spec.device, **spec.kwargs)


__all__ = ["ENGINES", "Engine", "EngineSpec", "Generation", "SamplingParams", "ScriptedEngine", "logprob_diff",
           "make_engine", "sync_probe_prompts", "trainer_logprobs"]
