"""StepAgent losses: Step-DPO (eq. 6: DPO on step pairs) and the GAIL discriminator / reward (eq. 10-11, Alg. 1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import dpo_loss, gail_discriminator_loss, gail_reward

f64 = torch.float64


def test_step_dpo_hand_value():
    """β = 0.1. Expert action â_i: log πθ = -3, log πref = -4 → Δ_w = 1. Agent action a_i^θ: log πθ = -2,
    log πref = -1 → Δ_l = -1. z = 0.1 · (1 - (-1)) = 0.2, loss = log(1 + e^-0.2) = log(1.8187308) = 0.5981389."""
    loss = dpo_loss(torch.tensor([-3.0], dtype=f64), torch.tensor([-4.0], dtype=f64),
                    torch.tensor([-2.0], dtype=f64), torch.tensor([-1.0], dtype=f64), beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.5981389], dtype=f64), atol=1e-7, rtol=0)


def test_discriminator_loss_hand_value():
    """D = σ(logit) = P(expert). Expert logits (0, 2), agent logits (0, -1, 1).
    Expert term: mean(-log σ(0), -log σ(2)) = mean(log 2, log(1 + e^-2)) = mean(0.6931472, 0.1269280) = 0.4100376.
    Agent term: mean(-log(1-σ(x))) = mean(log(1+e^x)) for x = 0, -1, 1
              = (0.6931472 + 0.3132617 + 1.3132617) / 3 = 2.3196705 / 3 = 0.7732235.
    loss = ½ (0.4100376 + 0.7732235) = 0.5916306."""
    loss = gail_discriminator_loss(torch.tensor([0.0, 2.0], dtype=f64), torch.tensor([0.0, -1.0, 1.0], dtype=f64))
    torch.testing.assert_close(loss, torch.tensor(0.5916306, dtype=f64), atol=1e-7, rtol=0)


def test_discriminator_loss_is_bce_with_expert_label_one():
    """With as many expert as agent steps it is binary cross-entropy on the pooled batch, expert = 1, agent = 0."""
    g = torch.Generator().manual_seed(1)
    e, a = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    bce = F.binary_cross_entropy_with_logits(torch.cat([e, a]), torch.cat([torch.ones(8), torch.zeros(8)]))
    torch.testing.assert_close(gail_discriminator_loss(e, a), bce)


def test_discriminator_at_chance_is_log2_and_gradients_point_the_right_way():
    """D = ½ everywhere → loss = ½(log 2 + log 2) = log 2. Descending the loss raises D on expert steps
    (gradient on expert logits < 0) and lowers it on agent steps (> 0): d/dx softplus(∓x)/2n = ∓σ(∓x)/2n = ∓1/8."""
    e = torch.zeros(2, requires_grad=True)
    a = torch.zeros(2, requires_grad=True)
    loss = gail_discriminator_loss(e, a)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    torch.testing.assert_close(e.grad, torch.full((2,), -0.125))
    torch.testing.assert_close(a.grad, torch.full((2,), 0.125))


def test_discriminator_classes_are_balanced():
    """3 practice samples per expert step: duplicating agent samples does not change the loss (per-class means)."""
    e, a = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0])
    torch.testing.assert_close(gail_discriminator_loss(e, a), gail_discriminator_loss(e, a.repeat(3)))


def test_discriminator_rejects_empty_side():
    with pytest.raises(ValueError):
        gail_discriminator_loss(torch.zeros(0), torch.zeros(3))


def test_gail_reward_is_log_d():
    """r = log σ(logit): logits (0, 2, -3, -1000) → (-0.6931472, -0.1269280, -3.0485874, -1000); detached."""
    logits = torch.tensor([0.0, 2.0, -3.0, -1000.0], requires_grad=True)
    r = gail_reward(logits)
    torch.testing.assert_close(r, torch.tensor([-0.6931472, -0.1269280, -3.0485874, -1000.0]))
    torch.testing.assert_close(r[:3], torch.log(torch.sigmoid(logits[:3].detach())))
    assert not r.requires_grad
    assert r[1] > r[0] > r[2]  # more expert-like (higher D) → higher reward


# ---- inspection scheduling ---------------------------------------------------------------------
@pytest.mark.slow
def test_inspection_waves_reuse_each_prefix_and_keep_the_order():
    """inspect_steps sends each expert's prefixes to one worker, one wave per step, in order: the
    engine prefills prefix k + 1 past the cached prefix k (reused tokens >= samples x |prefix k|
    per later step; one call of everything, as before, reuses none), and practices come back in
    task, step, sample order. Fake workers wrap real HF engines so their caches can be read."""
    from types import SimpleNamespace

    import ray

    from rl_agents.rollout_group import RolloutSection
    from algorithms.data import step_prefixes
    from algorithms.stepagent import inspect_steps
    from rl_agents.engines.hf import HFEngine
    from rl_agents.experts import iter_expert_trajectories
    from rl_agents.models import load_tokenizer, tiny_llama_dir
    from rl_agents.ray_utils import init_ray
    from rl_agents.tokenization import ChatSegmenter, tokenize_rollout_turns

    model = tiny_llama_dir()
    seg = ChatSegmenter(load_tokenizer(model))
    experts = list(iter_expert_trajectories("rl_agents/TextShop-v0", "train", limit=3))
    samples, steps = 2, 3

    class Worker:
        def __init__(self):
            self.engine, self.calls = HFEngine(str(model)), []
            self.generate = SimpleNamespace(remote=self._generate)

        def _generate(self, prompts, params):
            self.calls.append(len(prompts))
            return ray.put(self.engine.generate(prompts, params))

    workers = [Worker(), Worker()]
    algo = SimpleNamespace(segmenter=lambda: seg, iteration=1, group=lambda: SimpleNamespace(workers=workers),
                           experts=lambda: {t.task_id: t for t in experts},
                           config=SimpleNamespace(seed=0, rollout=RolloutSection(temperature=1.0, max_new_tokens=6)))
    started = init_ray(num_cpus=1, log_to_driver=False)
    try:
        practices = inspect_steps(algo, samples, steps)
    finally:
        if started:
            ray.shutdown()
    want = [(e.task_id, k) for e in experts for k, _ in enumerate(step_prefixes(e)[:steps]) for _ in range(samples)]
    got = [(p.expert.task_id, p.prompt.step) for p in practices]
    assert got == want and all(p.action_ids for p in practices)
    assert workers[0].calls == [2 * samples] * steps and workers[1].calls == [samples] * steps  # tasks 0, 2 | 1
    for w, mine in zip(workers, (experts[0::2], experts[1::2])):
        lengths = [[len([i for ids in tokenize_rollout_turns(sp.prefix.turns, seg) for i in ids])
                    for sp in step_prefixes(e)[:steps]] for e in mine]
        floor = samples * sum(n for ls in lengths for n in ls[:-1])
        assert floor <= w.engine.prefix_cache.reused_tokens <= floor + samples * len(mine) * (steps - 1) * 6
