"""aiayn.data.packed: a corpus' ids in flat tensors behave as the lists they replace, in every
place a translation or summarization run uses them (lengths, cuts, batches, collation), and
take 4 bytes a token."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiayn.data import packed as packed_module
from aiayn.data.batching import TokenBatchSampler, collate, example_lengths, fit_to_max_len
from aiayn.data.packed import Packed, PackedPairs
from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import DataError
from aiayn.tasks.seq2seq import encode_pairs
from aiayn.tasks.summarization import truncate_pairs

rows_st = st.lists(st.lists(st.integers(0, 40000), max_size=12), max_size=40)
pairs_st = st.lists(
    st.tuples(st.lists(st.integers(0, 40000), max_size=12), st.lists(st.integers(0, 40000), max_size=12)),
    max_size=40,
)  # fmt: skip
fast = settings(max_examples=60, deadline=None)


def as_lists(pairs):
    return [(s.tolist(), t.tolist()) for s, t in pairs]


@fast
@given(rows_st, st.integers(0, 14))
def test_packed_rows_and_their_cut_are_the_lists(rows, limit):
    packed = Packed.from_rows(rows)
    assert len(packed) == len(rows)
    assert [packed[i].tolist() for i in range(len(rows))] == rows
    assert packed.lengths().tolist() == [len(r) for r in rows]
    cut = packed.truncated(limit)  # with limit 0, one sequence's end is the next one's cut
    assert [cut[i].tolist() for i in range(len(rows))] == [r[:limit] for r in rows]
    if rows:
        assert packed[-1].tolist() == rows[-1]
    with pytest.raises(IndexError):
        packed[len(rows)]


@fast
@given(rows_st, st.integers(0, 14), st.lists(st.booleans(), min_size=40, max_size=40))
def test_cuts_and_selections_a_few_sequences_at_a_time_are_those_of_lists(rows, limit, keep):
    """Cut and selected in chunks of 3 sequences (65,536 in a run), as the lists would be."""
    packed = Packed.from_rows(rows)
    mask = torch.tensor(keep[: len(rows)], dtype=torch.bool)
    chunk, packed_module.COPY_CHUNK = packed_module.COPY_CHUNK, 3
    try:
        cut, selected = packed.truncated(limit), packed.select(mask)
    finally:
        packed_module.COPY_CHUNK = chunk
    assert [cut[i].tolist() for i in range(len(cut))] == [r[:limit] for r in rows]
    assert [selected[i].tolist() for i in range(len(selected))] == [
        r for r, k in zip(rows, keep, strict=False) if k
    ]


@fast
@given(pairs_st, st.integers(2, 14), st.sampled_from(["truncate", "drop", "reject"]))
def test_fit_to_max_len_of_packed_pairs_is_that_of_lists(pairs, max_len, policy):
    packed = PackedPairs.from_pairs(pairs)
    try:
        expected, n_expected = fit_to_max_len(pairs, max_len, policy)
    except DataError as exc:
        with pytest.raises(DataError) as caught:
            fit_to_max_len(packed, max_len, policy)
        assert str(caught.value) == str(exc)
        return
    fitted, n = fit_to_max_len(packed, max_len, policy)
    assert isinstance(fitted, PackedPairs)
    assert as_lists(fitted) == expected and n == n_expected


@fast
@given(pairs_st, st.integers(0, 14), st.integers(0, 14))
def test_truncate_pairs_of_packed_pairs_is_that_of_lists(pairs, max_src, max_tgt):
    expected, n_src, n_tgt = truncate_pairs(pairs, max_src, max_tgt)
    cut, m_src, m_tgt = truncate_pairs(PackedPairs.from_pairs(pairs), max_src, max_tgt)
    assert as_lists(cut) == [(list(s), list(t)) for s, t in expected]
    assert (m_src, m_tgt) == (n_src, n_tgt)


@fast
@given(pairs_st.filter(bool), st.integers(1, 60), st.integers(0, 100))
def test_batches_digest_and_tensors_of_packed_pairs_are_those_of_lists(pairs, max_tokens, seed):
    """A run resumed after this change goes on with the batches (and the data digest) its
    checkpoint recorded."""
    packed = PackedPairs.from_pairs(pairs)
    lengths = example_lengths(packed)
    assert lengths.tolist() == [list(p) for p in example_lengths(pairs)]
    of_lists = TokenBatchSampler(example_lengths(pairs), max_tokens, seed=seed)
    of_packed = TokenBatchSampler(lengths, max_tokens, seed=seed)
    assert of_packed.batches(3) == of_lists.batches(3)
    assert of_packed.digest() == of_lists.digest()
    for batch in of_packed.batches(0):
        for got, want in zip(
            collate([packed[i] for i in batch], 0, 1, 2),
            collate([pairs[i] for i in batch], 0, 1, 2),
            strict=True,
        ):
            assert got.dtype == torch.long and torch.equal(got, want)


def test_encode_pairs_in_chunks_and_four_bytes_a_token():
    texts = [f"a sentence number {i} with some words" for i in range(50)]
    pairs = [(t, t.upper()) for t in texts]
    tok = Tokenizer.train([t for p in pairs for t in p], vocab_size=120, min_frequency=1)
    packed = encode_pairs(tok, pairs)
    whole = list(zip(tok.encode_batch(texts), tok.encode_batch([t for _, t in pairs]), strict=True))
    assert as_lists(packed) == whole
    chunked = PackedPairs.encode(tok.encode_batch, pairs, chunk=7)  # 7 chunks, the last short
    assert as_lists(chunked) == whole
    tokens = sum(len(s) + len(t) for s, t in whole)
    offsets = 2 * (len(pairs) + 1) * 8
    assert packed.src.values.dtype == torch.int32
    assert packed.nbytes() == 4 * tokens + offsets


def test_a_packed_pair_is_a_view_and_bad_offsets_are_refused():
    packed = Packed.from_rows([[1, 2], [3]])
    assert packed[1].data_ptr() == packed.values.data_ptr() + 2 * 4
    with pytest.raises(ValueError, match="offsets must run from 0 to 3"):
        Packed(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        PackedPairs(packed, Packed.from_rows([[1]]))
