"""Property-based tests (hypothesis) of the masks and the tokenizer.

Batching (tests/test_batching.py) and beam search (tests/test_decoding.py) have theirs already.
Examples are few and the model tiny: each property runs in well under a second on one thread.
"""

from __future__ import annotations

import random
import string
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiayn.config import TransformerConfig
from aiayn.data.tokenizer import Tokenizer
from aiayn.model import Transformer, causal_mask, padding_mask

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0

# --------------------------------------------------------------------------- masks


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_padding_mask_hides_exactly_the_padding(
    lengths: list[int], extra: int, data: st.DataObject
) -> None:
    width = max(lengths) + extra
    ids = torch.full((len(lengths), width), PAD)
    for row, n in enumerate(lengths):
        tokens = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
        ids[row, :n] = torch.tensor(tokens, dtype=torch.long)
    mask = padding_mask(ids, PAD)
    assert mask.shape == (len(lengths), 1, 1, width) and mask.dtype == torch.bool
    for row, n in enumerate(lengths):
        keep = mask[row, 0, 0]
        if n == 0:  # all padding: left unmasked, so the softmax has something to normalise
            assert keep.all()
        else:
            assert keep.tolist() == [True] * n + [False] * (width - n)


@settings(max_examples=50, deadline=None)
@given(t_k=st.integers(1, 16), data=st.data())
def test_causal_mask_lets_each_query_see_exactly_its_past(t_k: int, data: st.DataObject) -> None:
    """The t_q newest of t_k positions (a cache holds the rest): query i sits at t_k - t_q + i."""
    t_q = data.draw(st.integers(1, t_k))
    mask = causal_mask(t_q, t_k)
    assert mask.shape == (t_q, t_k)
    for i in range(t_q):
        position = t_k - t_q + i
        assert mask[i].tolist() == [j <= position for j in range(t_k)]


@pytest.fixture(scope="module")
def encoder_model() -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", n_encoder_layers=2, n_decoder_layers=1)
    return Transformer(cfg).double().eval()


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_encoder_outputs_ignore_padding(
    encoder_model: Transformer, lengths: list[int], extra: int, seed: int
) -> None:
    """Each sentence encodes the same alone as in a padded batch, however much padding.

    float64, so that the only tolerance needed is for a different summation order.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = encoder_model.cfg.src_vocab_size
    sentences = [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]
    batch = torch.full((len(lengths), max(lengths) + extra), PAD)
    for row, sentence in enumerate(sentences):
        batch[row, : len(sentence)] = sentence
    with torch.no_grad():
        memory = encoder_model.encode(batch)
        for row, sentence in enumerate(sentences):
            alone = encoder_model.encode(sentence[None])
            torch.testing.assert_close(
                memory[row, : len(sentence)], alone[0], rtol=1e-10, atol=1e-10
            )


# --------------------------------------------------------------------------- the tokenizer

# A Multi30k-like alphabet: both languages' letters, digits, punctuation and the space.
ALPHABET = string.ascii_letters + string.digits + "äöüÄÖÜß" + " .,!?;:'\"()-&/"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small BPE vocabulary trained on random words over ALPHABET, so it knows every character."""
    rng = random.Random(0)
    letters = ALPHABET.replace(" ", "")
    texts = [
        " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
            for _ in range(rng.randint(1, 10))
        )
        for _ in range(500)
    ]
    return Tokenizer.train([*texts, letters], vocab_size=300, min_frequency=1)


def normalized(text: str) -> str:
    """What the tokenizer promises to give back: NFKC, less the spaces at either end.

    The tokenizer strips the text's ends (" a text " and "a text" are the same ids); inside,
    every space survives.
    """
    return unicodedata.normalize("NFKC", text).strip(" ")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=80))
def test_tokenizer_round_trip_on_its_alphabet(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert all(4 <= i < tokenizer.vocab_size for i in ids)  # specials are never produced
    assert tokenizer.decode(ids) == normalized(text)
