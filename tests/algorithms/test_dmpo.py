"""DMPO (Shi et al. 2024, eq. 16, released-code φ): hand values and the paper's identities."""

import math
from fractions import Fraction

import pytest
import torch

from algorithms import dmpo_loss, dmpo_rewards, dmpo_turn_weights, dpo_loss

f64 = torch.float64


def exact_phi(gamma: float, t: int, n: int) -> float:
    """φ(t, T) in exact rational arithmetic on the float γ: the ground truth for precision tests."""
    g = Fraction(gamma)
    if g == 1:
        return float(Fraction(n - t, n))
    return float(g**t * (1 - g ** (n - t)) / (1 - g**n))


def derived_phi(gamma: float, t: int, n: int) -> float:
    """φ from DMPO eq. (14)+(15), independently: coefficient of Δ_t = (1-γ)/(1-γ^T) · Σ_{s=t}^{T-1} γ^s."""
    if gamma == 1.0:
        return (n - t) / n
    return (1 - gamma) / (1 - gamma**n) * sum(gamma**s for s in range(t, n))


def test_dmpo_loss_hand_value():
    """β = 0.5, γ = 0.5. Chosen: T_w = 3 turns, Δ^w = (1, 2, -1); rejected: T_l = 2 (+1 padded), Δ^l = (2, 4).

    φ(t, 3) = 0.5^t (1 - 0.5^(3-t)) / (1 - 0.5^3): φ(0) = 0.875/0.875 = 1, φ(1) = 0.5·0.75/0.875 = 3/7,
    φ(2) = 0.25·0.5/0.875 = 1/7.  φ(t, 2): φ(0) = 1, φ(1) = 0.5·0.5/0.75 = 1/3.
    Σ φ Δ^w = 1 + 2·3/7 - 1/7 = 12/7;  Σ φ Δ^l = 2 + 4/3 = 10/3.
    z = 0.5 · (12/7 - 10/3) = 0.5 · (36 - 70)/21 = -17/21 = -0.8095238,
    loss = log(1 + e^0.8095238) = log(1 + 2.2468378) = log(3.2468378) = 1.1776815.
    """
    ref_w = torch.tensor([[-5.0, -3.0, -4.0]], dtype=f64)
    ref_l = torch.tensor([[-6.0, -2.0, -1.0, -1.0]], dtype=f64)
    pol_w = ref_w + torch.tensor([[1.0, 2.0, -1.0]], dtype=f64)
    pol_l = ref_l + torch.tensor([[2.0, 4.0, 123.0, -7.0]], dtype=f64)  # last two are padding
    mask_w = torch.tensor([[1, 1, 1]])
    mask_l = torch.tensor([[1, 1, 0, 0]])
    loss = dmpo_loss(pol_w, ref_w, mask_w, pol_l, ref_l, mask_l, beta=0.5, gamma=0.5)
    torch.testing.assert_close(loss, torch.tensor([1.1776815], dtype=f64), atol=1e-7, rtol=0)
    r = dmpo_rewards(pol_w, ref_w, mask_w, pol_l, ref_l, mask_l, beta=0.5, gamma=0.5)
    torch.testing.assert_close(r.chosen, torch.tensor([0.5 * 12 / 7], dtype=f64))
    torch.testing.assert_close(r.rejected, torch.tensor([0.5 * 10 / 3], dtype=f64))
    torch.testing.assert_close(r.margin, torch.tensor([-17 / 21], dtype=f64))


def test_dmpo_gradient_hand_value():
    """Same example. d loss / d log πθ(a_t^w) = -σ(-z) · β · φ(t, 3) with σ(-z) = σ(0.8095238) = 0.6920080:
    (-0.3460040, -0.3460040·3/7, -0.3460040/7) = (-0.3460040, -0.1482874, -0.0494291); padded turns get 0."""
    ref_w = torch.tensor([[-5.0, -3.0, -4.0]], dtype=f64)
    ref_l = torch.tensor([[-6.0, -2.0, -1.0, -1.0]], dtype=f64)
    pol_w = (ref_w + torch.tensor([[1.0, 2.0, -1.0]], dtype=f64)).requires_grad_()
    pol_l = (ref_l + torch.tensor([[2.0, 4.0, 123.0, -7.0]], dtype=f64)).requires_grad_()
    dmpo_loss(pol_w, ref_w, torch.ones(1, 3), pol_l, ref_l, torch.tensor([[1.0, 1.0, 0.0, 0.0]]),
              beta=0.5, gamma=0.5).sum().backward()
    torch.testing.assert_close(pol_w.grad, torch.tensor([[-0.3460040, -0.1482874, -0.0494291]], dtype=f64),
                               atol=1e-7, rtol=0)
    torch.testing.assert_close(pol_l.grad, torch.tensor([[0.3460040, 0.3460040 / 3, 0.0, 0.0]], dtype=f64),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 5, 14])
def test_turn_weights_match_direct_formula_and_derivation(gamma, n):
    """φ(t, T) = γ^t (1-γ^(T-t)) / (1-γ^T) — both written directly and as eq. (14)+(15)'s discounted sum."""
    mask = torch.zeros(1, 16)
    mask[0, :n] = 1
    w = dmpo_turn_weights(mask, gamma)[0]
    direct = [gamma**t * (1 - gamma ** (n - t)) / (1 - gamma**n) if gamma < 1 else (n - t) / n for t in range(n)]
    derived = [derived_phi(gamma, t, n) for t in range(n)]
    torch.testing.assert_close(w[:n], torch.tensor(direct, dtype=f64), rtol=1e-12, atol=0)
    torch.testing.assert_close(w[:n], torch.tensor(derived, dtype=f64), rtol=1e-12, atol=0)
    assert torch.all(w[n:] == 0)
    assert w[0] == 1.0  # the first turn always has weight exactly 1
    assert torch.all(w[1:n] <= w[: n - 1])  # Corollary 4.0.1: weights decrease with t


def test_turn_weights_gamma_one_is_linear():
    """γ = 1: φ(t, T) = (T - t)/T; T = 4 → (1, 3/4, 1/2, 1/4); T = 2 → (1, 1/2)."""
    w = dmpo_turn_weights(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), 1.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.75, 0.5, 0.25], [1.0, 0.5, 0.0, 0.0]], dtype=f64),
                               rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.999999, 1 - 1e-12, 0.9, 1e-3, 1e-8, 1e-200])
def test_turn_weights_precise_at_extreme_gamma(gamma):
    """Against exact rational arithmetic: relative error ≲ 1e-12 even where 1 - γ^k cancels (γ → 1)."""
    n = 20
    w = dmpo_turn_weights(torch.ones(1, n, dtype=torch.bool), gamma)[0]
    assert torch.isfinite(w).all()
    for t in range(n):
        expected = exact_phi(gamma, t, n)
        assert math.isclose(w[t].item(), expected, rel_tol=1e-12, abs_tol=1e-300), (t, w[t].item(), expected)


def test_turn_weights_mask_dtypes_and_empty_rows():
    """bool, int and float masks give the same weights; a row with no real turn gets all zeros (not NaN)."""
    rows = [[1, 1, 0], [0, 0, 0]]
    ws = [dmpo_turn_weights(torch.tensor(rows, dtype=d), 0.7) for d in (torch.bool, torch.long, torch.float32)]
    assert all(torch.equal(ws[0], w) for w in ws[1:])
    assert torch.equal(ws[0][1], torch.zeros(3, dtype=f64))


@pytest.mark.parametrize("gamma", [0.1, 0.7, 1.0])
def test_one_turn_each_equals_dpo(gamma):
    """T_w = T_l = 1 → φ(0, 1) = 1 → DMPO = DPO on the trajectory sums (any γ)."""
    g = torch.Generator().manual_seed(0)
    pw, rw, pl, rl = (torch.randn(6, generator=g, dtype=f64) * 5 for _ in range(4))
    one = torch.ones(6, 1)
    loss = dmpo_loss(pw[:, None], rw[:, None], one, pl[:, None], rl[:, None], one, beta=0.3, gamma=gamma)
    torch.testing.assert_close(loss, dpo_loss(pw, rw, pl, rl, beta=0.3), rtol=0, atol=1e-15)


def test_gamma_to_zero_is_dpo_on_first_turn():
    """Corollary 4.0.2: γ = 1e-8 → φ = (1, 1e-8, 1e-16, …): only turn 0 counts (up to ~1e-8 relative)."""
    g = torch.Generator().manual_seed(1)
    pw, rw = torch.randn(4, 5, generator=g, dtype=f64), torch.randn(4, 5, generator=g, dtype=f64)
    pl, rl = torch.randn(4, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    mw = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    ml = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    loss = dmpo_loss(pw, rw, mw, pl, rl, ml, beta=0.1, gamma=1e-8)
    expected = dpo_loss(pw[:, 0], rw[:, 0], pl[:, 0], rl[:, 0], beta=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=0)


def test_masked_turns_contribute_exactly_zero():
    """Changing log-probs under a 0 mask — to other numbers, ±inf or NaN — leaves loss and gradient bit-identical."""
    g = torch.Generator().manual_seed(2)
    pw, rw = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    pl, rl = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mw = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    ml = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)

    def run(pw, rw, pl, rl):
        pw = pw.clone().requires_grad_()
        loss = dmpo_loss(pw, rw, mw, pl, rl, ml, beta=0.2, gamma=0.7)
        loss.sum().backward()
        return loss.detach(), pw.grad

    base_loss, base_grad = run(pw, rw, pl, rl)
    pw2, rw2, pl2, rl2 = pw.clone(), rw.clone(), pl.clone(), rl.clone()
    pw2[~mw] = 1e6
    rw2[~mw] = float("-inf")
    pl2[~ml] = float("nan")
    rl2[~ml] = -3.0
    loss2, grad2 = run(pw2, rw2, pl2, rl2)
    assert torch.equal(base_loss, loss2)
    assert torch.equal(base_grad, grad2)
    assert torch.all(base_grad[~mw] == 0)


@pytest.mark.parametrize("gamma", [1e-8, 0.7, 0.999999, 1.0])
def test_gradients_finite(gamma):
    g = torch.Generator().manual_seed(3)
    pw = (torch.randn(2, 30, generator=g) * 20).requires_grad_()
    pl = (torch.randn(2, 7, generator=g) * 20).requires_grad_()
    mw = torch.ones(2, 30)
    mw[1, 10:] = 0
    loss = dmpo_loss(pw, torch.zeros(2, 30), mw, pl, torch.zeros(2, 7), torch.ones(2, 7), beta=0.5, gamma=gamma)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()


def test_batch_rows_are_independent_with_different_lengths():
    """A batch (chosen T_max = 5, rejected T_max = 3, ragged masks) equals each pair computed alone, unpadded."""
    g = torch.Generator().manual_seed(4)
    pw, rw = torch.randn(4, 5, generator=g, dtype=f64), torch.randn(4, 5, generator=g, dtype=f64)
    pl, rl = torch.randn(4, 3, generator=g, dtype=f64), torch.randn(4, 3, generator=g, dtype=f64)
    nw, nl = [5, 2, 1, 3], [3, 1, 2, 3]
    mw = (torch.arange(5)[None] < torch.tensor(nw)[:, None]).float()
    ml = (torch.arange(3)[None] < torch.tensor(nl)[:, None]).float()
    batched = dmpo_loss(pw, rw, mw, pl, rl, ml, beta=0.1, gamma=0.7)
    for b in range(4):
        single = dmpo_loss(pw[b:b + 1, :nw[b]], rw[b:b + 1, :nw[b]], torch.ones(1, nw[b]),
                           pl[b:b + 1, :nl[b]], rl[b:b + 1, :nl[b]], torch.ones(1, nl[b]), beta=0.1, gamma=0.7)
        torch.testing.assert_close(batched[b:b + 1], single, rtol=0, atol=1e-15)


def test_low_precision_inputs_computed_in_float32():
    x = torch.full((1, 2), -3.0, dtype=torch.bfloat16)
    loss = dmpo_loss(x, x, torch.ones(1, 2), x, x, torch.ones(1, 2), beta=0.1, gamma=0.7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([math.log(2)]))


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.0000001, 2.0, float("nan")])
def test_gamma_outside_unit_interval_raises(gamma):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="gamma"):
        dmpo_loss(x, x, torch.ones(1, 2), x, x, torch.ones(1, 2), beta=0.1, gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        dmpo_turn_weights(torch.ones(1, 2), gamma)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_nonpositive_beta_raises(beta):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="beta"):
        dmpo_loss(x, x, torch.ones(1, 2), x, x, torch.ones(1, 2), beta=beta, gamma=0.7)


def test_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):  # mask does not match its side
        dmpo_loss(x, x, torch.ones(2, 2), x, x, torch.ones(2, 3), beta=0.1, gamma=0.7)
    with pytest.raises(ValueError):  # batch sizes differ
        dmpo_loss(x, x, torch.ones(2, 3), x[:1], x[:1], torch.ones(1, 3), beta=0.1, gamma=0.7)


# ---- end-of-turn tokens: ours ('turn') and the released trainer's ('one') ----------------------------
def test_end_of_turn_option_hand_values():
    """β = 0.5, γ = 0.5; each turn's log-ratio in two parts, [reply, end-of-turn].

    Chosen, T = 2: reply Δ = (0.6, -0.3), end-of-turn Δ = (0.2, 0.1); φ(0, 2) = 1, φ(1, 2) = 0.5·0.5/0.75 = 1/3.
      'turn': 1·(0.6 + 0.2) + 1/3·(-0.3 + 0.1) = 0.8 - 0.2/3 = 0.7333333
      'one':  1·0.6 + 1/3·(-0.3) + 1·0.2 + 1·0.1 = 0.6 - 0.1 + 0.3 = 0.8
    Rejected, T = 1: reply Δ = -0.4, end-of-turn Δ = 0.5; φ(0, 1) = 1: 0.1 either way.
    'turn': z = 0.5·(0.7333333 - 0.1) = 0.3166667, loss = log(1 + e^-0.3166667) = log(1.7285464) = 0.5472965
    'one':  z = 0.5·(0.8 - 0.1) = 0.35,          loss = log(1 + e^-0.35) = log(1.7046881) = 0.5333822
    """
    pol_w = torch.tensor([[[0.6, 0.2], [-0.3, 0.1]]], dtype=f64)
    pol_l = torch.tensor([[[-0.4, 0.5], [9.0, 9.0]]], dtype=f64)  # a padded second turn: masked out
    mask_w, mask_l = torch.ones(1, 2), torch.tensor([[1.0, 0.0]])
    zero_w, zero_l = torch.zeros_like(pol_w), torch.zeros_like(pol_l)
    args = (pol_w, zero_w, mask_w, pol_l, zero_l, mask_l)
    turn = dmpo_loss(*args, beta=0.5, gamma=0.5, end_of_turn="turn")
    one = dmpo_loss(*args, beta=0.5, gamma=0.5, end_of_turn="one")
    assert turn.item() == pytest.approx(math.log1p(math.exp(-0.5 * (0.8 - 0.2 / 3 - 0.1))), abs=1e-12)
    assert turn.item() == pytest.approx(0.5472965, abs=1e-7)
    assert one.item() == pytest.approx(math.log1p(math.exp(-0.35)), abs=1e-12)
    assert one.item() == pytest.approx(0.5333822, abs=1e-7)
    # 'turn' on the parts equals the loss on whole turns (the sum of the parts)
    whole = dmpo_loss(pol_w.sum(-1), zero_w.sum(-1), mask_w, pol_l.sum(-1), zero_l.sum(-1), mask_l, beta=0.5, gamma=0.5)
    assert turn.item() == pytest.approx(whole.item(), abs=1e-15)
    rewards = dmpo_rewards(*args, beta=0.5, gamma=0.5, end_of_turn="one")
    assert rewards.chosen.item() == pytest.approx(0.4) and rewards.rejected.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="two parts"):
        dmpo_loss(pol_w.sum(-1), zero_w.sum(-1), mask_w, pol_l.sum(-1), zero_l.sum(-1), mask_l, beta=0.5, gamma=0.5,
                  end_of_turn="one")
    with pytest.raises(ValueError, match="end_of_turn: must be one of"):
        dmpo_loss(*args, beta=0.5, gamma=0.5, end_of_turn="eos")


def _released_side_logp(input_ids, labels_mask, turn_of, logps, im_end, gamma):
    """DMPO's released trainer (`swt-user/DMPO`: `mask_labels` + `get_batch_loss_metrics` +
    `get_batch_logps`), on one sequence: coefficient φ(j, R) on the reply tokens of round j ≥ 1
    (round 0, the instruction and "OK", is prompt), 1 on every other labelled token (the separator
    after each reply), summed with the per-token log-probs. Rounds are read off the token ids
    (`im_end`), not off our end-of-turn marks."""
    rounds = max(turn_of) + 1
    total = 0.0
    for tok, lab, j, lp in zip(input_ids, labels_mask, turn_of, logps):
        if not lab:
            continue
        if tok == im_end:
            coef = 1.0
        elif gamma < 1:
            coef = gamma**j * (1 - gamma ** (rounds - j)) / (1 - gamma**rounds)
        else:
            coef = (rounds - j) / rounds
        total += coef * lp
    return total


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_end_of_turn_one_matches_the_released_trainer_on_exact_token_layouts(tokenizer, segmenter, gamma):
    """An ETO-format pair (instruction, "OK", task, ...) encoded with SmolLM2's ChatML template; random
    per-token log-probs; our 'one' loss vs the released trainer's token coefficients, float64."""
    from rl_agents.batches import turn_logps
    from rl_agents.collate import collate_sequences
    from rl_agents.tokenization import encode_trajectory
    from rl_agents.trajectory import pair_from_eto

    def conv(*pairs):
        return [{"from": f, "value": v} for f, v in pairs]

    record = {"id": 5, "prompt": conv(("human", "Shop for me."), ("gpt", "OK"), ("human", "Find a red shirt.")),
              "chosen": conv(("gpt", "Thought: search.\nAction: search[red shirt]"), ("human", "Results: B01."),
                             ("gpt", "Thought: open it.\nAction: click[B01]"), ("human", "Item page."),
                             ("gpt", "Thought: buy.\nAction: click[Buy Now]")),
              "rejected": conv(("gpt", "Thought: hm.\nAction: search[hat]"), ("human", "Results: H9."),
                               ("gpt", "Thought: buy.\nAction: click[Buy Now]"))}
    chosen, rejected = pair_from_eto(record)
    seqs = [encode_trajectory(chosen, segmenter), encode_trajectory(rejected, segmenter)]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    g = torch.Generator().manual_seed(0)
    pol = [torch.rand(len(s), generator=g, dtype=f64) * -3 for s in seqs]
    ref = [torch.rand(len(s), generator=g, dtype=f64) * -3 for s in seqs]
    released = [_released_side_logp(s.input_ids, s.action_mask, s.turn_index, p.tolist(), im_end, gamma)
                - _released_side_logp(s.input_ids, s.action_mask, s.turn_index, r.tolist(), im_end, gamma)
                for s, p, r in zip(seqs, pol, ref)]
    beta = 0.1
    expected = -torch.nn.functional.logsigmoid(torch.tensor(beta * (released[0] - released[1]), dtype=f64))

    parts = []
    for s, p, r in zip(seqs, pol, ref):
        batch = collate_sequences([s], pad_id=0)
        parts.append((turn_logps(p[None].clone(), batch, parts=True), turn_logps(r[None].clone(), batch, parts=True),
                      batch.turn_mask()))
    (pc, rc, mc), (pr, rr, mr) = parts
    assert pc.shape == (1, 3, 2) and pr.shape == (1, 2, 2)  # the "OK" is no turn: T = 3 and 2
    ours = dmpo_loss(pc, rc, mc, pr, rr, mr, beta=beta, gamma=gamma, end_of_turn="one")
    assert ours.item() == pytest.approx(expected.item(), abs=1e-13)
    turn = dmpo_loss(pc, rc, mc, pr, rr, mr, beta=beta, gamma=gamma, end_of_turn="turn")
    assert abs(turn.item() - expected.item()) > 1e-6  # the two conventions really differ here
