"""`rollout.engine_kwargs`: passed to the engine the rollout workers build; HF keys checked at load."""

from __future__ import annotations

import pytest

from algorithms.imitation import SFTConfig
from rl_agents.config import ConfigError, from_dict


def test_engine_kwargs_reach_the_engine_spec():
    cfg = from_dict(SFTConfig, {"rollout": {"threads_per_worker": 1, "engine_kwargs": {"prefix_cache_mb": 0}}})
    spec = cfg.rollout.engine_spec("runs/x/policy")
    assert (spec.kind, spec.model, spec.device) == ("hf", "runs/x/policy", "cpu")
    assert spec.kwargs == {"num_threads": 1, "prefix_cache_mb": 0}
    # vLLM: passed through untouched (vLLM checks them when the workers start); no torch threads.
    cfg = from_dict(SFTConfig, {"rollout": {"engine": "vllm", "num_gpus_per_worker": 1, "dtype": "bfloat16",
                                            "threads_per_worker": 2,
                                            "engine_kwargs": {"gpu_memory_utilization": 0.8, "max_model_len": 4096}}})
    spec = cfg.rollout.engine_spec("/m")
    assert (spec.kind, spec.device, spec.dtype) == ("vllm", "cuda", "bfloat16")
    assert spec.kwargs == {"gpu_memory_utilization": 0.8, "max_model_len": 4096}


def test_engine_kwargs_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rollout.engine_kwargs: \['gpu_memory_utilization'\] are not arguments "
                                          r"of the hf engine; valid: .*prefix_cache_mb"):
        from_dict(SFTConfig, {"rollout": {"engine_kwargs": {"gpu_memory_utilization": 0.8}}})
    with pytest.raises(ConfigError, match=r"rollout.engine_kwargs: \['dtype'\] are set by rollout.dtype"):
        from_dict(SFTConfig, {"rollout": {"engine": "vllm", "engine_kwargs": {"dtype": "float16"}}})


def test_sync_check_auto_skips_large_policies(tmp_path):
    """'auto' compares engine and trainer log-probs only for small checkpoints (the driver loads the
    policy in fp32 on CPU); 'always'/'never' override. Sizes from sparse files."""
    from algorithms.base import SYNC_CHECK_MAX_BYTES, should_check_sync

    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir(), big.mkdir()
    with open(small / "model.safetensors", "wb") as f:
        f.truncate(SYNC_CHECK_MAX_BYTES - 1)
    for i in (1, 2):  # two shards of 1.5 GiB: 3 GiB in all
        with open(big / f"model-0000{i}-of-00002.safetensors", "wb") as f:
            f.truncate(3 * 2**29)
    assert should_check_sync(small, "auto") is True
    assert should_check_sync(big, "auto") is False
    assert should_check_sync(big, "always") is True and should_check_sync(small, "never") is False
    with pytest.raises(ConfigError, match="rollout.sync_check"):
        from_dict(SFTConfig, {"rollout": {"sync_check": "sometimes"}})
