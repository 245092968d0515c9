"""Shared-prefix packing (`rl_agents.packing`): the layout, and that the packed forward gives the
same log-probs and gradients as the padded one (tiny Llama, fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from algorithms.losses import PPOObjective
from algorithms.losses.dpo import StepDPOObjective
from rl_agents.batches import EncodedSequence, PPOExample
from rl_agents.collate import collate_pairs, collate_ppo, collate_sequences
from rl_agents.packing import pack_shared_prefixes, sort_keys
from rl_agents.train.forward import Forward


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 5000) for _ in range(n)]


def _step(prefix: list[int], action: list[int]) -> EncodedSequence:
    """An expert prefix (context) + one action (turn 0, carries loss)."""
    return EncodedSequence(prefix + action, [0] * len(prefix) + [1] * len(action), [-1] * len(prefix) + [0] * len(action))


def _steps(seed: int = 0):
    """Two expert steps of one task (prefix 1 extends prefix 0 with expert action 0 and an
    observation), each with the expert action and two agent samples; and one unrelated sequence."""
    rng = random.Random(seed)
    p0 = _ids(rng, 40)
    e0 = _ids(rng, 5)
    p1 = p0 + e0 + _ids(rng, 12)
    e1 = _ids(rng, 4)
    seqs = [_step(p0, e0), _step(p0, _ids(rng, 6)), _step(p0, _ids(rng, 3)),
            _step(p1, e1), _step(p1, _ids(rng, 7)), _step(p1, _ids(rng, 5)),
            _step(_ids(rng, 30), _ids(rng, 6))]
    return seqs, (p0, e0, p1, e1)


def test_layout_exact():
    seqs, (p0, e0, p1, e1) = _steps()
    batch = collate_sequences(seqs, pad_id=0)
    pack = pack_shared_prefixes(batch.input_ids, batch.attention_mask)
    # Longest first: row 4 (p1 + 7) is the trunk of the task's group; row 6 (unrelated) stays alone.
    assert pack.input_ids.shape[0] == 2
    trunk = seqs[4].input_ids
    n0 = len(trunk)
    p = pack.input_ids.shape[1]
    assert pack.input_ids[0, :n0].tolist() == trunk
    # Row 3 (p1 + e1) shares p1 with the trunk: its branch holds only e1, after the trunk (branches
    # follow longest row first: row 5's, then row 3's).
    assert pack.index[3, :len(p1)].tolist() == list(range(len(p1)))
    b3, b5 = pack.index[3, len(p1)].item(), pack.index[5, len(p1)].item()
    assert b5 == n0 and b3 == n0 + len(seqs[5]) - len(p1)
    assert pack.index[3, len(p1):len(seqs[3])].tolist() == list(range(b3, b3 + len(e1)))
    assert pack.input_ids[0, b3:b3 + len(e1)].tolist() == e1
    assert pack.position_ids[0, b3:b3 + len(e1)].tolist() == list(range(len(p1), len(p1) + len(e1)))
    # Row 0 (p0 + e0) lies entirely inside the trunk (p1 starts with p0 + e0): no branch at all.
    assert pack.index[0, :len(seqs[0])].tolist() == list(range(len(seqs[0])))
    # Every original token maps to a packed position holding the same id, at its own position.
    flat_ids, flat_pos = pack.input_ids.reshape(-1), pack.position_ids.reshape(-1)
    for b, s in enumerate(seqs):
        idx = pack.index[b, :len(s)]
        assert flat_ids[idx].tolist() == s.input_ids
        assert flat_pos[idx].tolist() == list(range(len(s)))
        assert (pack.index[b, len(s):] == -1).all()
    # The unrelated row is alone in packed row 1, padded after it.
    assert pack.index[6, 0].item() == p and pack.input_ids[1, :len(seqs[6])].tolist() == seqs[6].input_ids
    # Mask: the first token of row 3's branch sees trunk positions < len(p1) and itself, nothing else.
    m = pack.attention_mask[0, 0]
    assert m[b3, :len(p1)].all() and not m[b3, len(p1):b3].any() and m[b3, b3] and not m[b3, b3 + 1:].any()
    # Its last token also sees its own branch, but not row 5's branch before it.
    last = b3 + len(e1) - 1
    assert m[last, b3:last + 1].all() and not m[last, b5:b3].any()
    # Trunk tokens are plain causal.
    assert torch.equal(m[:n0, :n0], torch.ones(n0, n0, dtype=torch.bool).tril())
    assert pack.num_tokens < batch.input_ids.numel()


def test_rows_sharing_little_are_not_packed():
    rng = random.Random(1)
    system = _ids(rng, 20)  # shared, but under MIN_SHARED and under half of each row
    seqs = [_step(system + _ids(rng, 30), _ids(rng, 8)) for _ in range(4)]
    batch = collate_sequences(seqs, pad_id=0)
    assert pack_shared_prefixes(batch.input_ids, batch.attention_mask) is None


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logps_and_gradients_equal_padded(tiny_model_dir, impl):
    from rl_agents.models import load_model

    model = load_model(tiny_model_dir, attn_implementation=impl).train()
    seqs, _ = _steps()
    batch = collate_sequences(seqs, pad_id=0)

    def run(share: bool):
        fwd = Forward(model, share_prefixes=share)
        model.zero_grad(set_to_none=True)
        logps = fwd.sequence_logps(batch)
        (logps.sum() * 0.01).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), grads, fwd.tokens

    plain, g_plain, t_plain = run(False)
    packed, g_packed, t_packed = run(True)
    assert t_plain == batch.input_ids.numel() and t_packed < t_plain / 2  # 7 rows of <= 68 -> 2 packed rows
    assert plain.abs().sum() > 0
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
    assert set(g_packed) == set(g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_step_dpo_and_ppo_objectives_unchanged_by_packing(tiny_model):
    seqs, _ = _steps()
    chosen, rejected = [seqs[0], seqs[3]], [seqs[1], seqs[4]]
    pairs = collate_pairs(chosen, rejected, pad_id=0, ref_chosen=[[-30.0], [-25.0]], ref_rejected=[[-40.0], [-35.0]])
    rng = random.Random(3)
    ppo = collate_ppo([PPOExample(s, advantage=rng.uniform(-1, 1), reward=0.0,
                                  old_logps=[rng.uniform(-9, -7) * m for m in s.action_mask]) for s in seqs[:6]], pad_id=0)
    out = {}
    for share in (False, True):
        fwd = Forward(tiny_model, share_prefixes=share)
        with torch.no_grad():
            out[share] = (StepDPOObjective(beta=0.5)(fwd, pairs)[0], PPOObjective()(fwd, ppo)[0])
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-5)


def test_sort_keys_group_step_data_and_leave_trajectories_alone():
    seqs, _ = _steps()
    shuffled = [seqs[i] for i in (4, 6, 0, 2, 5, 1, 3)]
    keys = sort_keys([s.input_ids for s in shuffled])
    order = sorted(range(len(shuffled)), key=lambda i: keys[i])
    # The six step rows of the task come out contiguous, the unrelated row at one end.
    positions = [order.index(i) for i in range(len(shuffled)) if shuffled[i] is not seqs[6]]
    assert max(positions) - min(positions) == 5
    rng = random.Random(5)
    trajectories = [_ids(rng, 10) + _ids(rng, 80) for _ in range(6)]
    assert sort_keys(trajectories) is None


def test_step_level_ppo_plan_packs_micro_batches_and_keeps_ratio_exactly_one(tiny_model):
    """Step samples of two tasks, shuffled: `batch_keys` orders each global batch so that rows of one
    task share micro-batches (every micro-batch then runs packed), and the precomputed old log-probs
    still give ratio == 1 exactly on the first step (same micro-batches, same packing)."""
    from rl_agents.train import OptimConfig, TrainConfig
    from rl_agents.train.loop import batch_keys, epoch_plan, precompute_old_logps

    rng = random.Random(7)
    seqs = _steps(0)[0][:6] + _steps(1)[0][:6]
    rng.shuffle(seqs)
    examples = [PPOExample(s, advantage=rng.uniform(-1, 1), reward=0.0) for s in seqs]
    cfg = TrainConfig(optim=OptimConfig(batch_size=12, micro_batch_size=2), num_workers=1)
    lengths = [len(e) for e in examples]
    keys = batch_keys(examples, cfg)
    assert keys is not None
    plan = epoch_plan(lengths, cfg, 0, keys)
    for micro in plan[0]:
        batch = collate_sequences([examples[i].sequence for i in micro], pad_id=0)
        assert pack_shared_prefixes(batch.input_ids, batch.attention_mask) is not None
    assert epoch_plan(lengths, TrainConfig(optim=cfg.optim, num_workers=1, share_prefixes=False), 0,
                      batch_keys(examples, TrainConfig(num_workers=1, share_prefixes=False))) == epoch_plan(lengths, cfg, 0)
    old = precompute_old_logps(Forward(tiny_model), examples, lengths, cfg, 0, 0, 1, torch.device("cpu"))
    filled = [PPOExample(e.sequence, e.advantage, e.reward, old_logps=o) for e, o in zip(examples, old)]
    for micro in plan[0]:
        _, m = PPOObjective()(Forward(tiny_model), collate_ppo([filled[i] for i in micro], pad_id=0))
        assert m["ppo/ratio_mean"].item() == 1.0 and m["ppo/clip_frac"].item() == 0.0


def test_rows_longer_than_a_sliding_window_run_unpacked(tiny_model):
    """The packed mask knows no sliding window: a model with one shorter than the batch runs padded."""
    seqs, _ = _steps()
    batch = collate_sequences(seqs, pad_id=0)
    fwd = Forward(tiny_model)
    tiny_model.config.sliding_window = batch.input_ids.shape[1] - 1
    with torch.no_grad():
        fwd.sequence_logps(batch)
    assert fwd.tokens == batch.input_ids.numel()
    tiny_model.config.sliding_window = batch.input_ids.shape[1]
    with torch.no_grad():
        fwd.sequence_logps(batch)
    assert fwd.tokens < 2 * batch.input_ids.numel()
