"""The model against independent references: torch.nn.Transformer, eq. (1) written out, the paper's rules."""

import math
import warnings

import pytest
import torch
from torch import nn

from aiayn.config import TransformerConfig
from aiayn.errors import DataError
from aiayn.model import (
    MultiHeadAttention,
    Transformer,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)

PAD = 0


def tiny(**overrides) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", **overrides)


def random_batch(cfg: TransformerConfig, lengths_src, lengths_tgt, seed=0):
    """Source and target ids (B, S), (B, T), right-padded to the longest length with PAD."""
    g = torch.Generator().manual_seed(seed)
    S, T = max(lengths_src), max(lengths_tgt)
    src = torch.full((len(lengths_src), S), PAD)
    tgt = torch.full((len(lengths_tgt), T), PAD)
    for i, n in enumerate(lengths_src):
        src[i, :n] = torch.randint(1, cfg.src_vocab_size, (n,), generator=g)
    for i, n in enumerate(lengths_tgt):
        tgt[i, :n] = torch.randint(1, cfg.tgt_vocab_size, (n,), generator=g)
    return src, tgt


# --------------------------------------------------------------------------- parity with nn.Transformer


def sinusoids(max_len: int, d: int) -> torch.Tensor:
    """§3.5 straight from the formula, one entry at a time (independent of the model's vectorised code)."""
    pe = torch.zeros(max_len, d, dtype=torch.float64)
    for pos in range(max_len):
        for i in range(0, d, 2):
            angle = pos / 10000 ** (i / d)
            pe[pos, i] = math.sin(angle)
            if i + 1 < d:
                pe[pos, i + 1] = math.cos(angle)
    return pe


def copy_into_reference(model: Transformer) -> nn.Transformer:
    """An nn.Transformer holding our weights, layer for layer."""
    cfg = model.cfg
    with (
        warnings.catch_warnings()
    ):  # "enable_nested_tensor is True, but ... norm_first": irrelevant here
        warnings.simplefilter("ignore", UserWarning)
        ref = _reference(cfg)
    ref = ref.to(next(model.parameters()).dtype)
    ref.encoder.enable_nested_tensor = False
    return _copy_weights(model, ref)


def _reference(cfg: TransformerConfig) -> nn.Transformer:
    return nn.Transformer(
        d_model=cfg.d_model,
        nhead=cfg.n_heads,
        num_encoder_layers=cfg.n_encoder_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        dim_feedforward=cfg.d_ff,
        dropout=0.0,
        activation=cfg.activation,
        batch_first=True,
        norm_first=cfg.norm == "pre",
        layer_norm_eps=cfg.layer_norm_eps,
    )


def _copy_weights(model: Transformer, ref: nn.Transformer) -> nn.Transformer:
    cfg = model.cfg

    def attn(dst: nn.MultiheadAttention, src) -> None:
        dst.in_proj_weight.copy_(torch.cat([src.w_q.weight, src.w_k.weight, src.w_v.weight]))
        dst.in_proj_bias.copy_(torch.cat([src.w_q.bias, src.w_k.bias, src.w_v.bias]))
        dst.out_proj.weight.copy_(src.w_o.weight)
        dst.out_proj.bias.copy_(src.w_o.bias)

    def ffn(dst, src) -> None:
        dst.linear1.load_state_dict(src.feed_forward.w_1.state_dict())
        dst.linear2.load_state_dict(src.feed_forward.w_2.state_dict())

    with torch.no_grad():
        for dst, src in zip(ref.encoder.layers, model.encoder.layers, strict=True):
            attn(dst.self_attn, src.self_attn)
            ffn(dst, src)
            dst.norm1.load_state_dict(src.sublayer[0].norm.state_dict())
            dst.norm2.load_state_dict(src.sublayer[1].norm.state_dict())
        for dst, src in zip(ref.decoder.layers, model.decoder.layers, strict=True):
            attn(dst.self_attn, src.self_attn)
            attn(dst.multihead_attn, src.cross_attn)
            ffn(dst, src)
            for j, norm in enumerate((dst.norm1, dst.norm2, dst.norm3)):
                norm.load_state_dict(src.sublayer[j].norm.state_dict())
        if cfg.norm == "pre":
            ref.encoder.norm.load_state_dict(model.encoder.norm.state_dict())
            ref.decoder.norm.load_state_dict(model.decoder.norm.state_dict())
    if cfg.norm == "post":
        # nn.Transformer always adds a final LayerNorm; the paper's post-LN stack has none.
        ref.encoder.norm = None
        ref.decoder.norm = None
    return ref


def reference_logits(model: Transformer, ref: nn.Transformer, src, tgt) -> torch.Tensor:
    cfg = model.cfg
    E = model.src_embed.lut.weight  # shared, tied: one matrix for source, target and output
    pe = sinusoids(cfg.max_len, cfg.d_model).to(E.dtype)
    src_x = E[src] * math.sqrt(cfg.d_model) + pe[: src.size(1)]
    tgt_x = E[tgt] * math.sqrt(cfg.d_model) + pe[: tgt.size(1)]
    src_pad = src.eq(PAD)
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), dtype=E.dtype)
    out = ref(
        src_x,
        tgt_x,
        tgt_mask=causal,
        src_key_padding_mask=src_pad,
        memory_key_padding_mask=src_pad,
    )
    return out @ E.T


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_logits_equal_nn_transformer_float64(norm, activation):
    torch.manual_seed(0)
    model = Transformer(tiny(norm=norm, activation=activation)).double().eval()
    ref = copy_into_reference(model).eval()
    src, tgt = random_batch(model.cfg, [7, 4, 1], [5, 6, 2])
    ours = model(src, tgt)
    theirs = reference_logits(model, ref, src, tgt)
    # Compare at real target positions; padded query positions are never read.
    real = tgt.ne(PAD)
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_gradients_equal_nn_transformer_in_train_mode(norm):
    torch.manual_seed(1)
    model = Transformer(tiny(norm=norm)).double().train()
    ref = copy_into_reference(model).train()
    src, tgt = random_batch(model.cfg, [6, 3], [4, 5], seed=1)
    real = tgt.ne(PAD)
    model(src, tgt)[real].square().mean().backward()
    reference_logits(model, ref, src, tgt)[real].square().mean().backward()
    # The shared embedding is read by both graphs and gets both gradients: compare the layers.
    for i, layer in enumerate(ref.encoder.layers):
        mine = model.encoder.layers[i]
        torch.testing.assert_close(layer.linear1.weight.grad, mine.feed_forward.w_1.weight.grad)
        torch.testing.assert_close(
            layer.self_attn.out_proj.weight.grad, mine.self_attn.w_o.weight.grad
        )
        qkv_grad = torch.cat(
            [
                mine.self_attn.w_q.weight.grad,
                mine.self_attn.w_k.weight.grad,
                mine.self_attn.w_v.weight.grad,
            ]
        )
        torch.testing.assert_close(layer.self_attn.in_proj_weight.grad, qkv_grad)
        torch.testing.assert_close(layer.norm1.weight.grad, mine.sublayer[0].norm.weight.grad)
    for i, layer in enumerate(ref.decoder.layers):
        mine = model.decoder.layers[i]
        kv_grad = torch.cat(
            [
                mine.cross_attn.w_q.weight.grad,
                mine.cross_attn.w_k.weight.grad,
                mine.cross_attn.w_v.weight.grad,
            ]
        )
        torch.testing.assert_close(layer.multihead_attn.in_proj_weight.grad, kv_grad)
        torch.testing.assert_close(layer.linear2.bias.grad, mine.feed_forward.w_2.bias.grad)
        torch.testing.assert_close(layer.norm3.bias.grad, mine.sublayer[2].norm.bias.grad)


# --------------------------------------------------------------------------- attention paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masking", ["none", "padding", "causal", "both"])
def test_reference_attention_equals_sdpa(dtype, masking):
    torch.manual_seed(2)
    B, h, T, d_k = 3, 4, 6, 8
    q, k, v = (torch.randn(B, h, T, d_k, dtype=dtype) for _ in range(3))
    mask = None
    if masking in ("padding", "both"):
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[0, 4:] = False
        keep[2, 1:] = False
        mask = keep[:, None, None, :]
    if masking in ("causal", "both"):
        causal = causal_mask(T, T)
        mask = causal if mask is None else mask & causal
    ours = scaled_dot_product_attention(q, k, v, mask)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_model_reference_path_equals_sdpa_path(norm):
    torch.manual_seed(3)
    fast = Transformer(tiny(norm=norm, attention="sdpa")).eval()
    slow = Transformer(tiny(norm=norm, attention="reference")).eval()
    slow.load_state_dict(fast.state_dict())
    src, tgt = random_batch(fast.cfg, [5, 2, 7], [6, 3, 4], seed=3)
    torch.testing.assert_close(fast(src, tgt), slow(src, tgt), rtol=1e-5, atol=1e-5)


def test_cpu_half_precision_training_takes_the_written_out_attention(monkeypatch):
    """attention "sdpa" calls PyTorch's fused kernel, except for a CPU bf16 call that will be
    differentiated (its backward is slow there): that one is eq. (1) written out, so its
    logits and gradients are those of attention "reference", bit for bit."""
    calls = []
    fused_kernel = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return fused_kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    torch.manual_seed(3)
    fast = Transformer(tiny(attention="sdpa"))
    slow = Transformer(tiny(attention="reference"))
    slow.load_state_dict(fast.state_dict())
    src, tgt = random_batch(fast.cfg, [5, 2, 7], [6, 3, 4], seed=3)

    def train_step(model):
        torch.manual_seed(0)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.train()(src, tgt)
        logits.float().square().mean().backward()
        return logits, [p.grad for p in model.parameters()]

    logits, grads = train_step(fast)
    assert calls == []  # bf16 with gradients: the written-out path
    ref_logits, ref_grads = train_step(slow)
    assert torch.equal(logits, ref_logits)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    # Without gradients (decoding, validation) and in float32 the fused kernel runs.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.eval()(src, tgt)
    assert calls and set(calls) == {torch.bfloat16}
    calls.clear()
    fast.train()(src, tgt).square().mean().backward()
    assert calls and set(calls) == {torch.float32}


def test_fused_projections_give_the_same_model():
    """MultiHeadAttention.fused_projections (one product for Q, K, V): same outputs and
    gradients, same parameters, in training and in incremental decoding."""
    torch.manual_seed(3)
    model = Transformer(tiny()).double()
    src, tgt = random_batch(model.cfg, [5, 2, 7], [6, 3, 4], seed=3)
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    results = []
    for fused in (False, True):
        for module in attention:
            module.fused_projections = fused
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        logits = model.train()(src, tgt)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        memory, cache = model.eval().encode(src), model.new_cache()
        steps = [model.decode(tgt[:, t : t + 1], memory, src, cache=cache) for t in range(4)]
        results.append((logits, grads, torch.cat(steps, dim=1)))
    (logits_a, grads_a, steps_a), (logits_b, grads_b, steps_b) = results
    torch.testing.assert_close(logits_b, logits_a)
    torch.testing.assert_close(steps_b, steps_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a)


def test_causal_mask_with_cache_offset():
    # Two new queries at positions 3 and 4 of 5: the first must not see position 4.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


# --------------------------------------------------------------------------- the paper's invariants


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_causality_future_tokens_do_not_change_the_past(attention):
    torch.manual_seed(4)
    model = Transformer(tiny(attention=attention)).eval()
    src, tgt = random_batch(model.cfg, [6, 6], [8, 8], seed=4)
    before = model(src, tgt)
    for t in range(1, tgt.size(1)):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] % (model.cfg.tgt_vocab_size - 1)) + 1  # another real token
        after = model(src, changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, t:], before[:, t:]), (
            f"token {t} should change logits from {t} on"
        )


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_invariance(norm):
    torch.manual_seed(5)
    model = Transformer(tiny(norm=norm)).eval()
    src, tgt = random_batch(model.cfg, [3, 9, 5], [4, 2, 7], seed=5)
    batched = model(src, tgt)
    for i in range(src.size(0)):
        s = src[i : i + 1, : int(src[i].ne(PAD).sum())]
        t = tgt[i : i + 1, : int(tgt[i].ne(PAD).sum())]
        alone = model(s, t)
        torch.testing.assert_close(batched[i : i + 1, : t.size(1)], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_incremental_decoding_equals_full_forward(norm, positions):
    torch.manual_seed(6)
    model = Transformer(tiny(norm=norm, positions=positions)).eval()
    src, tgt = random_batch(model.cfg, [7, 3], [9, 9], seed=6)
    full = model(src, tgt)
    memory = model.encode(src)
    cache = model.new_cache()
    for t in range(tgt.size(1)):
        step = model.decode(tgt[:, t : t + 1], memory, src, cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.length == tgt.size(1)
    # The self-attention cache grew one position per step; cross-attention keys were made once.
    layer = cache.layers[0]
    assert layer.self_k.shape[2] == tgt.size(1)
    assert layer.cross_k.shape[2] == src.size(1)


def test_incremental_decoding_with_a_multi_token_prefix():
    torch.manual_seed(7)
    model = Transformer(tiny()).eval()
    src, tgt = random_batch(model.cfg, [5], [8], seed=7)
    full = model(src, tgt)
    memory, cache = model.encode(src), model.new_cache()
    first = model.decode(tgt[:, :5], memory, src, cache=cache)  # a prompt of 5 at once
    rest = model.decode(tgt[:, 5:], memory, src, cache=cache)  # then 3 more at once
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_reorder_follows_beams():
    torch.manual_seed(8)
    model = Transformer(tiny()).eval()
    src, tgt = random_batch(model.cfg, [4, 6], [5, 5], seed=8)
    memory, cache = model.encode(src), model.new_cache()
    model.decode(tgt[:, :3], memory, src, cache=cache)
    index = torch.tensor([1, 1, 0])
    cache.reorder(index)
    out = model.decode(tgt[index, 3:4], memory[index], src[index], cache=cache)
    full = model(src[index], tgt[index, :4])
    torch.testing.assert_close(out[:, 0], full[:, 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_all_padding_row_gives_no_nan(dtype, attention):
    torch.manual_seed(9)
    model = Transformer(tiny(attention=attention)).to(dtype).train()
    src, tgt = random_batch(model.cfg, [5, 5], [4, 4], seed=9)
    src[1] = PAD  # a source made only of padding
    tgt[1] = PAD
    logits = model(src, tgt)
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- embeddings, positions, tying


def test_sinusoidal_positions_follow_section_3_5():
    model = Transformer(tiny())
    expected = sinusoids(model.cfg.max_len, model.cfg.d_model)
    torch.testing.assert_close(
        model.positions(0, model.cfg.max_len), expected, rtol=1e-12, atol=1e-12
    )


def test_embeddings_are_scaled_by_sqrt_d_model_and_initialised_as_documented():
    cfg = TransformerConfig.from_preset("base", vocab_size=1000)
    model = Transformer(cfg)
    ids = torch.tensor([[5]])
    torch.testing.assert_close(
        model.src_embed(ids)[0, 0], model.src_embed.lut.weight[5] * math.sqrt(512)
    )
    weight = model.src_embed.lut.weight[1:]
    assert abs(weight.std().item() - 512**-0.5) < 0.002  # N(0, d_model^-0.5)
    assert torch.count_nonzero(model.src_embed.lut.weight[cfg.pad_id]) == 0
    w = model.encoder.layers[
        0
    ].feed_forward.w_1.weight  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= math.sqrt(6 / (512 + 2048))
    assert w.abs().max().item() > 0.9 * math.sqrt(6 / (512 + 2048))
    assert torch.count_nonzero(model.encoder.layers[0].feed_forward.w_1.bias) == 0


def test_three_way_tying_is_one_tensor():
    model = Transformer(tiny())
    assert model.src_embed is model.tgt_embed
    assert model.generator.weight is model.src_embed.lut.weight


def test_two_way_tying_with_separate_vocabularies():
    model = Transformer(tiny(shared_vocab=False, src_vocab_size=50, tgt_vocab_size=40))
    assert model.src_embed is not model.tgt_embed
    assert model.generator.weight is model.tgt_embed.lut.weight
    src, tgt = random_batch(model.cfg, [3], [4])
    assert model(src, tgt).shape == (1, 4, 40)


def test_untied_output_projection():
    model = Transformer(tiny(tie_embeddings=False))
    assert model.generator.weight is not model.tgt_embed.lut.weight


def test_parameter_counts_of_the_paper_sizes():
    base = Transformer(TransformerConfig.from_preset("base", vocab_size=37000))
    assert base.num_parameters() == 63_082_496  # shared, tied 37k vocabulary: ~63M (paper: 65M)
    assert base.num_parameters(include_embeddings=False) == 44_138_496


# --------------------------------------------------------------------------- encoder-only and decoder-only


def test_encoder_only_model():
    model = Transformer(tiny(n_decoder_layers=0)).eval()
    assert model.decoder is None and model.generator is None
    src, _ = random_batch(model.cfg, [4, 2], [1, 1])
    assert model.encode(src).shape == (2, 4, model.cfg.d_model)
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(src)


def test_decoder_only_language_model_is_causal_and_caches():
    torch.manual_seed(10)
    model = Transformer(tiny(n_encoder_layers=0)).eval()
    assert model.encoder is None and model.decoder.layers[0].cross_attn is None
    _, tgt = random_batch(model.cfg, [1], [7, 7], seed=10)
    full = model.decode(tgt)
    cache = model.new_cache()
    for t in range(tgt.size(1)):
        torch.testing.assert_close(
            model.decode(tgt[:, t : t + 1], cache=cache)[:, 0], full[:, t], rtol=1e-5, atol=1e-5
        )
    changed = tgt.clone()
    changed[:, 4] = changed[:, 4] % 60 + 1
    torch.testing.assert_close(model.decode(changed)[:, :4], full[:, :4])


def test_learned_positions_are_what_the_model_adds_to_the_embeddings():
    """Table 3 (E): with positions: learned, position p adds row p of a trained table (a
    parameter), and no sinusoid: the encoder's input is that row plus the scaled embedding."""
    torch.manual_seed(0)
    model = Transformer(tiny(positions="learned", dropout=0.0)).eval()
    table = model.positions.embedding.weight
    assert any(p is table for p in model.parameters())
    ids = torch.tensor([[5, 6, 7]])
    expected = model.src_embed(ids) + table[:3]
    torch.testing.assert_close(model._embed(model.src_embed, ids), expected)
    with torch.no_grad():
        table[1] += 1.0  # another row for position 1: the output there changes
    assert not torch.allclose(model._embed(model.src_embed, ids)[:, 1], expected[:, 1])
    sinusoidal = Transformer(tiny())
    assert not any("positions" in name for name, _ in sinusoidal.named_parameters())


# --------------------------------------------------------------------------- bad input


def test_input_longer_than_max_len_is_refused():
    model = Transformer(tiny(max_len=8))
    src = torch.ones(1, 9, dtype=torch.long)
    with pytest.raises(DataError, match="max_len is 8"):
        model(src, src[:, :3])


def test_token_ids_outside_the_vocabulary_are_refused():
    model = Transformer(tiny())
    src = torch.tensor([[1, 2, 64]])
    with pytest.raises(DataError, match=r"token id 64, outside the vocabulary \[0, 64\)"):
        model(src, src)
    with pytest.raises(DataError, match="token id -1"):
        model(src.clamp(max=5), torch.tensor([[-1]]))


def test_float_ids_are_refused():
    model = Transformer(tiny())
    with pytest.raises(DataError, match="integer token ids"):
        model.encode(torch.ones(1, 3))


def test_mismatched_batches_memories_masks_and_caches_are_refused():
    """Each was broadcast or half-applied before: a wrong answer, or a cache that one layer
    had already extended when the call failed."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    src = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    tgt = torch.tensor([[1, 5, 6], [1, 7, 3]])
    memory = model.encode(src)
    with pytest.raises(DataError, match="src_ids has 2 rows but tgt_ids 1"):
        model(src, tgt[:1])
    with pytest.raises(DataError, match=r"a float tensor of shape \(2, 3, 32\), got"):
        model.decode(tgt, memory, src[:, :3])
    with pytest.raises(DataError, match="src_ids has 1 rows but tgt_ids 2"):
        model.decode(tgt, memory, src[:1])
    square = torch.tensor([[5, 6, 0, 0]] * 4)
    for mask in (padding_mask(src, 0).float(), padding_mask(square, 0).view(4, 4)):
        with pytest.raises(DataError, match="key_mask must be a bool tensor of shape"):
            model.encode(square if mask.dim() == 2 else src, key_mask=mask)

    cache = model.new_cache()
    model.decode(tgt[:, :1], memory, src, cache=cache)
    with pytest.raises(DataError, match="a float tensor of shape"):
        model.decode(tgt[:, 1:2], memory, src[:, :3], cache=cache)
    lengths = [layer.self_k.size(2) for layer in cache.layers]
    assert lengths == [1] * len(cache.layers) and cache.length == 1  # nothing appended
    step = model.decode(tgt[:, 1:2], memory, src, cache=cache)
    torch.testing.assert_close(step[:, 0], model(src, tgt)[:, 1])
    with pytest.raises(DataError, match="the cache holds 2 rows but tgt_ids has 1"):
        model.decode(tgt[:1, 2:], memory[:1], src[:1], cache=cache)
    with pytest.raises(DataError, match="a 4-position memory but this memory has 3"):
        model.decode(tgt[:, 2:], memory[:, :3], src[:, :3], cache=cache)
    other = Transformer(tiny(n_decoder_layers=1))
    with pytest.raises(DataError, match="make it with this model's new_cache"):
        model.decode(tgt[:, :1], memory, src, cache=other.new_cache())


# --------------------------------------------------------------------------- it learns


def test_tiny_model_overfits_sequence_reversal():
    """The tiny preset learns to reverse 128 fixed sequences to 100% token accuracy in 300 seeded steps."""
    torch.manual_seed(0)
    cfg = tiny(src_vocab_size=20, tgt_vocab_size=20, max_len=16)
    model = Transformer(cfg)
    BOS, first_content_id, L, steps = 1, 3, 8, 300
    src = torch.randint(first_content_id, cfg.src_vocab_size, (128, L))
    tgt_out = src.flip(1)  # the reversal needs attention across the whole source
    tgt_in = torch.cat([torch.full((128, 1), BOS), tgt_out[:, :-1]], dim=1)  # shifted right
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    # Linear warm-up over 30 steps, then linear decay to zero.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (1 - s / steps)
    )
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(src, tgt_in).argmax(-1) == tgt_out).float().mean().item()
    assert accuracy == 1.0, (
        f"token accuracy {accuracy:.4f} after {steps} steps (loss {loss.item():.4f})"
    )


def test_recording_attention_gives_the_weights_of_eq_1():
    from aiayn.model import recording_attention

    torch.manual_seed(11)
    model = Transformer(tiny()).eval()
    src, tgt = random_batch(model.cfg, [5, 3], [4, 4], seed=11)
    plain = model(src, tgt)
    with recording_attention(model):
        recorded = model(src, tgt)
    torch.testing.assert_close(recorded, plain)  # recording does not change the output
    weights = model.decoder.layers[-1].cross_attn.weights  # (B, h, T, S)
    assert weights.shape == (2, model.cfg.n_heads, 4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.cfg.n_heads, 4))
    assert torch.all(weights[1, :, :, 3:] == 0)  # no attention to the second source's padding
    assert not model.decoder.layers[-1].cross_attn.record_weights
