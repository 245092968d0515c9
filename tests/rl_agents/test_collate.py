import pytest
import torch

from rl_agents.batches import EncodedSequence, token_logps, turn_logps
from rl_agents.collate import collate_pairs, collate_sequences, length_grouped_batches, padding_stats
from rl_agents.tokenization import encode_step, encode_trajectory
from rl_agents.trajectory import Trajectory, Turn


def _seq(n_prompt, *actions):
    ids, mask, turn = list(range(10, 10 + n_prompt)), [0] * n_prompt, [-1] * n_prompt
    for t, n in enumerate(actions):
        ids += list(range(100 + 10 * t, 100 + 10 * t + n)) + [7, 8]  # action, then 2 observation tokens
        mask += [1] * n + [0, 0]
        turn += [t] * n + [-1, -1]
    return EncodedSequence(ids, mask, turn)


def test_collate_right_pads_with_neutral_masks():
    a, b = _seq(3, 2), _seq(2, 1, 3)
    batch = collate_sequences([a, b], pad_id=0, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (2, 16)  # longest 10 -> 16
    assert batch.input_ids[0].tolist() == a.input_ids + [0] * 9
    assert batch.attention_mask[0].tolist() == [1] * 7 + [0] * 9
    assert batch.action_mask[1].tolist() == [bool(m) for m in b.action_mask] + [False] * 6
    assert batch.turn_index[1].tolist() == b.turn_index + [-1] * 6
    assert batch.num_turns.tolist() == [1, 2] and batch.turn_mask().tolist() == [[1, 0], [1, 1]]
    assert batch.input_ids.dtype == torch.long and batch.action_mask.dtype == torch.bool
    assert collate_sequences([a, b], pad_id=5).input_ids.shape == (2, 10)
    with pytest.raises(ValueError, match="equal length"):
        collate_sequences([EncodedSequence([1, 2], [0], [-1, -1])], pad_id=0)


def test_collate_pairs_shares_one_length_and_pads_reference_turns():
    chosen, rejected = [_seq(3, 2, 2), _seq(2, 1)], [_seq(3, 5), _seq(2, 1, 1, 1)]
    # reference per turn: [reply, end-of-turn] log-prob sums
    pair = collate_pairs(chosen, rejected, pad_id=0, ref_chosen=[[[-1.0, -0.5], [-2.0, 0.0]], [[-3.0, -0.25]]],
                         ref_rejected=torch.tensor([[[-4.0, 0], [0, 0], [0, 0]], [[-5.0, 0], [-6.0, 0], [-7.0, 0]]]))
    assert pair.chosen.input_ids.shape == pair.rejected.input_ids.shape == (2, 11)
    assert pair.ref_chosen.tolist() == [[[-1.0, -0.5], [-2.0, 0.0]], [[-3.0, -0.25], [0.0, 0.0]]]
    assert pair.ref_rejected.shape == (2, 3, 2) and len(pair) == 2
    with pytest.raises(ValueError, match="per-turn"):
        collate_pairs(chosen, rejected, pad_id=0, ref_chosen=[[[-1.0, 0.0]], [[-3.0, 0.0]]])
    with pytest.raises(ValueError, match="per-turn"):
        collate_pairs(chosen, rejected, pad_id=0, ref_chosen=[[-1.0], [-3.0]])
    # one number per turn: the whole turn, taken as its reply part
    whole = collate_pairs(chosen, rejected, pad_id=0, ref_chosen=[[-1.0, -2.0], [-3.0]])
    assert whole.ref_chosen.tolist() == [[[-1.0, 0.0], [-2.0, 0.0]], [[-3.0, 0.0], [0.0, 0.0]]]
    with pytest.raises(ValueError, match="rejected"):
        collate_pairs(chosen, rejected[:1], pad_id=0)


def test_length_grouped_batches_deterministic_and_cut_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 2000, (1000,), generator=g).tolist()
    batches = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sum(len(b) < 8 for b in batches) == 0 and len(batches) == 125
    in_order = [list(range(k, k + 8)) for k in range(0, 1000, 8)]
    grouped = padding_stats([[lengths[i] for i in b] for b in batches])["padding/real_fraction"]
    plain = padding_stats([[lengths[i] for i in b] for b in in_order])["padding/real_fraction"]
    assert grouped > 0.97 and plain < 0.7
    assert len(length_grouped_batches([5, 3, 9], batch_size=2, seed=0)[-1]) in (1, 2)


def test_padding_stats_on_token_batches():
    batch = collate_sequences([_seq(3, 2), _seq(2, 1, 3)], pad_id=0, pad_to_multiple_of=8)
    stats = padding_stats([batch, batch])
    assert stats == {"padding/real_tokens": 34, "padding/computed_tokens": 64, "padding/real_fraction": 34 / 64}


def _trajectories():
    obs = ["You see a box.", "It is open. Inside: a coin, 2 keys and a very long scroll of text " * 3, "Done."]
    acts = ["Thought: look.\nAction: look", "Thought: open it.\nAction: open box", "Action: take coin"]
    out = []
    for n in (1, 3, 2):
        turns = [Turn("system", "Be an agent."), Turn("user", "Task: get the coin.")]
        for a, o in zip(acts[:n], obs[:n]):
            turns += [Turn("assistant", a), Turn("user", o)]
        out.append(Trajectory(f"t{n}", "e", turns))
    return out


def test_padding_never_changes_per_turn_logps(tiny_model, segmenter):
    """Per-turn log-probs of each sequence in a right-padded batch == the sequence alone (fp32)."""
    trajs = _trajectories()
    seqs = [encode_trajectory(t, segmenter) for t in trajs] + [encode_step(trajs[1], 1, "Action: wait", segmenter)]
    assert len({len(s) for s in seqs}) == len(seqs)  # really different lengths
    alone = []
    with torch.no_grad():
        for s in seqs:
            b = collate_sequences([s], pad_id=0)
            logits = tiny_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            alone.append(turn_logps(token_logps(logits, b.input_ids), b)[0])
        # pad id 2 is <|im_end|>, a real token: padding is found from attention_mask, never from the id
        for pad_id, multiple in ((0, None), (2, 16)):
            batch = collate_sequences(seqs, pad_id=pad_id, pad_to_multiple_of=multiple)
            logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            padded = turn_logps(token_logps(logits, batch.input_ids), batch)  # (B, T)
            for k, ref in enumerate(alone):
                n = seqs[k].num_turns
                torch.testing.assert_close(padded[k, :n], ref, atol=1e-5, rtol=0)
                assert (padded[k, n:] == 0).all()
        # the check has teeth: left padding that the model attends to does change the values
        longest = max(len(s) for s in seqs)
        s, ref = seqs[0], alone[0]
        ids = torch.tensor([[0] * (longest - len(s)) + s.input_ids])
        wrong = token_logps(tiny_model(input_ids=ids).logits, ids)[0, longest - len(s):]
        assert (wrong[torch.tensor(s.action_mask, dtype=torch.bool)].sum() - ref[0]).abs() > 1e-2
