"""StepAgent-inverse (GAIL + PPO) and the PPO baseline: the "ppo" objective against hand computations
on full logits, the precomputed old log-probs (ratio exactly 1 at step 0), PPO collation, the
discriminator's features / head / checkpoint, and the configs. All on the tiny random Llama (fp32)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from algorithms import ppo_loss
from algorithms.losses import PPOObjective
from algorithms.step_gail import (DISC_FILE, DiscriminatorHead, DiscriminatorSection, StepGAIL, StepGAILConfig,
                                  accumulate_gradients, action_features, discriminator_metrics, held_out_prefixes,
                                  lora_logits, pooled_features, sequence_features, train_discriminator, window)
from rl_agents.batches import EncodedSequence, PPOExample, token_logps
from rl_agents.collate import collate_ppo, collate_sequences
from rl_agents.config import ConfigError, from_dict
from rl_agents.train import OptimConfig, TrainConfig
from rl_agents.train.forward import Forward, sequence_logps
from rl_agents.train.loop import epoch_plan, precompute_old_logps
from rl_agents.trajectory import Trajectory, Turn
from tests.rl_agents.test_train_units import _seq


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: small matmuls are faster on one thread
    yield
    torch.set_num_threads(n)


def _examples(n: int, seed: int = 0) -> list[PPOExample]:
    rng = random.Random(seed)
    return [PPOExample(_seq(rng, rng.randint(1, 3)), advantage=rng.uniform(-2, 2), reward=rng.uniform(-3, 0))
            for _ in range(n)]


def _with_noise(examples, base: torch.Tensor, field: str, scale: float, seed: int) -> list[PPOExample]:
    """Copies whose `field` is base (B, L) + N(0, scale) on the agent tokens, 0 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, e in enumerate(examples):
        n, mask = len(e.sequence), torch.tensor(e.sequence.action_mask, dtype=torch.bool)
        values = torch.where(mask, base[k, :n] + scale * torch.randn(n, generator=gen), torch.zeros(n))
        out.append(PPOExample(e.sequence, e.advantage, e.reward, **{**_fields(e), field: values.tolist()}))
    return out


def _fields(e: PPOExample) -> dict:
    return {"old_logps": e.old_logps, "ref_logps": e.ref_logps}


# ---- the "ppo" objective ------------------------------------------------------------------------
def test_ppo_objective_equals_hand_loss_on_full_logits(tiny_model):
    """loss = ppo_loss on token_logps of the full (B, L, V) logits, entropy of the softmax at every
    position that predicts an agent token (torch.distributions, an independent implementation),
    ε 0.2, λ 0.05, KL 0.1 to per-token reference log-probs; old/ref = true log-probs + N(0, 0.3) so
    that ratios leave [0.8, 1.2] and the clip is exercised. Values and gradients to 1e-5."""
    examples = _examples(4)
    tokens = collate_sequences([e.sequence for e in examples], pad_id=0)
    with torch.no_grad():
        logits = tiny_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits
    true = token_logps(logits, tokens.input_ids)  # (B, L)
    examples = _with_noise(_with_noise(examples, true, "old_logps", 0.3, seed=1), true, "ref_logps", 0.3, seed=2)
    batch = collate_ppo(examples, pad_id=0)
    loss, metrics = PPOObjective(clip_eps=0.2, entropy_coef=0.05, kl_coef=0.1)(Forward(tiny_model), batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()

    logits = tiny_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits  # (B, L, V)
    mask = tokens.action_mask
    logps = token_logps(logits, tokens.input_ids) * mask
    entropy = torch.distributions.Categorical(logits=logits[:, :-1].float()).entropy()  # (B, L-1): predicts j+1
    entropy = torch.nn.functional.pad(entropy, (1, 0)) * mask
    hand, hand_metrics = ppo_loss(logps, batch.old_logps, batch.advantages, mask, clip_eps=0.2, entropy=entropy,
                                  entropy_coef=0.05, ref_logps=batch.ref_logps, kl_coef=0.1)
    hand.backward()

    torch.testing.assert_close(loss, hand, rtol=0, atol=1e-5)
    assert metrics["loss/ppo"].item() == pytest.approx(hand.item(), abs=1e-5)
    for key in ("loss/policy", "loss/entropy", "kl/ref", "ppo/clip_frac", "ppo/ratio_mean"):
        assert metrics[key].item() == pytest.approx(hand_metrics[key], abs=1e-5), key
    assert 0 < metrics["ppo/clip_frac"].item() < 1 and metrics["kl/ref"].item() > 0  # clip and KL really active
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_entropy_is_the_softmax_entropy_at_agent_positions(tiny_model):
    """H at agent token j = −Σ_v p_v log p_v of softmax(logits[j−1]) (the distribution the token was
    drawn from), exactly 0 at every other position; log-probs bit-identical to `sequence_logps`."""
    examples = _examples(3, seed=5)
    tokens = collate_sequences([e.sequence for e in examples], pad_id=0)
    with torch.no_grad():
        logps, entropy = Forward(tiny_model).sequence_logps_and_entropy(tokens)
        plain = sequence_logps(tiny_model, tokens)
        logits = tiny_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.double()
    assert torch.equal(logps, plain)
    for b, j in tokens.action_mask.nonzero().tolist():
        p = torch.softmax(logits[b, j - 1], -1)
        assert entropy[b, j].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    assert (entropy[~tokens.action_mask] == 0).all()
    assert entropy[tokens.action_mask].min() > 1.0  # a random model is far from deterministic


def test_ratio_is_exactly_one_at_step_zero_with_precomputed_old_logps(tiny_model):
    """The loop's precompute scores epoch 0's own micro-batches with the loss's forward: on every
    micro-batch of the first step ratio == 1, clip_frac == 0, k3 KL == 0 exactly, and the policy loss is
    −Σ_b n_b A_b / Σ_b n_b (n_b = agent tokens of sequence b). The example epoch 0 drops (5 examples,
    batch 2) gets its values from a leftover pass."""
    examples = _examples(5, seed=3)
    cfg = TrainConfig(optim=OptimConfig(batch_size=2, micro_batch_size=1), num_workers=1)
    lengths = [len(e) for e in examples]
    old = precompute_old_logps(Forward(tiny_model), examples, lengths, cfg, 0, 0, 1, torch.device("cpu"))
    filled = [PPOExample(e.sequence, e.advantage, e.reward, old_logps=o) for e, o in zip(examples, old)]
    plan = epoch_plan(lengths, cfg, 0)
    planned = {i for step in plan for m in step for i in m}
    assert len(planned) == 4
    objective = PPOObjective(kl_coef=0.5)
    for step in plan:
        for micro in step:
            batch = collate_ppo([filled[i] for i in micro], pad_id=0)
            loss, m = objective(Forward(tiny_model), batch)
            assert m["ppo/ratio_mean"].item() == 1.0 and m["ppo/clip_frac"].item() == 0.0 and m["kl/ref"].item() == 0.0
            n = batch.tokens.action_mask.sum(1).float()
            assert m["loss/policy"].item() == pytest.approx(-(n * batch.advantages).sum().item() / n.sum().item(),
                                                            abs=1e-6)
    (left,) = set(range(5)) - planned
    alone = sequence_logps(tiny_model, collate_sequences([examples[left].sequence], 0))[0]
    torch.testing.assert_close(torch.tensor(old[left]), alone.detach(), rtol=0, atol=1e-6)
    assert all(len(o) == len(e) for o, e in zip(old, examples))


@pytest.mark.slow
def test_ppo_on_two_workers_equals_one_worker_with_accumulation(tmp_path, tiny_model_dir):
    """Ray Train + DeepSpeed ZeRO-2, 8 examples, batch 4, 2 epochs at lr 1e-2: 2 workers × micro-batch 2
    and 1 worker × 2 accumulation steps see the same micro-batches, so every step's loss and gradient
    norm agree (rel 1e-5). The old log-probs are computed by each rank for its own micro-batches and
    exchanged (all_gather): step 0 has ratio exactly 1 in both runs; later steps do not."""
    import ray

    from rl_agents.train import DeepSpeedConfig, ModelConfig, train

    data = _examples(8, seed=11)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = {}
        for name, workers in (("two", 2), ("accum", 1)):
            cfg = TrainConfig(model=ModelConfig(path=str(tiny_model_dir)), deepspeed=DeepSpeedConfig(zero_stage=2),
                              optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, epochs=2, batch_size=4, micro_batch_size=2),
                              num_workers=workers, storage_path=str(tmp_path), name=name)
            objective = PPOObjective(entropy_coef=0.01, kl_coef=0.1)
            runs[name] = sorted(train(objective, data, cfg).history, key=lambda r: r["step"])
    finally:
        ray.shutdown()
    two, accum = runs["two"], runs["accum"]
    assert len(two) == len(accum) == 4
    for a, b in zip(two, accum):
        for key in ("loss/ppo", "loss/policy", "loss/entropy", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for run in (two, accum):
        assert run[0]["ppo/ratio_mean"] == 1.0 and run[0]["ppo/clip_frac"] == 0.0 and run[0]["kl/ref"] == 0.0
        assert run[1]["ppo/ratio_mean"] != 1.0 and run[-1]["kl/ref"] > 0


# ---- collation ----------------------------------------------------------------------------------
def test_collate_ppo_pads_with_zeros_and_keeps_values():
    e1 = PPOExample(EncodedSequence([5, 6, 7], [0, 1, 1], [-1, 0, 0]), 1.5, -0.2, old_logps=[0.0, -1.0, -2.0])
    e2 = PPOExample(EncodedSequence([5, 6, 7, 8, 9], [0, 0, 1, 1, 0], [-1, -1, 0, 0, -1]), -0.5, -1.0,
                    old_logps=[0.0, 0.0, -3.0, -4.0, 0.0])
    batch = collate_ppo([e1, e2], pad_id=2)
    assert batch.old_logps.tolist() == [[0.0, -1.0, -2.0, 0.0, 0.0], [0.0, 0.0, -3.0, -4.0, 0.0]]
    assert batch.advantages.tolist() == [1.5, -0.5] and batch.rewards.tolist() == pytest.approx([-0.2, -1.0])
    assert batch.tokens.input_ids[0].tolist() == [5, 6, 7, 2, 2]
    assert batch.tokens.attention_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert batch.tokens.action_mask[0].tolist() == [False, True, True, False, False] and batch.ref_logps is None
    with pytest.raises(ValueError, match=r"old_logps\[0\]: expected 3 per-token values"):
        collate_ppo([PPOExample(e1.sequence, 1.0, 0.0)], pad_id=0)
    with pytest.raises(ValueError, match="for every example of a batch or for none"):
        collate_ppo([PPOExample(e1.sequence, 1.0, 0.0, [0.0] * 3, [0.0] * 3), e2], pad_id=0)


def test_ppo_loss_is_the_same_with_and_without_padding(tiny_model):
    """A padded micro-batch gives the agent-token-weighted mean of the examples alone (fp32, 1e-6),
    the weighting the training loop applies across micro-batches."""
    examples = _examples(4, seed=7)
    tokens = collate_sequences([e.sequence for e in examples], pad_id=0)
    with torch.no_grad():
        true = token_logps(tiny_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits,
                           tokens.input_ids)
    examples = _with_noise(examples, true, "old_logps", 0.3, seed=4)
    objective = PPOObjective(entropy_coef=0.05)
    with torch.no_grad():
        together, _ = objective(Forward(tiny_model), collate_ppo(examples, pad_id=0))
        alone = [objective(Forward(tiny_model), collate_ppo([e], pad_id=0))[0] for e in examples]
    units = [objective.units(e) for e in examples]
    assert tokens.attention_mask.eq(0).any() and units == [sum(e.sequence.action_mask) for e in examples]
    expected = sum(u * x for u, x in zip(units, alone)) / sum(units)
    torch.testing.assert_close(together, expected, rtol=0, atol=1e-6)


def test_train_rejects_non_ppo_examples_before_starting():
    from rl_agents.train import train

    cfg = TrainConfig(optim=OptimConfig(batch_size=2, micro_batch_size=1), num_workers=1)
    seqs = [e.sequence for e in _examples(2)]
    with pytest.raises(TypeError, match=r"data\[0\]: objective 'ppo' takes PPOExample"):
        train(PPOObjective(), seqs, cfg)
    bad = [PPOExample(seqs[0], float("nan"), 0.0), PPOExample(seqs[1], 0.0, 0.0)]
    with pytest.raises(ValueError, match="must be finite"):
        train(PPOObjective(), bad, cfg)


# ---- discriminator ----------------------------------------------------------------------------------
def _trajectory(task: str, obs: str, actions: list[str]) -> Trajectory:
    turns = [Turn("user", f"Task {task}: buy a {obs}")]
    for k, a in enumerate(actions):
        turns += [Turn("assistant", a), Turn("user", f"Observation {k}: {obs} page")]
    return Trajectory(task, "test", turns, reward=1.0, success=True)


def test_features_average_exactly_the_action_tokens(tiny_model, segmenter):
    """encode_step puts the action at positions [n, n + m) (n = prefix ids, m = action ids incl. the
    end-of-turn); φ = mean of the final hidden states (after the final norm) at exactly those
    positions of the sequence run alone, also when computed in a padded, length-sorted batch."""
    from rl_agents.tokenization import encode_step, tokenize_rollout_turns

    traj = _trajectory("1", "red mug", ["Thought: look.\nAction: search[red mug]", "Thought: ok.\nAction: click[buy]"])
    prefix = [i for ids in tokenize_rollout_turns(traj.turns[:3], segmenter) for i in ids]
    action = segmenter.action_ids("Thought: ok.\nAction: click[buy]")
    seq = encode_step(traj, 1, "Thought: ok.\nAction: click[buy]", segmenter)
    n, m = len(prefix), len(action)
    assert seq.input_ids == prefix + action and [j for j, a in enumerate(seq.action_mask) if a] == list(range(n, n + m))
    others = [encode_step(traj, 0, "Action: wait", segmenter), encode_step(traj, 1, "Action: " + "x " * 30, segmenter)]

    feats = sequence_features(tiny_model, [others[0], seq, others[1]], batch_size=3)  # padded together
    with torch.no_grad():
        hidden = tiny_model.model(input_ids=torch.tensor([seq.input_ids])).last_hidden_state[0]  # (L, H)
    torch.testing.assert_close(feats[1], hidden[n:n + m].mean(0), rtol=0, atol=1e-5)
    assert (feats[1] - hidden[n - 1:n + m - 1].mean(0)).abs().max() > 1e-3  # the predicting positions differ
    assert (feats[1] - hidden.mean(0)).abs().max() > 1e-3  # so does the whole sequence
    alone = action_features(tiny_model, collate_sequences([seq], 0))[0]
    torch.testing.assert_close(feats[1], alone, rtol=0, atol=1e-5)
    # φ depends on the state too: the same action after another prefix has other features
    other = encode_step(_trajectory("2", "blue lamp", ["Action: search[blue lamp]", "x"]), 1,
                        "Thought: ok.\nAction: click[buy]", segmenter)
    assert (sequence_features(tiny_model, [other], batch_size=1)[0] - feats[1]).abs().max() > 1e-3


def test_features_share_each_prefix_forward(tiny_model, segmenter):
    """A step's expert action and the agent's samples share one forward of their prefix: the
    backbone sees the prefix once per group (counted at its input), and every sequence's φ equals
    running it alone, with batches of 2 actions on one cached prefix (right padding)."""
    from rl_agents.tokenization import encode_step

    traj = _trajectory("1", "red mug", ["Thought: look.\nAction: search[red mug]", "Thought: ok.\nAction: click[buy]"])
    group = [encode_step(traj, 1, a, segmenter) for a in
             ("Thought: ok.\nAction: click[buy]", "Action: search[blue]", "Thought: hmm, " + "no " * 12 + "\nAction: back")]
    lone = encode_step(traj, 0, "Action: wait", segmenter)
    seqs = [group[0], lone, group[1], group[2]]
    fed = []
    handle = tiny_model.model.register_forward_pre_hook(lambda mod, args, kw: fed.append(kw["input_ids"].numel()),
                                                        with_kwargs=True)
    try:
        feats = sequence_features(tiny_model, seqs, batch_size=2)
    finally:
        handle.remove()
    for k, seq in enumerate(seqs):
        alone = action_features(tiny_model, collate_sequences([seq], 0))[0]
        torch.testing.assert_close(feats[k], alone, rtol=0, atol=1e-5)
    prefix = group[0].action_mask.index(1)
    widths = [len(s) - prefix for s in group]
    # group: the prefix once, then 2 + 1 actions padded to their chunk's widest; lone: its prefix, its action
    lone_prefix = lone.action_mask.index(1)
    assert sorted(fed) == sorted([prefix, 2 * max(widths[:2]), widths[2], lone_prefix, len(lone) - lone_prefix])
    assert sum(fed) < sum(len(s) for s in seqs) - prefix  # the prefix ran once, not three times


def _action_sets(segmenter, n_prefixes: int, seed: int):
    """Expert steps click[...] on a shop page vs agent steps that think aloud and search, same prefixes."""
    from rl_agents.tokenization import encode_step

    rng = random.Random(seed)
    items = ["red mug", "blue lamp", "green sofa", "white desk", "black shoes", "yellow hat", "pink cup"]
    expert, agent = [], []
    for k in range(n_prefixes):
        traj = _trajectory(str(k), rng.choice(items), ["Action: search[" + rng.choice(items) + "]", "x"])
        click = f"Thought: this matches.\nAction: click[item {rng.randint(1, 9)}]"
        expert.append(encode_step(traj, 1, click, segmenter))
        for _ in range(2):
            words = " ".join(rng.choice(["maybe", "search", "again", "cheap", "size", "price"]) for _ in range(4))
            agent.append(encode_step(traj, 1, f"Thought: I am not sure, {words}.\nAction: search[{words}]", segmenter))
    return expert, agent


def test_head_learns_to_separate_two_action_sets(tiny_model, segmenter):
    """Trained on 24 expert vs 48 agent steps, D separates the held-out 12 vs 24 (> 0.9 per class);
    the untrained head sits near chance (loss ≈ log 2)."""
    expert, agent = _action_sets(segmenter, 36, seed=0)
    fe, fa = sequence_features(tiny_model, expert, batch_size=8), sequence_features(tiny_model, agent, batch_size=8)
    torch.manual_seed(0)
    head = DiscriminatorHead(fe.shape[1], hidden=32)
    start = discriminator_metrics(head(fe), head(fa))
    assert abs(start["loss"] - math.log(2)) < 0.2
    train_discriminator(head, fe[:24], fa[:48], epochs=30, lr=1e-2, batch_size=16, seed=0)
    held_out = discriminator_metrics(head(fe[24:]), head(fa[48:]))
    assert held_out["acc_expert"] > 0.9 and held_out["acc_agent"] > 0.9, held_out
    assert held_out["d_expert"] > 0.8 > 0.2 > held_out["d_agent"] and held_out["loss"] < 0.3


def test_discriminator_save_restore_round_trip_is_bit_exact(tmp_path, tiny_model_dir):
    """The head is saved as safetensors next to state.json and comes back bit-exact through
    `StepGAIL.restore`, `Algorithm.restore` and a save to another directory; a head from another
    iteration than the state is refused."""
    from safetensors.torch import load_file

    from algorithms.base import Algorithm

    algo = StepGAIL(StepGAILConfig(model=str(tiny_model_dir), run_dir=str(tmp_path / "run")))
    head = algo.discriminator()
    assert head.dim == 64 and head.hidden == 256  # the tiny Llama's hidden size; default head width
    gen = torch.Generator().manual_seed(0)
    train_discriminator(head, torch.randn(8, 64, generator=gen) + 1, torch.randn(8, 64, generator=gen), epochs=3,
                        lr=1e-2, batch_size=4, seed=0)
    algo.iteration = 1
    algo.save()
    saved = load_file(tmp_path / "run" / DISC_FILE)  # plain safetensors, no pickle anywhere
    assert set(saved) == set(head.state_dict()) and not list((tmp_path / "run").glob("*.pt"))
    x = torch.randn(5, 64, generator=gen)
    for restored in (StepGAIL.restore(tmp_path / "run"), Algorithm.restore(tmp_path / "run")):
        other = restored.discriminator()
        assert other is not head and restored.iteration == 1
        for k, v in head.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
        assert torch.equal(other(x), head(x))
    algo.save(tmp_path / "elsewhere")
    for restored in (StepGAIL.restore(tmp_path / "elsewhere"), Algorithm.restore(tmp_path / "elsewhere")):
        assert torch.equal(restored.discriminator()(x), head(x))
    algo.iteration = 2
    algo.save(tmp_path / "stale")
    (tmp_path / "stale" / DISC_FILE).write_bytes((tmp_path / "run" / DISC_FILE).read_bytes())  # iteration 1's
    with pytest.raises(RuntimeError, match="from iteration 1, the run state from 2"):
        StepGAIL.restore(tmp_path / "stale")
    (tmp_path / "stale" / DISC_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no discriminator saved"):
        StepGAIL.restore(tmp_path / "stale")


# ---- the trainable (LoRA) discriminator -----------------------------------------------------------
def _lora_algo(tmp_path, tiny_model_dir, **section):
    return StepGAIL(StepGAILConfig(model=str(tiny_model_dir), run_dir=str(tmp_path / "run"), practice_samples=2,
                                   discriminator=DiscriminatorSection(backbone="lora", **section)))


def test_lora_gradient_accumulation_equals_one_forward_of_the_mini_batch(tmp_path, tiny_model_dir, segmenter):
    """`accumulate_gradients` over forwards of 2 sequences gives the gradient (head and LoRA adapter) of
    `gail_discriminator_loss` on one forward of all 3 expert and 5 agent steps, and the same loss."""
    from algorithms.losses.gail import gail_discriminator_loss

    expert, agent = _action_sets(segmenter, 5, seed=1)
    expert = expert[:3]
    algo = _lora_algo(tmp_path, tiny_model_dir)
    lm, head = algo.backbone(), algo.discriminator()
    trainable = [p for p in [*head.parameters(), *lm.parameters()] if p.requires_grad]
    assert any("lora_" in n for n, p in lm.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in lm.named_parameters() if "lora_" not in n)  # only the adapter
    with torch.no_grad():  # a non-zero adapter, so that its gradient path through the backbone is exercised
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    loss = gail_discriminator_loss(head(pooled_features(lm, expert)), head(pooled_features(lm, agent)))
    loss.backward()
    whole = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    accumulated = accumulate_gradients(lm, head, expert, agent, micro_batch_size=2)
    assert accumulated == pytest.approx(loss.item(), abs=1e-6)
    for w, p in zip(whole, trainable):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-4)
    assert any(w.abs().sum() > 0 for w, (n, _) in zip(whole[len(list(head.parameters())):],
                                                      [x for x in lm.named_parameters() if x[1].requires_grad])
               if "lora_A" in n)


def test_window_keeps_the_last_tokens_and_the_whole_action():
    seq = EncodedSequence(list(range(10)), [0] * 6 + [1] * 4, [-1] * 6 + [0] * 4)
    assert window(seq, 6).input_ids == [4, 5, 6, 7, 8, 9] and window(seq, 6).action_mask == [0, 0, 1, 1, 1, 1]
    assert window(seq, 2).input_ids == [6, 7, 8, 9]  # the action is never cut
    assert window(seq, 50) == seq


def test_held_out_prefixes():
    assert held_out_prefixes(10, 0.2, seed=0) == held_out_prefixes(10, 0.2, seed=0)
    assert len(held_out_prefixes(10, 0.2, seed=0)) == 2 and held_out_prefixes(10, 0.2, seed=1) <= set(range(10))
    assert len(held_out_prefixes(4, 0.2, seed=0)) == 1 and held_out_prefixes(1, 0.5, seed=0) == set()
    assert held_out_prefixes(10, 0.0, seed=0) == set() and len(held_out_prefixes(3, 0.9, seed=0)) == 2


def test_lora_discriminator_iteration_learns_reports_held_out_and_round_trips(tmp_path, tiny_model_dir, segmenter,
                                                                              monkeypatch):
    """One StepAgent-inverse iteration with `discriminator.backbone: lora`: D's loss falls on the steps
    it trained on, the held-out prefix's accuracy is reported, the rewards are log D of the updated D
    (adapter and head), and a restored run gives the same logits (adapter saved beside the head)."""
    from algorithms import step_gail
    from algorithms.data import step_prefixes
    from algorithms.losses.gail import gail_reward
    from algorithms.stepagent import Practice

    experts = [_trajectory(str(k), item, ["Action: search[" + item + "]", "Action: click[buy]"])
               for k, item in enumerate(["red mug", "blue lamp", "green cup"])]
    practices = [Practice(e, sp, segmenter.action_ids(f"Thought: hmm {j}.\nAction: search[thing {j}]"))
                 for e in experts for sp in step_prefixes(e) for j in range(2)]
    monkeypatch.setattr(step_gail, "inspect_steps", lambda algo, n, m: practices)
    algo = _lora_algo(tmp_path, tiny_model_dir, epochs=15, lr=1e-2, lora_lr=1e-2, held_out=0.2, max_tokens=64)
    seen = _capture_update(algo)
    metrics = algo.training_step()
    assert metrics["data/expert_steps"] == 6 and metrics["disc/heldout_steps"] == 1 + 2  # one prefix, 2 samples
    assert metrics["disc/loss"] < metrics["disc/loss_before"]
    assert 0 <= metrics["disc/heldout_acc"] <= 1 and metrics["disc/heldout_acc"] == pytest.approx(
        (metrics["disc/heldout_acc_expert"] + metrics["disc/heldout_acc_agent"]) / 2)
    windows = [window(d.sequence, 64) for d in seen["data"]]
    logits = lora_logits(algo.backbone(), algo.discriminator(), windows, batch_size=4)
    assert [d.reward for d in seen["data"]] == pytest.approx(gail_reward(logits).tolist(), abs=1e-5)
    algo.iteration = 1
    algo.save()
    restored = StepGAIL.restore(tmp_path / "run")
    again = lora_logits(restored.backbone(), restored.discriminator(), windows, batch_size=4)
    torch.testing.assert_close(again, logits, atol=1e-6, rtol=0)
    fresh = _lora_algo(tmp_path / "fresh", tiny_model_dir)  # an untrained adapter gives other logits
    assert not torch.allclose(lora_logits(fresh.backbone(), fresh.discriminator(), windows, batch_size=4), logits)
    frozen = StepGAIL(StepGAILConfig(model=str(tiny_model_dir), run_dir=str(tmp_path / "other"), practice_samples=2))
    with pytest.raises(RuntimeError, match="lora backbone, the config asks for discriminator.backbone: frozen"):
        frozen.load_state(tmp_path / "run")


# ---- the iterations' data, without Ray (rollouts and the Ray Train update stubbed) ----------------------
def _capture_update(algo):
    seen = {}

    def update(data, objective=None):
        seen.update(objective=objective or algo.config.loss, data=data)
        return {"loss/ppo": 0.0}
    algo.update = update
    return seen


def test_ppo_baseline_advantage_is_reward_minus_task_mean(tmp_path, tiny_model_dir, segmenter):
    """Task a: rewards (1, 0, 0.5) → advantages (0.5, −0.5, 0); task b: (0.2, 0.2) → (0, 0); a trajectory
    with an error is dropped. Each example is the whole trajectory encoded token-exact."""
    from algorithms.ppo import PPO, PPOConfig
    from rl_agents.tokenization import encode_trajectory

    trajs = []
    for task, reward in (("a", 1.0), ("b", 0.2), ("a", 0.0), ("b", 0.2), ("a", 0.5), ("b", 0.9)):
        t = _trajectory(task, "mug", ["Action: search[mug]", "Action: click[buy]"])
        trajs.append(Trajectory(t.task_id, t.env_id, t.turns, reward=reward, success=reward >= 1))
    trajs[-1].metadata["error"] = "worker died"
    algo = PPO(PPOConfig(model=str(tiny_model_dir), run_dir=str(tmp_path)))
    algo.explore = lambda: trajs
    seen = _capture_update(algo)
    metrics = algo.training_step()
    data = seen["data"]
    assert seen["objective"] == PPOObjective(entropy_coef=1e-3) and len(data) == 5 and metrics["data/ppo_examples"] == 5
    assert [d.advantage for d in data] == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0], abs=1e-7)
    assert [d.reward for d in data] == pytest.approx([1.0, 0.2, 0.0, 0.2, 0.5])
    assert all(d.old_logps is None for d in data)  # the training loop fills them with the current policy
    assert data[0].sequence == encode_trajectory(trajs[0], segmenter) and data[0].sequence.num_turns == 2
    assert metrics["advantage/abs_mean"] == pytest.approx(0.2, abs=1e-6)
    assert metrics["data/zero_advantage_frac"] == pytest.approx(0.6, abs=1e-6)


def test_step_gail_iteration_rewards_are_log_d_of_the_updated_head(tmp_path, tiny_model_dir, segmenter, monkeypatch):
    """2 experts × 2 steps × 2 practice samples: 4 expert steps (one per prefix) vs 8 agent steps train
    the head; each PPO example is an agent step with reward log D(ŝ, a^θ) under the *updated* head and
    advantage = reward − the mean of its prefix's 2 samples (so ± half their difference)."""
    import algorithms.step_gail as step_gail
    from algorithms.data import step_prefixes
    from algorithms.losses.gail import gail_reward
    from algorithms.stepagent import Practice
    from rl_agents.tokenization import encode_step

    experts = [_trajectory(str(k), item, ["Action: search[" + item + "]", "Action: click[buy]"])
               for k, item in enumerate(["red mug", "blue lamp"])]
    practices = [Practice(e, sp, segmenter.action_ids(f"Thought: hmm {j}.\nAction: search[thing {j}]"))
                 for e in experts for sp in step_prefixes(e) for j in range(2)]
    monkeypatch.setattr(step_gail, "inspect_steps", lambda algo, n, m: practices)
    algo = StepGAIL(StepGAILConfig(model=str(tiny_model_dir), run_dir=str(tmp_path), practice_samples=2,
                                   discriminator=DiscriminatorSection(epochs=20, lr=1e-2)))
    seen = _capture_update(algo)
    metrics = algo.training_step()
    data = seen["data"]
    assert metrics["data/expert_steps"] == 4 and metrics["data/ppo_examples"] == len(data) == 8
    assert data[3].sequence == encode_step(experts[0], 1, practices[3].action_ids, segmenter)
    assert metrics["disc/loss"] < metrics["disc/loss_before"] and metrics["disc/acc_agent"] > 0.5
    feats = sequence_features(algo.backbone(), [d.sequence for d in data], batch_size=3)
    with torch.no_grad():
        rewards = gail_reward(algo.discriminator()(feats))
    assert [d.reward for d in data] == pytest.approx(rewards.tolist(), abs=1e-5)
    for k in range(0, 8, 2):  # samples of one prefix are adjacent here
        diff = (rewards[k] - rewards[k + 1]).item() / 2
        assert (data[k].advantage, data[k + 1].advantage) == pytest.approx((diff, -diff), abs=1e-5)
    assert metrics["reward/mean"] == pytest.approx(rewards.mean().item(), abs=1e-5) and metrics["reward/mean"] < 0
    assert seen["objective"] == PPOObjective(clip_eps=0.2, entropy_coef=1e-3)
    # what the discriminator made of each sample, kept in the run directory
    rows = [json.loads(line) for line in (tmp_path / "trajectories" / "inspect_iter0.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert {k: rows[3][k] for k in ("task_id", "step", "expert", "agent", "agrees")} == {
        "task_id": "0", "step": 1, "expert": "Action: click[buy]", "agent": "Thought: hmm 1.\nAction: search[thing 1]",
        "agrees": False}
    assert [r["reward"] for r in rows] == pytest.approx(rewards.tolist(), abs=1e-5)
    assert [r["advantage"] for r in rows] == [d.advantage for d in data]


def test_step_dpo_pairs_only_disagreeing_samples_and_keeps_them_all(tmp_path, tiny_model_dir, segmenter, monkeypatch):
    """Four practice samples at four expert prefixes: one repeats the expert's action (no pair), one is
    empty (no pair), two differ (two pairs: expert step vs agent step, token-exact); every sample is
    written to trajectories/inspect_iter0.jsonl with whether it agreed and whether it was paired."""
    import algorithms.step_dpo as step_dpo
    from algorithms.data import step_prefixes
    from algorithms.step_dpo import StepDPO, StepDPOConfig
    from algorithms.stepagent import Practice
    from rl_agents.tokenization import encode_step

    experts = [_trajectory(str(k), item, ["Action: search[" + item + "]", "Action: click[buy]"])
               for k, item in enumerate(["red mug", "blue lamp"])]
    prompts = [(e, sp) for e in experts for sp in step_prefixes(e)]
    texts = ["Thought: same.\nAction: SEARCH[red mug]", "Thought: no.\nAction: click[back]", None,
             "Thought: no.\nAction: search[lamp]"]
    practices = [Practice(e, sp, segmenter.action_ids(t) if t else []) for (e, sp), t in zip(prompts, texts)]
    monkeypatch.setattr(step_dpo, "inspect_steps", lambda algo, n, m: practices)
    algo = StepDPO(StepDPOConfig(model=str(tiny_model_dir), run_dir=str(tmp_path)))
    seen = _capture_update(algo)
    metrics = algo.training_step()
    assert metrics["inspect/steps"] == 4 and metrics["data/pairs"] == 2 and metrics["inspect/expert_agreement"] == 0.25
    assert seen["data"][0] == (encode_step(experts[0], 1, "Action: click[buy]", segmenter),
                               encode_step(experts[0], 1, practices[1].action_ids, segmenter))
    assert seen["data"][1][1] == encode_step(experts[1], 1, practices[3].action_ids, segmenter)
    rows = [json.loads(line) for line in (tmp_path / "trajectories" / "inspect_iter0.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["step"], r["agrees"], r["paired"]) for r in rows] == [
        ("0", 0, True, False), ("0", 1, False, True), ("1", 0, False, False), ("1", 1, False, True)]
    assert rows[1]["agent"] == "Thought: no.\nAction: click[back]" and rows[2]["agent"] == ""


# ---- configs ------------------------------------------------------------------------------------
def test_configs_validate_ppo_fields_and_groups():
    from algorithms.ppo import PPOConfig

    assert StepGAILConfig().practice_samples == 3 and PPOConfig().rollout.samples_per_task == 4
    with pytest.raises(ConfigError, match="practice_samples: .* needs >= 2, got 1"):
        from_dict(StepGAILConfig, {"practice_samples": 1})
    with pytest.raises(ConfigError, match="rollout.samples_per_task: .* needs >= 2, got 1"):
        from_dict(PPOConfig, {"rollout": {"samples_per_task": 1}})
    with pytest.raises(ConfigError, match=r"^loss.clip_eps: must be a finite number > 0, got 0.0"):
        from_dict(PPOConfig, {"loss": {"clip_eps": 0.0}})
    with pytest.raises(ConfigError, match=r"^loss.entropy_coef: must be a finite number >= 0, got -1.0"):
        from_dict(StepGAILConfig, {"loss": {"entropy_coef": -1.0}})
    with pytest.raises(ConfigError, match=r"^unknown key disc_epochs; it is discriminator.epochs now"):
        from_dict(StepGAILConfig, {"disc_epochs": 3})
    with pytest.raises(ConfigError, match=r"^discriminator.backbone: must be one of frozen, lora, got 'full'"):
        from_dict(StepGAILConfig, {"discriminator": {"backbone": "full"}})
    with pytest.raises(ConfigError, match=r"^discriminator.held_out: must be in \[0, 1\), got 1.0"):
        from_dict(StepGAILConfig, {"discriminator": {"held_out": 1.0}})
    with pytest.raises(ConfigError, match=r"^unknown key train.loss"):  # one home: the algorithm's `loss`
        from_dict(PPOConfig, {"train": {"loss": {"kl_coef": 0.1}}})
