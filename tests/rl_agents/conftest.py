"""Fixtures of the engine, rollout and evaluation tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model gains nothing from 2 threads, and on a shared 2-core box OpenMP threads
    spinning against other processes make small matmuls ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_session():
    """A 2-CPU local Ray cluster for one test module, started as every local run starts it."""
    import ray

    from rl_agents.ray_utils import init_ray

    assert init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def policy_dir(smollm2_dir):
    """A tiny Llama whose greedy outputs are not trivial (untied embeddings, larger init): the
    default tied tiny model just repeats its last token, which would make equality tests vacuous."""
    from rl_agents.models import tiny_llama_dir

    return tiny_llama_dir(tie_word_embeddings=False, initializer_range=0.1)
