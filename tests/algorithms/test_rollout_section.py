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
    # vLLM: passed through untouched (vLLM checks them when the workers start), threads beside them.
    cfg = from_dict(SFTConfig, {"rollout": {"engine": "vllm", "num_gpus_per_worker": 1, "dtype": "bfloat16",
                                            "threads_per_worker": 2,
                                            "engine_kwargs": {"gpu_memory_utilization": 0.8, "max_model_len": 4096}}})
    spec = cfg.rollout.engine_spec("/m")
    assert (spec.kind, spec.device, spec.dtype) == ("vllm", "cuda", "bfloat16")
    assert spec.kwargs == {"num_threads": 2, "gpu_memory_utilization": 0.8, "max_model_len": 4096}


def test_vllm_cpu_defaults_leave_room_for_a_second_engine_and_spread_threads(monkeypatch):
    """On CPU, vLLM's defaults reserve 90% of the RAM for one engine's KV cache and bind every
    engine of a node to the same cores; `cpu_defaults` sizes the cache and unbinds the threads,
    unless the user set either."""
    import os

    from rl_agents.engines.vllm import CPU_KV_CACHE_BYTES, cpu_defaults

    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"):
        monkeypatch.setenv(var, "x")  # recorded, so that teardown restores what was there before
        monkeypatch.delenv(var)
    assert cpu_defaults({}, 1) == {"enforce_eager": True, "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert (os.environ["VLLM_CPU_OMP_THREADS_BIND"], os.environ["OMP_NUM_THREADS"]) == ("nobind", "1")
    # A second engine of the process with other threads: its own count.
    cpu_defaults({}, 2)
    assert (os.environ["VLLM_CPU_OMP_THREADS_BIND"], os.environ["OMP_NUM_THREADS"]) == ("nobind", "2")
    # The user's settings win: a cache size in the kwargs or the environment, a binding of their own
    # (with its OMP_NUM_THREADS).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert cpu_defaults({"kv_cache_memory_bytes": 5, "enforce_eager": False}, 2) == {"kv_cache_memory_bytes": 5,
                                                                                      "enforce_eager": False}
    assert (os.environ["VLLM_CPU_OMP_THREADS_BIND"], os.environ["OMP_NUM_THREADS"]) == ("0-1", "7")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cpu_defaults({}, None) == {"enforce_eager": True}


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
