"""Tests for aiayn.data.batching: token-budget batching, resume, collate, length limits."""

import logging

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aiayn.data.batching import TokenBatchSampler, collate, example_lengths, fit_to_max_len
from aiayn.errors import ConfigError, DataError

lengths_st = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=120)
max_tokens_st = st.integers(1, 400)
seed_st = st.integers(0, 2**31)
fast = settings(max_examples=60, deadline=None)


def padded(lengths, batch):
    """(padded src tokens, padded tgt tokens) of a batch."""
    return (
        len(batch) * max(lengths[i][0] for i in batch),
        len(batch) * max(lengths[i][1] for i in batch),
    )


@fast
@given(lengths_st, max_tokens_st, seed_st, st.integers(0, 5), st.booleans())
def test_budget_and_exactly_once(lengths, max_tokens, seed, epoch, shuffle):
    sampler = TokenBatchSampler(lengths, max_tokens, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert batch
        if max(padded(lengths, batch)) > max_tokens:
            # Only an example too long by itself may exceed the budget, and it goes alone.
            assert len(batch) == 1 and max(lengths[batch[0]]) > max_tokens


@fast
@given(lengths_st, max_tokens_st, seed_st, st.integers(0, 5))
def test_deterministic_for_seed_and_epoch(lengths, max_tokens, seed, epoch):
    a = TokenBatchSampler(lengths, max_tokens, seed=seed)
    b = TokenBatchSampler(lengths, max_tokens, seed=seed)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating the same epoch repeats it


@fast
@given(
    st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=20, max_size=120),
    st.integers(1, 150),
    seed_st,
)
def test_order_changes_across_epochs(lengths, max_tokens, seed):
    sampler = TokenBatchSampler(lengths, max_tokens, seed=seed)
    assume(len(sampler) >= 5)  # with fewer batches, equal orders are plausible by chance
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert any(o != orders[0] for o in orders[1:])
    assert all(len(o) == len(sampler) for o in orders)  # same batch count every epoch


@fast
@given(lengths_st, max_tokens_st, seed_st, st.integers(0, 3), st.data())
def test_resume_yields_exact_remainder(lengths, max_tokens, seed, epoch, data):
    sampler = TokenBatchSampler(lengths, max_tokens, seed=seed)
    sampler.set_epoch(epoch)
    full = list(sampler)
    k = data.draw(st.integers(0, len(full)), label="consumed")

    sampler.set_epoch(epoch)
    it = iter(sampler)
    seen = [next(it) for _ in range(k)]
    state = sampler.state_dict()
    assert state["epoch"] == epoch and state["consumed"] == k

    fresh = TokenBatchSampler(lengths, max_tokens, seed=seed)
    fresh.load_state_dict(state)
    fresh.set_epoch(epoch)  # a training loop re-setting the same epoch must not lose the resume
    assert fresh.state_dict() == state
    assert seen + list(fresh) == full
    assert list(fresh) == full  # later iterations of the epoch start from the beginning again


def test_budget_counts_larger_side_and_buckets():
    lengths = [(10, 2)] * 4 + [(2, 10)] * 4
    batches = list(TokenBatchSampler(lengths, max_tokens=40, shuffle=False))
    assert all(len(b) == 4 for b in batches)
    assert sorted(map(sorted, batches)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_unshuffled_is_shortest_first():
    lengths = [(5, 5), (1, 1), (3, 3), (2, 2)]
    assert list(TokenBatchSampler(lengths, max_tokens=4, shuffle=False)) == [[1, 3], [2], [0]]


def test_oversize_example_alone_with_warning(caplog):
    lengths = [(3, 3), (50, 2), (3, 3)]
    with caplog.at_level(logging.WARNING, logger="aiayn.data.batching"):
        sampler = TokenBatchSampler(lengths, max_tokens=10, shuffle=False)
    assert "1 of 3 examples are longer than max_tokens=10" in caplog.text
    assert list(sampler) == [[0, 2], [1]]


def test_state_dict_consumed_override_and_changing_epoch():
    sampler = TokenBatchSampler([(2, 2)] * 20, max_tokens=4, seed=1)
    assert sampler.state_dict(consumed=3)["consumed"] == 3
    sampler.load_state_dict({**sampler.state_dict(), "consumed": 4})
    sampler.set_epoch(1)  # a new epoch discards the pending resume point
    assert len(list(sampler)) == len(sampler)


def test_load_state_dict_rejects_mismatch():
    sampler = TokenBatchSampler([(2, 2)] * 20, max_tokens=4, seed=1)
    state = sampler.state_dict()
    with pytest.raises(DataError, match="seed 1 but this run uses 2"):
        TokenBatchSampler([(2, 2)] * 20, max_tokens=4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="10 batches per epoch but the data now gives 5"):
        TokenBatchSampler([(2, 2)] * 20, max_tokens=8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="corrupt"):
        sampler.load_state_dict({**state, "consumed": 11})


def test_sampler_bad_arguments():
    with pytest.raises(ConfigError, match="max_tokens 0"):
        TokenBatchSampler([(1, 1)], max_tokens=0)
    with pytest.raises(DataError, match="no examples"):
        TokenBatchSampler([], max_tokens=10)
    with pytest.raises(DataError, match=r"example 1 has lengths \(0, 3\)"):
        TokenBatchSampler([(1, 1), (0, 3)], max_tokens=10)


def test_works_with_dataloader():
    examples = [([5] * n, [6] * (n + 1)) for n in range(1, 30)]
    sampler = TokenBatchSampler(example_lengths(examples), max_tokens=64, seed=0)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate)
    n_seen = 0
    for src, tgt_in, _tgt_out in loader:
        assert src.numel() <= 64 and tgt_in.numel() <= 64
        n_seen += src.shape[0]
    assert n_seen == len(examples)


def test_collate():
    src, tgt_in, tgt_out = collate(
        [([5, 6, 7], [8]), ([9], [10, 11, 12])], pad_id=0, bos_id=1, eos_id=2
    )
    assert src.dtype == tgt_in.dtype == tgt_out.dtype == torch.long
    assert src.tolist() == [[5, 6, 7, 2], [9, 2, 0, 0]]
    assert tgt_in.tolist() == [[1, 8, 0, 0], [1, 10, 11, 12]]
    assert tgt_out.tolist() == [[8, 2, 0, 0], [10, 11, 12, 2]]


def test_collate_matches_example_lengths_and_custom_ids():
    pairs = [([4, 4], []), ([], [4])]
    src, tgt_in, tgt_out = collate(pairs, pad_id=9, bos_id=7, eos_id=8)
    assert src.tolist() == [[4, 4, 8], [8, 9, 9]]
    assert tgt_in.tolist() == [[7, 9], [7, 4]]
    assert tgt_out.tolist() == [[8, 9], [4, 8]]
    lens = example_lengths(pairs)
    assert (src != 9).sum(1).tolist() == [s for s, _ in lens]
    assert (tgt_out != 9).sum(1).tolist() == [t for _, t in lens]
    with pytest.raises(DataError, match="empty batch"):
        collate([])


def test_fit_to_max_len_truncate():
    examples = [([1] * 3, [2] * 3), ([1] * 5, [2] * 2), ([1] * 2, [2] * 9)]
    out, n = fit_to_max_len(examples, max_len=4)
    assert n == 2
    assert [(len(s), len(t)) for s, t in out] == [(3, 3), (3, 2), (2, 3)]
    assert len(examples[1][0]) == 5  # input untouched


def test_fit_to_max_len_drop():
    examples = [([1] * 3, [2] * 3), ([1] * 5, [2] * 2), ([3] * 2, [4] * 3), ([1] * 2, [2] * 9)]
    out, n = fit_to_max_len(examples, max_len=4, policy="drop")
    assert n == 2 and out == [([1] * 3, [2] * 3), ([3] * 2, [4] * 3)]


def test_fit_to_max_len_reject():
    examples = [([1] * 3, [2] * 3), ([1] * 2, [2] * 9)]
    with pytest.raises(DataError, match=r"example 1: target has 9 tokens .* max_len is 4"):
        fit_to_max_len(examples, max_len=4, policy="reject")
    out, n = fit_to_max_len(examples[:1], max_len=4, policy="reject")
    assert n == 0 and out == [([1] * 3, [2] * 3)]
    with pytest.raises(ConfigError, match="unknown length policy"):
        fit_to_max_len(examples, 4, policy="skip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_len 1"):
        fit_to_max_len(examples, 1)


def test_device_batch_moves_every_tensor_and_keeps_the_rest():
    """Every task's batch gets `to` from DeviceBatch: tensors converted, other fields kept."""
    from aiayn.tasks.seq2seq import Seq2SeqBatch

    batch = Seq2SeqBatch(torch.ones(2, 3), torch.zeros(2, 4), torch.ones(2, 4), 7)
    moved = batch.to(torch.device("meta"))
    assert type(moved) is Seq2SeqBatch and moved.n_tokens == 7
    assert all(t.device.type == "meta" for t in (moved.src, moved.tgt_in, moved.tgt_out))
    assert batch.src.device.type == "cpu"  # a copy: the original is untouched
