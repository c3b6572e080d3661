"""The encoder over a batch's real tokens only: no work at padding positions (inference).

A batch of sources is a (B, S) rectangle, and the shorter ones are padded to S. The
encoder's position-wise work (the projections W^Q, W^K, W^V and W^O, the feed-forward network,
the residual connections and LayerNorms) is most of its time, and at padding positions it is
wasted: nothing reads those outputs (every attention masks them). :func:`packed_encode` runs
that work on the T real tokens only, as one (T, d_model) matrix, and lays the queries, keys
and values out as (B, h, S, d_k) only for the attention itself (zeros at padding, masked as
in :meth:`Transformer.encode`).

The same modules and the same arithmetic as :meth:`Transformer.encode`, in eval mode: at every
real position the output equals it to rounding (tests); at padding positions it is zero
instead of values nothing uses. A source made only of padding is computed whole, as
`encode` computes it (its positions are the ones the decoder then attends to). With the
decoding benchmark's sources (lengths S/2 .. S, 282 real tokens of 16 x 24) an encoder pass
took 7.8 ms against 9.4 on this project's CPU (docs/performance.md). Used by
:class:`aiayn.static_decoding.StaticDecoding` on a CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from aiayn.model import padding_mask

if TYPE_CHECKING:
    from aiayn.model import Transformer

__all__ = ["packed_encode"]


def packed_encode(model: Transformer, src_ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Encoder output (B, S, d_model) for source ids (B, S), computed at real tokens only;
    zeros at padding (except in a source made only of padding). For a model in eval mode
    (dropout would see different shapes). `key_mask` (B, 1, 1, S): as in `Transformer.encode`;
    the positions it keeps are the ones computed."""
    if model.encoder is None:
        raise ValueError("this model has no encoder (n_encoder_layers=0)")
    model._check_ids(src_ids, model.cfg.src_vocab_size, "src_ids")
    B, S = src_ids.shape
    d = model.cfg.d_model
    mask = padding_mask(src_ids, model.cfg.pad_id) if key_mask is None else key_mask
    # The positions the attention reads: the real tokens, and every position of a source made
    # only of padding (`padding_mask` leaves such a row unmasked, so `encode` computes it).
    real = mask.reshape(-1).nonzero().squeeze(1)  # (T,) flat positions
    x = model._embed(model.src_embed, src_ids).view(B * S, d).index_select(0, real)  # (T, d)

    def padded(y: Tensor) -> Tensor:
        """(T, d) at the real positions -> (B, S, d), zeros at padding."""
        return y.new_zeros(B * S, d).index_copy_(0, real, y).view(B, S, d)

    for layer in model.encoder.layers:
        attn = layer.self_attn

        def self_attention(y: Tensor, attn=attn) -> Tensor:
            """(T, d) -> (T, d): the projections at real tokens, the attention over (B, S)."""
            heads = [attn.split_heads(padded(w(y))) for w in (attn.w_q, attn.w_k, attn.w_v)]
            # W^O runs over all B x S positions: a twelfth of the layer's products (d_ff = 4d).
            return attn.attend(*heads, mask).view(B * S, d).index_select(0, real)

        x = layer.sublayer[0](x, self_attention)
        x = layer.sublayer[1](x, layer.feed_forward)
    return padded(model.encoder.norm(x))
