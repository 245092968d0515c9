"""Generation engines: the HF engine's batching, log-probs, seeds and stops; weight updates and
the stale-weight check; the interface's validation. (vLLM cannot be installed here: only its
import-time behaviour is tested.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rl_agents.engines import (EngineSpec, SamplingParams, ScriptedEngine, logprob_diff, sync_probe_prompts,
                               trainer_logprobs)
from rl_agents.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(policy_dir):
    return HFEngine(str(policy_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Hi", "You are in a kitchen with a fridge and a table and a red apple.", "search[red shirt]",
             "Thought: the number is higher than 50 so I try 75.\nAction: guess[75] and then"]
    return [tokenizer.encode(t) for t in texts]


def test_batched_greedy_equals_one_at_a_time(engine, prompts):
    """Left padding with position ids from the attention mask: same ids, log-probs to fp32 noise."""
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len({tuple(g.token_ids) for g in batched}) == len(prompts)
    gap = max(abs(a - b) for x, y in zip(batched, single) for a, b in zip(x.logprobs, y.logprobs))
    assert gap < 1e-4


def test_raw_logprobs_are_the_trainers(engine, prompts, policy_dir):
    """Default raw log-probs = the model's own distribution, for greedy and for sampled tokens."""
    from rl_agents.models import load_model

    model = load_model(policy_dir).eval()
    for params in (SamplingParams(temperature=0.0, max_new_tokens=8),
                   SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=1)):
        for p, g in zip(prompts, engine.generate(prompts, params)):
            ref = trainer_logprobs(model, p, g.token_ids)
            assert max(abs(a - b) for a, b in zip(ref, g.logprobs)) < 1e-4


def test_processed_logprobs_are_the_sampling_distribution(policy_dir, prompts):
    raw, proc = HFEngine(str(policy_dir)), HFEngine(str(policy_dir), logprobs_mode="processed")
    plain = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    for a, b in zip(raw.generate(prompts, plain), proc.generate(prompts, plain)):  # T=1, no top-p: identical
        assert a.token_ids == b.token_ids and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    hot = SamplingParams(temperature=0.5, top_p=0.5, max_new_tokens=6, seed=3)
    for a, b in zip(raw.generate(prompts, hot), proc.generate(prompts, hot)):
        assert a.token_ids == b.token_ids  # same seed, same samples
        assert all(y >= x - 1e-6 for x, y in zip(a.logprobs, b.logprobs))  # sharper and truncated: higher
        assert sum(b.logprobs) > sum(a.logprobs) + 1e-3
    with pytest.raises(ValueError, match="logprobs_mode"):
        HFEngine(str(policy_dir), logprobs_mode="nope")


def test_seeds_make_sampling_reproducible(engine, prompts):
    draw = lambda seed: [g.token_ids for g in engine.generate(prompts, SamplingParams(  # noqa: E731
        temperature=1.0, max_new_tokens=8, seed=seed))]
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_generation_stops_at_the_first_stop_token_inclusive(engine, prompts):
    free = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == len(free.logprobs) == 12
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    cut = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,)))[0]
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-5)
    assert cut.text == engine.tokenizer.decode(cut.token_ids, skip_special_tokens=True)


def _multi_turn(engine, prompts, turns=3):
    """Each prompt grows like an episode's context: + generated ids + a fixed 'observation'."""
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    ctx, out = [list(p) for p in prompts], []
    for t in range(turns):
        gens = engine.generate(ctx[: len(ctx) - 1] if t else ctx, params)  # episodes end at different turns
        out.append(gens)
        ctx = [c + g.token_ids + [9, 10 + t] for c, g in zip(ctx, gens)]
    return out


def test_prefix_cache_changes_nothing_but_the_work(policy_dir, prompts):
    cached, plain = HFEngine(str(policy_dir)), HFEngine(str(policy_dir), prefix_cache_mb=0)
    a, b = _multi_turn(cached, prompts), _multi_turn(plain, prompts)
    assert [[g.token_ids for g in turn] for turn in a] == [[g.token_ids for g in turn] for turn in b]
    gap = max(abs(x - y) for ta, tb in zip(a, b) for ga, gb in zip(ta, tb) for x, y in zip(ga.logprobs, gb.logprobs))
    assert gap < 1e-4
    pc = cached.prefix_cache
    assert pc.hits == sum(len(turn) for turn in a[1:])  # every later turn reused its episode's KV
    assert pc.reused_tokens > sum(map(len, prompts))


def test_prefix_cache_takes_the_longest_common_prefix():
    """Whole kept sequence: used up. Partial match: a view of its first n positions, entry kept
    (and moved to most recent). Never the whole prompt: one token must be fed."""
    from rl_agents.engines.hf import PrefixCache

    def kv(n, tag):  # (layers, 2, kv_heads, n, head_dim); value = tag * 100 + position
        return (tag * 100 + torch.arange(n, dtype=torch.float32)).view(1, 1, 1, n, 1).expand(2, 2, 1, n, 3).clone()

    pc = PrefixCache(10**9)
    pc.put([1, 2, 3, 4, 5], kv(5, 1))
    pc.put([1, 2, 7, 8], kv(4, 2))
    n, got = pc.take([1, 2, 3, 9, 9])  # shares 3 with entry 1, 2 with entry 2
    assert n == 3 and got[0, 0, 0, :, 0].tolist() == [100, 101, 102] and len(pc.entries) == 2
    assert [ids for ids, _ in pc.entries.values()] == [[1, 2, 7, 8], [1, 2, 3, 4, 5]]  # entry 1 most recent
    n, got = pc.take([1, 2, 3, 4, 5])  # the same sequence again: all but its last token
    assert n == 4 and got.shape[3] == 4 and len(pc.entries) == 2
    n, got = pc.take([1, 2, 3, 4, 5, 6])  # extends entry 1: used up
    assert n == 5 and got[0, 0, 0, :, 0].tolist() == [100, 101, 102, 103, 104]
    assert [ids for ids, _ in pc.entries.values()] == [[1, 2, 7, 8]]
    assert pc.take([5, 1, 2]) == (0, None)
    assert (pc.hits, pc.reused_tokens) == (3, 12)
    assert pc.bytes == kv(4, 2).numel() * 4


def test_prefix_cache_reuses_step_prefixes(policy_dir, prompts):
    """StepAgent inspection: prefix k + 1 extends prefix k, whose kept entry went on with the
    engine's own sample; two samples per prefix. Same ids and log-probs as without the cache,
    and only the new tokens of each later prefix are prefilled."""
    cached, plain = HFEngine(str(policy_dir)), HFEngine(str(policy_dir), prefix_cache_mb=0)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    base = prompts[1]
    steps = [base, base + [9, 10, 11, 12], base + [9, 10, 11, 12, 13, 14, 15]]
    for k, prefix in enumerate(steps):
        before = cached.prefix_cache.reused_tokens
        a, b = cached.generate([prefix, prefix], params), plain.generate([prefix, prefix], params)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert max(abs(x - y) for ga, gb in zip(a, b) for x, y in zip(ga.logprobs, gb.logprobs)) < 1e-4
        assert cached.prefix_cache.reused_tokens - before == (2 * len(steps[k - 1]) if k else 0)


def test_prefix_cache_budget_holds_every_episode_of_a_worker(policy_dir, prompts):
    """Automatic budget: a rollout worker reserves K episodes x max_context tokens of KV (the real
    per-token size: a cached entry's bytes / its length); an explicit prefix_cache_mb is kept."""
    from rl_agents.engines.hf import DEFAULT_PREFIX_CACHE_MB
    from rl_agents.rollout import RolloutConfig, RolloutWorker

    eng = HFEngine(str(policy_dir))
    eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=3))
    (ids, kv), = eng.prefix_cache.entries.values()
    per_token = kv.numel() * kv.element_size() // len(ids)
    assert eng.kv_bytes_per_token() == per_token
    floor = DEFAULT_PREFIX_CACHE_MB * 2**20
    assert eng.prefix_cache.max_bytes == floor
    RolloutWorker(eng, RolloutConfig("rl_agents/TextShop-v0", num_envs=2, max_context=64))  # fits the floor
    assert eng.prefix_cache.max_bytes == floor
    big = floor // per_token + 1  # tokens: two episodes of this need more than the floor
    RolloutWorker(eng, RolloutConfig("rl_agents/TextShop-v0", num_envs=2, max_context=big))
    assert eng.prefix_cache.max_bytes == 2 * big * per_token > floor
    fixed = HFEngine(str(policy_dir), prefix_cache_mb=1)
    RolloutWorker(fixed, RolloutConfig("rl_agents/TextShop-v0", num_envs=2, max_context=big))
    assert fixed.prefix_cache.max_bytes == 2**20


def test_prefix_cache_is_dropped_with_the_old_weights(policy_dir, prompts, tmp_path):
    _perturbed(policy_dir).save_pretrained(tmp_path / "ckpt")
    eng = HFEngine(str(policy_dir))
    first = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4))
    eng.update_weights(tmp_path / "ckpt")
    assert not eng.prefix_cache.entries
    follow = [p + g.token_ids + [9] for p, g in zip(prompts, first)]
    fresh = HFEngine(str(tmp_path / "ckpt"), prefix_cache_mb=0, tokenizer=str(policy_dir))
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    for x, y in zip(eng.generate(follow, params), fresh.generate(follow, params)):
        assert x.token_ids == y.token_ids and x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def _perturbed(policy_dir, scale=0.05):
    from rl_agents.models import load_model

    torch.manual_seed(0)
    model = load_model(policy_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def check_weight_sync(engine, trainer) -> float:
    """What `RolloutGroup.check_weight_sync` runs on each worker, on one engine."""
    prompts = sync_probe_prompts(engine.tokenizer)
    return logprob_diff(trainer, prompts, engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8)))


def test_weight_sync_check_catches_stale_full_weights(policy_dir, tmp_path):
    eng = HFEngine(str(policy_dir))
    trainer = _perturbed(policy_dir)
    trainer.save_pretrained(tmp_path / "ckpt")
    before = check_weight_sync(eng, trainer)
    eng.update_weights(tmp_path / "ckpt")
    after = check_weight_sync(eng, trainer)
    assert before > 1e-2 and after < 1e-4, (before, after)
    assert eng.weights_path == str(tmp_path / "ckpt")


def test_weight_sync_check_catches_a_lora_adapter_that_never_arrived(policy_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rl_agents.models import load_model

    eng = HFEngine(str(policy_dir))
    torch.manual_seed(0)
    trainer = get_peft_model(load_model(policy_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in trainer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trainer.eval().save_pretrained(tmp_path / "adapter")
    before = check_weight_sync(eng, trainer)
    eng.update_weights(tmp_path / "adapter")
    after = check_weight_sync(eng, trainer)
    eng.update_weights(tmp_path / "adapter")  # merged into a fresh base each time: never stacks
    again = check_weight_sync(eng, trainer)
    assert before > 1e-2 and after < 1e-4 and again < 1e-4, (before, after, again)


def test_scripted_engine(smollm2_dir):
    eng = ScriptedEngine(str(smollm2_dir), policy=lambda prompt: f"Action: echo {len(prompt)}",
                         end_of_turn="<|im_end|>")
    (g,) = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=50, stop_token_ids=(2,)))
    assert g.text.startswith("Action: echo ") and g.token_ids[-1] == 2 and g.finish_reason == "stop"
    (cut,) = eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
    assert len(cut.token_ids) == 2 and cut.finish_reason == "length"


def test_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="engine kind"):
        EngineSpec("tensorrt")
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_engine_explains_how_to_install(smollm2_dir):
    from rl_agents.engines.vllm import VLLMEngine

    with pytest.raises(ImportError, match=r"rl-agents\[vllm\]"):
        VLLMEngine(str(smollm2_dir))
