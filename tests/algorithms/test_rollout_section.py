"""`rollout.engine_kwargs`: passed to the engine the rollout workers build; HF keys checked at load."""

from __future__ import annotations

import pytest

from algorithms.base import engine_spec
from algorithms.imitation import SFTConfig
from rl_agents.config import ConfigError, from_dict


def test_engine_kwargs_reach_the_engine_spec():
    cfg = from_dict(SFTConfig, {"rollout": {"threads_per_worker": 1, "engine_kwargs": {"prefix_cache_mb": 0}}})
    spec = engine_spec(cfg.rollout, "runs/x/policy")
    assert (spec.kind, spec.model, spec.device) == ("hf", "runs/x/policy", "cpu")
    assert spec.kwargs == {"num_threads": 1, "prefix_cache_mb": 0}
    # vLLM: passed through untouched (vLLM checks them when the workers start); no torch threads.
    cfg = from_dict(SFTConfig, {"rollout": {"engine": "vllm", "num_gpus_per_worker": 1, "dtype": "bfloat16",
                                            "threads_per_worker": 2,
                                            "engine_kwargs": {"gpu_memory_utilization": 0.8, "max_model_len": 4096}}})
    spec = engine_spec(cfg.rollout, "/m")
    assert (spec.kind, spec.device, spec.dtype) == ("vllm", "cuda", "bfloat16")
    assert spec.kwargs == {"gpu_memory_utilization": 0.8, "max_model_len": 4096}


def test_engine_kwargs_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rollout.engine_kwargs: \['gpu_memory_utilization'\] are not arguments "
                                          r"of the hf engine; valid: .*prefix_cache_mb"):
        from_dict(SFTConfig, {"rollout": {"engine_kwargs": {"gpu_memory_utilization": 0.8}}})
    with pytest.raises(ConfigError, match=r"rollout.engine_kwargs: \['dtype'\] are set by rollout.dtype"):
        from_dict(SFTConfig, {"rollout": {"engine": "vllm", "engine_kwargs": {"dtype": "float16"}}})
