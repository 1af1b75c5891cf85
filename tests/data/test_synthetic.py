"""The synthetic task generators produce what their definitions say."""

from __future__ import annotations

import pytest
import torch

from subquad.data.synthetic import (
    IGNORE,
    S5_ELEMENTS,
    accuracy,
    compose,
    induction_heads,
    mqar,
    parity,
    passkey,
    s5_word_problem,
    selective_copying,
    train_test,
)


def test_mqar_keys_values_disjoint_each_key_queried_once_labels_at_queries():
    data = mqar(8, seq_len=64, num_pairs=8, vocab_size=64, seed=1)
    half = 32
    for x, y in zip(data.inputs, data.targets, strict=True):
        keys, values = x[0:16:2], x[1:16:2]
        assert (keys >= 1).all() and (keys < half).all() and (values >= half).all()
        assert len(set(keys.tolist())) == 8
        supervised = torch.nonzero(y != IGNORE).flatten()
        assert len(supervised) == 8 and (supervised >= 16).all()
        queried = x[supervised]
        assert sorted(queried.tolist()) == sorted(keys.tolist())  # every key exactly once
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert [pairs[k] for k in queried.tolist()] == y[supervised].tolist()
        assert (x[supervised + 1] == y[supervised]).all()  # the value follows in the stream too
        rest = torch.ones(64, dtype=torch.bool)
        rest[:16] = False
        rest[supervised] = False
        rest[supervised + 1] = False
        assert (x[rest] == 0).all()
    assert torch.equal(mqar(8, 64, 8, 64, seed=1).inputs, data.inputs)
    assert not torch.equal(mqar(8, 64, 8, 64, seed=2).inputs, data.inputs)


def test_mqar_power_law_places_most_queries_near_the_context():
    data = mqar(200, seq_len=512, num_pairs=8, vocab_size=256, seed=0)
    pos = torch.nonzero(data.targets != IGNORE)[:, 1].double()
    assert pos.median() < 16 + (512 - 16) / 4


def test_selective_copying_targets_are_the_content_in_order():
    data = selective_copying(4, seq_len=20, num_tokens=5, vocab_size=10, seed=3)
    for x, y in zip(data.inputs, data.targets, strict=True):
        content = x[:20][x[:20] != 0]
        assert len(content) == 5 and (content >= 3).all()
        assert y[20:25].tolist() == content.tolist() and (y[:20] == IGNORE).all()


def test_induction_and_passkey_and_parity_and_s5():
    ind = induction_heads(16, 32, vocab_size=20, seed=0)
    for x, y in zip(ind.inputs, ind.targets, strict=True):
        first = int(torch.nonzero(x[:-1] == 1)[0])
        assert y[-1] == x[first + 1] and (y[:-1] == IGNORE).all()
    for depth in (0.0, 0.5, 1.0):
        pk = passkey(3, 100, depth=depth, digits=4, seed=1)
        for x, y in zip(pk.inputs, pk.targets, strict=True):
            at = int(torch.nonzero(x == 1)[0])
            key = x[at + 1 : at + 5]
            assert y[95:99].tolist() == key.tolist() and x[95] == 2
            assert abs(at - round(depth * (100 - 10))) <= 0
    par = parity(4, 9, seed=0)
    bits = par.inputs - 1
    assert torch.equal(par.targets - 1, torch.cumsum(bits, 1) % 2)
    s5 = s5_word_problem(3, 6, seed=0)
    for x, y in zip(s5.inputs, s5.targets, strict=True):
        acc = S5_ELEMENTS[int(x[0])]
        for t in range(1, 6):
            acc = compose(acc, S5_ELEMENTS[int(x[t])])
            assert S5_ELEMENTS[int(y[t])] == acc


def test_train_test_splits_differ_and_accuracy_counts_supervised_only():
    tr, te = train_test("mqar", 4, 4, seq_len=32, num_pairs=4, vocab_size=32)
    assert not torch.equal(tr.inputs, te.inputs)
    logits = torch.full((*tr.targets.shape, 32), -1.0)
    mask = tr.targets != IGNORE
    logits[mask, tr.targets[mask]] = 1.0
    assert accuracy(logits, tr.targets) == 1.0
    with pytest.raises(ValueError, match="task must be"):
        train_test("nope", 1, 1)
    with pytest.raises(ValueError, match="seq_len"):
        mqar(1, seq_len=8, num_pairs=4)
