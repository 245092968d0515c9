"""GRPO and GiGPO against hand-computed advantages and losses; the PPO baseline is GRPO's
`scale_rewards: false` configuration, on the same data."""

import math

import pytest
import torch

from algorithms import discounted_returns, gigpo_advantages, ppo_loss, step_advantages
from algorithms.grpo import anchor_states
from rl_agents.batches import EncodedSequence, PPOExample
from rl_agents.collate import collate_ppo
from rl_agents.trajectory import Trajectory, Turn

f64 = torch.float64
EPS = 1e-6


def test_grpo_advantage_of_a_hand_made_group():
    """Group 0 rewards (1, 0, 0, 1): mean 0.5, unbiased std sqrt(4·0.25/3) = 0.5773503, so
    A = ±0.5/(0.5773503 + 1e-6) = ±0.8660239; group 1 (0.5, 0.5): std 0, A = 0; group 2 has one
    episode: A = 0. Without scaling: ±0.5, 0, 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.7], dtype=f64)
    groups = [3, 3, 3, 3, 9, 9, 4]
    a = step_advantages(rewards, groups, scale=True)
    s = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s, 0, 0, 0], dtype=f64), atol=1e-9, rtol=0)
    torch.testing.assert_close(step_advantages(rewards, groups),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0], dtype=f64), atol=1e-12, rtol=0)


def test_discounted_returns():
    assert discounted_returns([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    assert discounted_returns([0.2, 0.0, 0.3], 0.9) == pytest.approx([0.2 + 0.81 * 0.3, 0.9 * 0.3, 0.3])
    assert discounted_returns([], 0.9) == []


# Task "A": three episodes from the same start; task "B": one episode whose first anchor has the same
# text as A's start (a different group: must not join A's step group). γ = 0.5.
#   e0: anchors s0 s1 s2, step rewards 0 0 1, R = 1 -> returns 0.25 0.5 1
#   e1: anchors s0 s1 s3, step rewards 0 0 0, R = 0 -> returns 0    0   0
#   e2: anchors s0 s4,    step rewards 0 1,   R = 1 -> returns 0.5  1
#   e3 (task B): anchor s0, reward 1, R = 1         -> return  1
# Episode level (eq. 3, F_norm = 1): A's mean 2/3 -> 1/3, -2/3, 1/3; B alone -> 0.
# Step groups (eq. 6): (A,s0) = {e0t0 .25, e1t0 0, e2t0 .5}, mean .25 -> 0, -.25, +.25;
#   (A,s1) = {e0t1 .5, e1t1 0}, mean .25 -> +.25, -.25; (A,s2), (A,s3), (A,s4), (B,s0): one step each -> 0.
# Combined (eq. 8, ω = 1): e0 = [1/3, 1/3 + .25, 1/3], e1 = [-2/3 - .25, -2/3 - .25, -2/3],
#   e2 = [1/3 + .25, 1/3], e3 = [0]. 9 steps, 6 step groups, 5 steps in groups of ≥ 2.
GROUPS = ["A", "A", "A", "B"]
EPISODE_R = [1.0, 0.0, 1.0, 1.0]
STEP_R = [[0, 0, 1], [0, 0, 0], [0, 1], [1]]
ANCHORS = [["s0", "s1", "s2"], ["s0", "s1", "s3"], ["s0", "s4"], ["s0"]]


def test_gigpo_step_groups_hand_made():
    adv, stats = gigpo_advantages(GROUPS, EPISODE_R, STEP_R, ANCHORS, gamma=0.5, step_weight=1.0)
    third = 1 / 3
    expected = [[third, third + 0.25, third], [-2 * third - 0.25, -2 * third - 0.25, -2 * third],
                [third + 0.25, third], [0.0]]
    for got, want in zip(adv, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    assert stats["gigpo/step_groups"] == 6
    assert stats["gigpo/grouped_steps_frac"] == pytest.approx(5 / 9)
    assert stats["gigpo/step_group_size_mean"] == pytest.approx(9 / 6)
    assert stats["gigpo/step_adv_abs_mean"] == pytest.approx(4 * 0.25 / 9)


def test_gigpo_weight_and_std_scaling_hand_made():
    """ω = 0.5 halves the step terms. With F_norm = std: A's episode rewards (1, 0, 1) have std
    sqrt((1/9 + 4/9 + 1/9)/2) = 0.5773503 -> A^E = 0.5773503·(1, -2, 1) (over std + eps); step group
    (A,s0) returns (.25, 0, .5) have std .25 -> A^S = (0, -1, 1); (A,s1) (.5, 0) std .3535534 -> ±0.7071068."""
    adv, _ = gigpo_advantages(GROUPS, EPISODE_R, STEP_R, ANCHORS, gamma=0.5, step_weight=0.5)
    assert adv[1] == pytest.approx([-2 / 3 - 0.125, -2 / 3 - 0.125, -2 / 3], abs=1e-12)
    adv, _ = gigpo_advantages(GROUPS, EPISODE_R, STEP_R, ANCHORS, gamma=0.5, step_weight=1.0, scale=True)
    e = 1 / 3 / (math.sqrt(1 / 3) + EPS)
    s0 = 0.25 / (0.25 + EPS)
    s1 = 0.25 / (math.sqrt(0.125) + EPS)
    assert adv[0] == pytest.approx([e, e + s1, e], abs=1e-9)
    assert adv[1] == pytest.approx([-2 * e - s0, -2 * e - s1, -2 * e], abs=1e-9)
    assert adv[2] == pytest.approx([e + s0, e], abs=1e-9)
    assert adv[3] == [0.0]


def test_gigpo_argument_errors():
    with pytest.raises(ValueError, match="one entry per episode"):
        gigpo_advantages(GROUPS, EPISODE_R[:3], STEP_R, ANCHORS)
    with pytest.raises(ValueError, match="episode 2: 2 step rewards but 1 anchors"):
        gigpo_advantages(GROUPS, EPISODE_R, STEP_R, [*ANCHORS[:2], ["s0"], ANCHORS[3]])


def _traj(observations: list[str], keys=None) -> Trajectory:
    turns = [Turn("system", "sys"), Turn("user", observations[0])]
    for obs in observations[1:]:
        turns += [Turn("assistant", "act"), Turn("user", obs)]
    return Trajectory("t", "e", turns, metadata={} if keys is None else {"state_keys": keys})


def test_anchor_states_are_the_observation_answered_or_the_env_key():
    t = _traj(["task: buy", "Nothing happens.", "Nothing happens.", "done"])
    assert anchor_states(t) == [("text", "task: buy"), ("text", "Nothing happens."), ("text", "Nothing happens.")]
    keyed = _traj(["task: buy", "Nothing happens.", "Nothing happens.", "done"], keys=["k0", "k1", "k2"])
    assert anchor_states(keyed) == [("state", "k0"), ("state", "k1"), ("state", "k2")]
    assert anchor_states(keyed, "observation") == anchor_states(t)
    with pytest.raises(ValueError, match="needs one env state key per agent turn"):
        anchor_states(t, "state")


def test_per_token_advantages_clip_high_and_loss_aggregations_hand_values():
    """Row 0: agent tokens at 1, 2 (turn 0) and 4 (turn 1), advantages 1, 1, -2; row 1: agent token 1, A = 0.5.
    log r = 0 everywhere except row 0 token 4: log r = ln 0.5 (r = 0.5, A = -2: min(-1, -0.8·... )).
      ε = 0.2, ε_high = 0.28. Row 0 token 4: r·A = -1, clip(0.5, 0.8, 1.28)·A = -1.6, min = -1.6 -> term 1.6.
      Other tokens: r = 1 -> term -A: -1, -1 (row 0), -0.5 (row 1).
    token-mean: (-1 - 1 + 1.6 - 0.5)/4 = -0.225
    seq-mean-token-mean: ((-1 - 1 + 1.6)/3 + (-0.5)/1)/2 = (-0.1333333 - 0.5)/2 = -0.3166667
    seq-mean-token-sum-norm, norm 4: ((-0.4)/4 + (-0.5)/4)/2 = -0.1125
    Metrics take the same mean: clip_frac 1/4 (token mean), (1/3 + 0)/2 = 1/6 (sequence means)."""
    old = torch.tensor([[0.0, -1.0, -1.0, 0.0, -1.0], [0.0, -1.0, 0.0, 0.0, 0.0]], dtype=f64)
    logps = old.clone()
    logps[0, 4] += math.log(0.5)
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 0, 0, 0]])
    adv = torch.tensor([[0, 1, 1, 0, -2], [0.5] * 5], dtype=f64)
    for agg, want in (("token-mean", -0.225), ("seq-mean-token-mean", (-0.4 / 3 - 0.5) / 2),
                      ("seq-mean-token-sum-norm", -0.1125)):
        loss, m = ppo_loss(logps, old, adv, mask, clip_eps=0.2, clip_high=0.28, loss_agg=agg, norm_tokens=4)
        assert loss.item() == pytest.approx(want, abs=1e-12), agg
        # clipped: row 0's token 4 -> 1 of 4 agent tokens, or the mean of rows' shares (1/3 + 0)/2
        assert m["ppo/clip_frac"] == pytest.approx(1 / 4 if agg == "token-mean" else 1 / 6), agg
    # Symmetric clip and the same per-sequence advantage as a (B,) vector give the old results.
    loss_b, _ = ppo_loss(logps, old, torch.tensor([1.0, 0.5], dtype=f64), mask)
    loss_bl, _ = ppo_loss(logps, old, torch.tensor([[1.0] * 5, [0.5] * 5], dtype=f64), mask)
    assert loss_b.item() == loss_bl.item()
    # Clip-higher: row 1's r = 1.25 (A = 0.5) is inside [0.8, 1.28] (term -0.625) but clipped at 1.2 when
    # symmetric (term -0.6); row 0 at r = 1: terms -1, -1, +2, mean 0.
    up = old.clone()
    up[1, 1] += math.log(1.25)
    sym, _ = ppo_loss(up, old, adv, mask, loss_agg="seq-mean-token-mean")
    high, _ = ppo_loss(up, old, adv, mask, clip_high=0.28, loss_agg="seq-mean-token-mean")
    assert sym.item() == pytest.approx(-0.6 / 2, abs=1e-12)
    assert high.item() == pytest.approx(-0.625 / 2, abs=1e-12)
    with pytest.raises(ValueError, match="loss_agg: must be one of"):
        ppo_loss(logps, old, adv, mask, loss_agg="sum")


def test_collate_spreads_a_number_over_its_row_beside_per_token_advantages():
    seq = EncodedSequence([5, 6, 7], [0, 1, 1], [-1, 0, 0])
    batch = collate_ppo([PPOExample(seq, [0.0, 0.3, -0.2], 1.0, old_logps=[0, 0, 0]),
                         PPOExample(EncodedSequence([5, 6], [0, 1], [-1, 0]), 0.5, 0.0, old_logps=[0, 0])], pad_id=0)
    torch.testing.assert_close(batch.advantages, torch.tensor([[0.0, 0.3, -0.2], [0.5, 0.5, 0.0]]))
    only_numbers = collate_ppo([PPOExample(seq, 0.25, 1.0, old_logps=[0, 0, 0])], pad_id=0)
    assert only_numbers.advantages.shape == (1,)


def _algorithm(algo: str, overrides: list[str], tmp_path, tiny_model_dir):
    import algorithms.runner  # noqa: F401  (registers every algorithm)
    from algorithms.base import ALGORITHMS
    from rl_agents.config import apply_overrides, from_dict

    cls = ALGORITHMS[algo]
    cfg = from_dict(cls.config_class, apply_overrides({}, [f"model={tiny_model_dir}", f"run_dir={tmp_path / algo}",
                                                          "rollout.samples_per_task=2", *overrides]))
    return cls(cfg)


def _explored(segmenter) -> list[Trajectory]:
    """Two tasks × 2 episodes with exact token ids: task a rewards (1, 0), task b (0.5, 0.5)."""
    out = []
    for k, (task, reward) in enumerate([("a", 1.0), ("a", 0.0), ("b", 0.5), ("b", 0.5)]):
        obs = ["Buy a red hat.", "You see a red hat." if k % 2 == 0 else "Nothing happens.", "Done."]
        turns = [Turn("system", "You are an agent."), Turn("user", obs[0])]
        for i in range(2):
            turns += [Turn("assistant", f"Action: click[{task}{k}{i}]"), Turn("user", obs[i + 1])]
        turns[2].reward = reward  # the first action earns it
        out.append(Trajectory(task, "e", turns, reward=reward, id=f"{task}/{k}"))
    from rl_agents.tokenization import tokenize_rollout_turns

    for t in out:  # token-exact, as a rollout records them
        for turn, ids in zip(t.turns, tokenize_rollout_turns(t.turns, segmenter)):
            turn.token_ids = list(ids)
    return out


def _training_data(algo, monkeypatch) -> tuple[list[PPOExample], object, dict]:
    seen = {}
    monkeypatch.setattr(algo, "explore", lambda: _explored(algo.segmenter()))

    def update(data, objective=None, **kw):
        seen["data"], seen["objective"] = data, objective or algo.config.loss
        return {}
    monkeypatch.setattr(algo, "update", update)
    metrics = algo.training_step()
    return seen["data"], seen["objective"], metrics


def test_grpo_without_scaling_is_the_ppo_baseline_on_the_same_data(tmp_path, tiny_model_dir, monkeypatch):
    """`algo: ppo` = `algo: grpo` with scale_rewards false, token-mean and PPO's entropy bonus: the same
    examples (advantage R − task mean: 0.5, -0.5, 0, 0) and the same objective. GRPO's defaults differ:
    scaled advantages (±0.7071061 = ±0.5/(std 0.7071068 + 1e-6)) and the per-sequence mean."""
    ppo = _algorithm("ppo", [], tmp_path, tiny_model_dir)
    grpo = _algorithm("grpo", ["scale_rewards=false", "loss.loss_agg=token-mean", "loss.entropy_coef=0.001"],
                      tmp_path, tiny_model_dir)
    data_ppo, obj_ppo, _ = _training_data(ppo, monkeypatch)
    data_grpo, obj_grpo, metrics = _training_data(grpo, monkeypatch)
    assert [e.advantage for e in data_ppo] == [0.5, -0.5, 0.0, 0.0]
    assert data_ppo == data_grpo and obj_ppo == obj_grpo
    assert metrics["data/zero_variance_groups"] == 1 and metrics["data/ppo_examples"] == 4
    default = _algorithm("grpo", [], tmp_path, tiny_model_dir)
    data, obj, _ = _training_data(default, monkeypatch)
    s = 0.5 / (math.sqrt(0.5) + EPS)
    assert [e.advantage for e in data] == pytest.approx([s, -s, 0.0, 0.0], abs=1e-12)
    assert obj.loss_agg == "seq-mean-token-mean" and obj != obj_ppo
    dropped = _algorithm("grpo", ["zero_variance=drop"], tmp_path, tiny_model_dir)
    data, _, metrics = _training_data(dropped, monkeypatch)
    assert len(data) == 2 and metrics["data/ppo_examples"] == 2  # task b's equal rewards: left out


def test_gigpo_puts_each_turns_advantage_on_its_tokens(tmp_path, tiny_model_dir, monkeypatch):
    """GiGPO, γ = 0.5, ω = 1, anchors = observation text. Task a: e0 (R 1: turn rewards 1, 0) and e1 (R 0).
    Turn 0 answers "Buy a red hat." in both: returns (1 + 0.5·0, 0) = (1, 0), mean 0.5 -> A^S = ±0.5;
    turn 1 answers different texts ("You see a red hat." / "Nothing happens."): one step each, A^S = 0.
    A^E = ±0.5. So e0 = (1.0, 0.5), e1 = (-1.0, -0.5). Task b (rewards 0.5, 0.5 on turn 0): all 0.
    Every agent token of turn t carries A_t; every other token 0."""
    algo = _algorithm("gigpo", ["gamma=0.5"], tmp_path, tiny_model_dir)
    data, obj, metrics = _training_data(algo, monkeypatch)
    want = [(1.0, 0.5), (-1.0, -0.5), (0.0, 0.0), (0.0, 0.0)]
    for ex, (a0, a1) in zip(data, want, strict=True):
        seq = ex.sequence
        assert len(ex.advantage) == len(seq)
        for a, m, t in zip(ex.advantage, seq.action_mask, seq.turn_index):
            assert a == pytest.approx({-1: 0.0, 0: a0, 1: a1}[t] if m else 0.0, abs=1e-12)
    assert metrics["gigpo/grouped_steps_frac"] == pytest.approx(4 / 8)  # turn 0 of a and b, each a pair
    assert obj.loss_agg == "token-mean"


@pytest.mark.slow
def test_loss_aggregations_over_micro_batches_are_the_batch_means(tmp_path, tiny_model_dir):
    """Ray Train + DeepSpeed, one step over all 8 examples (micro-batches of 2, 4 accumulation steps),
    per-token advantages. At step 0 the ratio is 1, so the logged policy loss is agg(-A) over the
    whole batch, computed here by hand from the data: the token mean for token-mean, the mean of the
    sequences' token means for seq-mean-token-mean. The loop weighs micro-batches by the objective's
    units (agent tokens, or 1 per sequence); the wrong units would log another weighted mean."""
    import random

    import ray

    from algorithms.losses import PPOObjective
    from rl_agents.train import DeepSpeedConfig, ModelConfig, OptimConfig, TrainConfig, train
    from tests.algorithms.test_gail_ppo import _examples

    rng = random.Random(3)
    data = [PPOExample(e.sequence, [rng.uniform(-2, 2) if m else 0.0 for m in e.sequence.action_mask], e.reward)
            for e in _examples(8, seed=11)]
    agent = [[a for a, m in zip(e.advantage, e.sequence.action_mask) if m] for e in data]
    assert len({len(a) for a in agent}) > 1  # sequences of different lengths: the two means differ
    hand = {"token-mean": -sum(map(sum, agent)) / sum(map(len, agent)),
            "seq-mean-token-mean": -sum(sum(a) / len(a) for a in agent) / len(agent)}
    assert abs(hand["token-mean"] - hand["seq-mean-token-mean"]) > 1e-3
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for agg, want in hand.items():
            cfg = TrainConfig(model=ModelConfig(path=str(tiny_model_dir)), deepspeed=DeepSpeedConfig(zero_stage=2),
                              optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, epochs=1, batch_size=8, micro_batch_size=2),
                              num_workers=1, storage_path=str(tmp_path), name=agg)
            (row,) = train(PPOObjective(loss_agg=agg), data, cfg).history
            assert row["ppo/ratio_mean"] == 1.0
            assert row["loss/policy"] == pytest.approx(want, rel=1e-5), agg
    finally:
        ray.shutdown()


def test_drop_keeps_a_gigpo_task_whose_steps_still_differ_and_an_update_without_signal_is_skipped(
        tmp_path, tiny_model_dir, monkeypatch):
    """Task b's two episodes both got 0.5, so GRPO drops it; GiGPO keeps it when its turn rewards give
    its shared first step different returns (here: 0.5 then 0 vs 0 then 0.5, γ = 0.5 -> returns 0.5 and
    0.25). With every advantage 0 and no entropy/KL term the update is skipped, not run."""
    def explored(segmenter):
        trajs = _explored(segmenter)
        trajs[3].turns[2].reward, trajs[3].turns[4].reward = 0.0, 0.5  # b/3 earns its 0.5 on its 2nd turn
        return trajs
    for algo_name, kept in (("grpo", 2), ("gigpo", 4)):
        algo = _algorithm(algo_name, ["zero_variance=drop", "gamma=0.5"] if algo_name == "gigpo" else
                          ["zero_variance=drop"], tmp_path, tiny_model_dir)
        monkeypatch.setattr(algo, "explore", lambda a=algo: explored(a.segmenter()))
        monkeypatch.setattr(algo, "update", lambda data, **kw: {"data/n": len(data)})
        assert algo.training_step()["data/n"] == kept, algo_name
    flat = _algorithm("grpo", [], tmp_path, tiny_model_dir)
    monkeypatch.setattr(flat, "explore", lambda: [t for t in _explored(flat.segmenter()) if t.task_id == "b"])
    monkeypatch.setattr(flat, "update", lambda data, **kw: pytest.fail("an update without signal ran"))
    metrics = flat.training_step()
    assert metrics["train/skipped"] == 1 and metrics["data/zero_advantage_frac"] == 1
