"""aiayn.frozen_decoder: the decoder's CPU decoding copy computes what the model computes.

The reference is the model itself: `Transformer.decode` with a `KVCache`, one position at a
time. Searches through `StaticDecoding` (which uses the frozen copy on a CPU) are compared
with the reference searches in tests/test_decoding_model.py.
"""

from __future__ import annotations

import pytest
import torch

from aiayn.config import TransformerConfig
from aiayn.decoding import TransformerDecoder, greedy_search
from aiayn.frozen_decoder import FrozenCache, FrozenDecoder, first_argmax, largest_k
from aiayn.model import Transformer, padding_mask
from aiayn.static_decoding import StaticDecoding

PAD = 0


def make_model(**options) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=29, max_len=32)
    if not options.pop("shared", True):
        base = dict(
            src_vocab_size=31, tgt_vocab_size=23, shared_vocab=False, tie_embeddings=False,
            max_len=32,
        )  # fmt: skip
    model = Transformer(TransformerConfig.from_preset("tiny", **base, **options))
    with torch.no_grad():  # non-zero biases and norms, so that each one is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def sources(vocab: int) -> torch.Tensor:
    src = torch.randint(3, vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    return src


LAYOUTS = [
    dict(),
    dict(norm="pre"),
    dict(activation="gelu", positions="learned"),
    dict(activation="silu", embedding_norm=True, scale_embeddings=False),
    dict(shared=False, output_bias=True),
]


@pytest.mark.parametrize("options", LAYOUTS, ids=lambda o: ",".join(o) or "paper")
def test_logits_equal_the_models_incremental_decoder(options: dict) -> None:
    model = make_model(**options)
    src = sources(model.cfg.src_vocab_size)
    tgt = torch.randint(
        3, model.cfg.tgt_vocab_size, (3, 7), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.new_cache()
        frozen = FrozenDecoder(model)
        frozen_cache = frozen.new_cache(rows=3, positions=10, src_len=src.size(1))
        frozen_cache.load(model, memory, padding_mask(src, PAD), repeat=1)
        for t in range(tgt.size(1)):
            expected = model.decode(tgt[:, t : t + 1], memory, src, cache)[:, 0]  # (3, V)
            got = frozen.logits(tgt[:, t], frozen_cache)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
            frozen_cache.position.add_(1)


def test_a_bias_replaces_the_output_bias() -> None:
    model = make_model(output_bias=True)
    src = sources(model.cfg.src_vocab_size)
    frozen = FrozenDecoder(model)
    cache = frozen.new_cache(rows=3, positions=4, src_len=src.size(1))
    with torch.no_grad():
        cache.load(model, model.encode(src), padding_mask(src, PAD), repeat=1)
        tokens = torch.tensor([1, 5, 6])
        plain = frozen.logits(tokens, cache).clone()  # the next call reuses the buffer
        bias = torch.zeros(model.cfg.tgt_vocab_size, dtype=torch.float64)
        bias[4] = float("-inf")
        banned = frozen.logits(tokens, cache, bias)  # the same position again
    assert torch.isneginf(banned[:, 4]).all()
    torch.testing.assert_close(banned[:, 5:], plain[:, 5:] - model.generator.bias[5:])


def test_bf16_logits_are_close_to_the_models() -> None:
    """In bf16 the products round differently; the logits stay within bf16's precision."""
    model = make_model().to(torch.bfloat16)
    src = sources(model.cfg.src_vocab_size)
    tgt = torch.tensor([[1, 7, 8], [1, 9, 3], [1, 4, 4]])
    with torch.no_grad():
        memory = model.encode(src)
        expected = model.decode(tgt, memory, src)  # (3, 3, V), the full forward pass
        frozen = FrozenDecoder(model)
        cache = frozen.new_cache(rows=3, positions=4, src_len=src.size(1))
        cache.load(model, memory, padding_mask(src, PAD), repeat=1)
        for t in range(3):
            got = frozen.logits(tgt[:, t], cache)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), expected[:, t].float(), rtol=0.05, atol=0.1)
            cache.position.add_(1)


def test_the_copy_knows_when_the_model_has_changed() -> None:
    model = make_model()
    frozen = FrozenDecoder(model)
    assert frozen.is_current()
    with torch.no_grad():
        model.decoder.layers[0].feed_forward.w_1.weight.mul_(1.5)
    assert not frozen.is_current()
    frozen = FrozenDecoder(model)
    model.load_state_dict(make_model(norm="post").state_dict())
    assert not frozen.is_current()


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1.0),
    # A fused step updates the parameters without incrementing their version counters.
    "fused-adamw": lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_static_decoding_remakes_the_copy_after_a_training_step(optimizer: str) -> None:
    """A search object kept across training steps (as validation keeps one) decodes with the
    weights of the moment, not those it first copied."""
    model = make_model()
    src = sources(model.cfg.src_vocab_size)
    search = StaticDecoding(model)
    assert search.greedy(src, max_len=8) == greedy_search(TransformerDecoder(model), src, max_len=8)
    before = search._frozen
    optimizer = OPTIMIZERS[optimizer](model.parameters())
    model.train()
    loss = model(src, src).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    model.eval()
    expected = greedy_search(TransformerDecoder(model), src, max_len=8)
    assert search.greedy(src, max_len=8) == expected
    assert search._frozen is not before


def test_a_change_the_version_counters_miss_is_seen_in_the_sampled_values() -> None:
    model = make_model()
    frozen = FrozenDecoder(model)
    assert frozen.is_current()
    weight = model.decoder.layers[0].feed_forward.w_2.weight
    version = weight._version
    weight.data[3] += 1.0  # a whole row, behind autograd's back, as a fused optimiser does
    assert weight._version == version and not frozen.is_current()
    weight.data.view(-1)[0] = float("nan")  # a sampled value; compared bit for bit, NaN == NaN
    frozen = FrozenDecoder(model)
    assert frozen.is_current()


def test_first_argmax_is_argmax_ties_included() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 640, generator=generator)
    x[1, 100] = x[1, 300] = x[1, 600] = 50.0  # ties in different blocks: the first wins
    x[2, 70] = x[2, 75] = 50.0  # a tie within one block
    x[3] = 1.0  # a row of equal values: index 0
    x[4, 639] = 50.0  # the very last column
    x[5, 10] = float("nan")  # NaN counts as the largest, as in argmax
    assert first_argmax(x).tolist() == x.argmax(-1).tolist() == [
        int(x[0].argmax()), 100, 70, 0, 639, 10,
    ]  # fmt: skip
    ragged = torch.randn(4, 650, generator=generator)  # not a multiple of the block: argmax
    assert first_argmax(ragged).tolist() == ragged.argmax(-1).tolist()


def test_largest_k_is_topk() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32 * 64, generator=generator)
    x[1, 64:128] = 40.0 + torch.arange(64.0)  # the 8 largest all in one block
    x[2, ::64] = 50.0 + torch.arange(32.0)  # each block's largest at its first column
    x[3, :] = float("-inf")  # banned everywhere but three columns: -inf fills the rest
    x[3, [5, 700, 2000]] = torch.tensor([1.0, 3.0, 2.0])
    x[4, 1000] = float("inf")
    for k in (1, 8, 32):
        values, index = largest_k(x, k)
        expected_values, expected_index = x.topk(k, dim=1)
        assert torch.equal(values, expected_values), k
        finite = expected_values.isfinite() | (expected_values > 0)  # -inf ties: any column
        assert torch.equal(index[finite], expected_index[finite]), k
        assert torch.equal(x.gather(1, index), values)  # the indices hold those values
    ragged = torch.randn(3, 650, generator=generator)  # not a multiple of the block: topk
    assert torch.equal(largest_k(ragged, 8)[1], ragged.topk(8, dim=1).indices)


def test_frozen_can_be_turned_off() -> None:
    """frozen=False: the model's own decoder modules take each step (what a GPU runs)."""
    model = make_model()
    src = sources(model.cfg.src_vocab_size)
    eager = StaticDecoding(model, frozen=False)
    assert eager.greedy(src, max_len=6) == StaticDecoding(model).greedy(src, max_len=6)
    assert eager._frozen is None and not isinstance(
        next(iter(eager._plans.values())).state.cache, FrozenCache
    )
