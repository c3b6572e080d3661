"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), from PyTorch primitives.

Read it next to the paper, top to bottom:

    §3.2.1  scaled_dot_product_attention   Attention(Q, K, V) = softmax(QK^T / sqrt(d_k)) V
    §3.2.2  MultiHeadAttention             MultiHead(Q, K, V) = Concat(head_1..head_h) W^O
    §3.3    PositionwiseFeedForward        FFN(x) = max(0, x W_1 + b_1) W_2 + b_2
    §3.4    Embeddings                     learned embeddings times sqrt(d_model), tied to the output
    §3.5    SinusoidalPositionalEncoding   PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), cos on 2i+1
    §3.1    SublayerConnection             LayerNorm(x + Dropout(Sublayer(x)))
    §3.1    EncoderLayer / Encoder         N x (self-attention, FFN)
    §3.1    DecoderLayer / Decoder         N x (masked self-attention, encoder-decoder attention, FFN)
            Transformer                    encode(), decode() (with a key/value cache), forward()

Shapes: B batch, S source length, T target length, d = d_model, h heads, d_k = d / h, V vocabulary.
Masks are boolean and mean "may attend" (True) as in `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn.config import TransformerConfig
from aiayn.dropout import Dropout, dropout
from aiayn.errors import DataError

if TYPE_CHECKING:
    from aiayn.static_decoding import StaticKVCache, StaticLayerCache

# --------------------------------------------------------------------------- attention (§3.2)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)): how much each query attends to each key, (B, h, T_q, T_k).

    Args:
        q: (B, h, T_q, d_k) queries.  k: (B, h, T_k, d_k) keys.
        mask: boolean, broadcastable to (B, h, T_q, T_k); False where a query must not attend.
    """
    # "We suspect that for large values of d_k, the dot products grow large in magnitude, pushing
    # the softmax function into regions where it has extremely small gradients. To counteract
    # this effect, we scale the dot products by 1/sqrt(d_k)."
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, h, T_q, T_k)
    if mask is not None:
        # -inf, not -1e9: exact zeros after the softmax, and no overflow in float16.
        scores = scores.masked_fill(~mask, float("-inf"))
    # The softmax runs in at least float32, so bfloat16 and float16 scores do not lose mass.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return weights.to(q.dtype)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Eq. (1) written out: softmax(Q K^T / sqrt(d_k)) V. The reference the fast path is tested against.

    Args:
        q: (B, h, T_q, d_k) queries.  k: (B, h, T_k, d_k) keys.  v: (B, h, T_k, d_v) values.
        mask: boolean, broadcastable to (B, h, T_q, T_k); False where a query must not attend.
        dropout_p: dropout on the attention weights (training only; the caller passes 0 in eval).
    Returns:
        (B, h, T_q, d_v).
    """
    weights = attention_weights(q, k, mask)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ v


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """(t_q, t_k) boolean: query i (the last t_q of t_k positions) sees keys j <= its own position.

    With a key/value cache the queries are the newest t_q positions, so query i sits at
    absolute position t_k - t_q + i ("preventing leftward information flow", §3.2.3).
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, 1, 1, S) boolean key mask from token ids (B, S): False at padding.

    A row made only of padding has nothing to attend to, and a softmax over an empty set is
    NaN. Such a row is left unmasked instead: it attends over its own padding, gives finite
    values, and those values are never used (its positions are padding too).
    """
    keep = ids.ne(pad_id)
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def _slow_fused_backward(q: Tensor) -> bool:
    """Whether F.scaled_dot_product_attention would be the slower choice for queries q.

    On a CPU, PyTorch's fused (flash) attention kernel is slow to differentiate in half
    precision: forward + backward in bf16 took 6.4 ms per call where eq. (1) written out took
    1.8 ms (32 x 4 heads x 32 positions x d_k 64; bench/train_kernels.py). Its forward is the
    faster, so only a CPU half-precision call that will be differentiated is written out.
    """
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad


def _causal_masking(
    q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, fused: bool
) -> tuple[Tensor | None, bool]:
    """The (mask, is_causal) pair that puts the decoder's causal mask where the kernel needs it.

    F.scaled_dot_product_attention's own is_causal aligns the mask top-left: right only when
    queries and keys are the same positions and there is no other mask. Otherwise (a cache, a
    key mask, the written-out eq. (1)) the causal mask is spelled out and joined to `mask`.
    """
    if not is_causal or q.size(2) == 1:
        # One query is the newest position: it sees every key, so there is nothing to mask.
        # That is incremental decoding's every step, where building the mask cost three small
        # kernels per layer and step (bench/results/h200-2026-11-27).
        return mask, False
    if fused and mask is None and q.size(2) == k.size(2):
        return None, True
    causal = causal_mask(q.size(2), k.size(2), device=q.device)
    return (causal if mask is None else mask & causal), False


class MultiHeadAttention(nn.Module):
    """§3.2.2: h heads of scaled dot-product attention over learned projections of Q, K, V.

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).
    The h projections W_i^Q (d_model x d_k) are stored side by side as one d_model x d_model
    matrix `w_q`, and likewise for K and V.

    Option (`fused_projections = True`, off by default): projections of the same input as one
    matrix product, [W^Q; W^K; W^V] (d_model x 3 d_model) for self-attention and [W^K; W^V]
    for the memory. The parameters stay the separate matrices (checkpoints and imported weights
    keep their layout); they are concatenated at each call. Measured at the base size on an
    H200 (docs/performance.md, "fused Q/K/V projection"): not faster under torch.compile, about
    1.1x eager; so the paper's separate products stay the default.
    """

    def __init__(self, d_model: int, n_heads: int, attention_dropout: float, impl: str) -> None:
        super().__init__()
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.attention_dropout, self.impl = attention_dropout, impl
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.fused_projections = False
        # Set by `recording_attention`: keep the latest attention weights (for plots).
        self.record_weights = False
        self.weights: Tensor | None = None

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, h, T, d_k)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_k).transpose(1, 2)

    def _project(self, x: Tensor, linears: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
        """x (B, T, d_model) through each of `linears`, split into heads: each (B, h, T, d_k)."""
        if not self.fused_projections or len(linears) == 1:
            return tuple(self.split_heads(linear(x)) for linear in linears)
        weight = torch.cat([linear.weight for linear in linears])  # (n * d_model, d_model)
        bias = torch.cat([linear.bias for linear in linears])
        parts = F.linear(x, weight, bias).chunk(len(linears), dim=-1)
        return tuple(self.split_heads(part) for part in parts)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, h, T, d_k) of x (B, T, d_model); cached by the incremental decoder."""
        return self._project(x, (self.w_k, self.w_v))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, h, T, d_k) of x (B, T, d_model): self-attention."""
        return self._project(x, (self.w_q, self.w_k, self.w_v))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None = None) -> Tensor:
        """Attend from x (B, T_q, d_model) to precomputed keys/values (B, h, T_k, d_k): the
        decoder's attention over the encoder's output (its keys and values are computed once
        per sentence). `mask` as in `attend`. Returns (B, T_q, d_model).
        """
        return self.attend(self.split_heads(self.w_q(x)), *kv, mask)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """MultiHead(Q, K, V) from projected queries (B, h, T_q, d_k) and keys/values
        (B, h, T_k, d_k): eq. (1) in every head, heads concatenated and projected by W^O.

        Args:
            mask: boolean, True where a query may attend to a key, broadcastable to
                (B, h, T_q, T_k): the padding mask over the keys.
            is_causal: also the decoder's mask (§3.2.3): the queries are the last T_q of the
                T_k positions, and each sees no key after its own.

        Returns:
            (B, T_q, d_model).
        """
        fused = self.impl == "sdpa" and not _slow_fused_backward(q)
        mask, is_causal = _causal_masking(q, k, mask, is_causal, fused)
        dropout_p = self.attention_dropout if self.training else 0.0
        if self.record_weights:
            self.weights = attention_weights(q, k, mask).detach()
        if not fused:
            out = scaled_dot_product_attention(q, k, v, mask, dropout_p)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        B, _, T_q, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T_q, self.n_heads * self.d_k)  # Concat(head_1..h)
        return self.w_o(out)


# --------------------------------------------------------------------------- feed-forward (§3.3)


class PositionwiseFeedForward(nn.Module):
    """Eq. (2): FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, the same at every position."""

    def __init__(self, d_model: int, d_ff: int, activation: str, activation_dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]()
        self.dropout = Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d_model) -> (B, T, d_model)."""
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


# --------------------------------------------------------------------------- embeddings (§3.4, §3.5)


class Embeddings(nn.Module):
    """§3.4: learned token embeddings; "we multiply those weights by sqrt(d_model)"."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int, scale: bool = True) -> None:
        super().__init__()
        self.lut = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d_model)."""
        return self.lut(ids) * self.scale


class SinusoidalPositionalEncoding(nn.Module):
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
        # 10000^(-2i/d_model) for i = 0 .. d_model/2 - 1: wavelengths from 2*pi to 10000*2*pi.
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_freq)  # even dimensions
        pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])  # odd dimensions
        # A buffer, not a parameter, and not saved in checkpoints: it is a function of the shape.
        # Kept in float64 (exact for a float64 model); `_embed` casts it to the activations' dtype.
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, start: int, length: int) -> Tensor:
        """Encodings of positions start .. start + length - 1: (length, d_model)."""
        return self.pe[start : start + length]

    def at(self, positions: Tensor) -> Tensor:
        """Encodings of the positions in a (n,) long tensor: (n, d_model). Reads no value on
        the host, so a CUDA graph can replay it with positions that change between replays."""
        return self.pe.index_select(0, positions)


class LearnedPositionalEmbedding(nn.Module):
    """Learned absolute positions (Table 3, row E: "nearly identical results" to sinusoids)."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, start: int, length: int) -> Tensor:
        """Embeddings of positions start .. start + length - 1: (length, d_model)."""
        positions = torch.arange(start, start + length, device=self.embedding.weight.device)
        return self.embedding(positions)

    def at(self, positions: Tensor) -> Tensor:
        """Embeddings of the positions in a (n,) long tensor: (n, d_model)."""
        return self.embedding(positions)


# --------------------------------------------------------------------------- layers (§3.1)


class SublayerConnection(nn.Module):
    """§3.1 + §5.4: the residual connection around a sub-layer, with its LayerNorm and dropout.

    post (the paper): LayerNorm(x + Dropout(Sublayer(x)))
    pre  (option):    x + Dropout(Sublayer(LayerNorm(x)))  -- trains deep stacks without warm-up
    """

    def __init__(self, d_model: int, dropout: float, norm: str, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.pre_norm = norm == "pre"

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model); `sublayer` maps (B, T, d_model) to the same."""
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """One of the N encoder layers: multi-head self-attention, then the feed-forward network."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(
            cfg.d_model, cfg.n_heads, cfg.attention_dropout, cfg.attention
        )
        self.feed_forward = PositionwiseFeedForward(
            cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout
        )
        self.sublayer = nn.ModuleList(
            SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)
            for _ in range(2)
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, S, d) with key mask (B, 1, 1, S) -> (B, S, d)."""
        x = self.sublayer[0](
            x, lambda y: self.self_attn.attend(*self.self_attn.project_qkv(y), mask)
        )
        return self.sublayer[1](x, self.feed_forward)


@dataclass
class LayerCache:
    """Keys and values one decoder layer has computed so far, each (B, h, length, d_k)."""

    self_k: Tensor | None = None  # grows by one position per decoding step
    self_v: Tensor | None = None
    cross_k: Tensor | None = None  # computed once per source, from the encoder output
    cross_v: Tensor | None = None
    # Rows per row of cross_k/cross_v. 1 here; aiayn.static_decoding's beam search keeps the
    # keys/values of each source once for its `beams` consecutive rows (see DecoderLayer).
    beams = 1

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append the new positions' keys/values (B, h, T_new, d_k); return all keys and values
        so far and a key mask (None: the causal mask alone is right)."""
        if self.self_k is not None:
            k = torch.cat([self.self_k, k], dim=2)
            v = torch.cat([self.self_v, v], dim=2)
        self.self_k, self.self_v = k, v
        return k, v, None


@dataclass
class KVCache:
    """The incremental decoder's state: one `LayerCache` per decoder layer.

    Create it with `Transformer.new_cache()`, pass it to every `decode` call, and let beam search
    reorder its rows with `reorder`.
    """

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # target positions decoded so far

    def reorder(self, index: Tensor) -> None:
        """Keep (and duplicate) batch rows: every cached tensor (B, ...) becomes tensor[index]
        (B', ...), for a long tensor `index` (B',) of rows (beam search's surviving beams)."""
        for layer in self.layers:
            for name in ("self_k", "self_v", "cross_k", "cross_v"):
                tensor = getattr(layer, name)
                if tensor is not None:
                    setattr(layer, name, tensor.index_select(0, index))


class DecoderLayer(nn.Module):
    """One of the N decoder layers: masked self-attention, encoder-decoder attention, FFN.

    Built with `cross_attention=False` it is a decoder-only (language model) layer: the same
    class, without the middle sub-layer.
    """

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = True) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(
            cfg.d_model, cfg.n_heads, cfg.attention_dropout, cfg.attention
        )
        self.cross_attn = (
            MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cfg.attention)
            if cross_attention
            else None
        )
        self.feed_forward = PositionwiseFeedForward(
            cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout
        )
        # sublayer[0] wraps the self-attention, [1] the encoder-decoder attention (if any) and
        # [-1] the feed-forward network.
        n_sublayers = 3 if cross_attention else 2
        self.sublayer = nn.ModuleList(
            SublayerConnection(cfg.d_model, cfg.dropout, cfg.norm, cfg.layer_norm_eps)
            for _ in range(n_sublayers)
        )

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        cache: LayerCache | StaticLayerCache | None = None,
    ) -> Tensor:
        """x (B, T, d) attends causally to itself, then to memory (B, S, d) under memory_mask (B, 1, 1, S).

        With a cache, x holds only the new positions; their keys/values are appended to it.
        """

        def self_attention(y: Tensor) -> Tensor:
            q, k, v = self.self_attn.project_qkv(y)
            mask = None
            if cache is not None:
                # A LayerCache grows; a preallocated one (aiayn.static_decoding) writes in place.
                k, v, mask = cache.extend(k, v)
            return self.self_attn.attend(q, k, v, mask, is_causal=True)

        def cross_attention(y: Tensor) -> Tensor:
            if cache is not None and cache.cross_k is not None:
                kv = (cache.cross_k, cache.cross_v)
            else:
                kv = self.cross_attn.project_kv(memory)
                if cache is not None:
                    cache.cross_k, cache.cross_v = kv
            if cache is not None and cache.beams > 1:
                # The cache holds each source's keys/values once for its `beams` consecutive
                # rows (a beam search's hypotheses): those rows' positions attend as positions
                # of one sequence. The same numbers, since queries attend independently, and
                # the memory is read once per source instead of once per beam.
                n, t, d = y.shape
                shared = y.reshape(n // cache.beams, cache.beams * t, d)
                return self.cross_attn(shared, kv, memory_mask).view(n, t, d)
            return self.cross_attn(y, kv, memory_mask)

        x = self.sublayer[0](x, self_attention)
        if self.cross_attn is not None:
            x = self.sublayer[1](x, cross_attention)
        return self.sublayer[-1](x, self.feed_forward)


class Encoder(nn.Module):
    """§3.1: a stack of N identical layers (plus a final LayerNorm when pre-LN)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        # Pre-LN leaves the residual stream un-normalised; post-LN already ends in a LayerNorm.
        self.norm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
            if cfg.norm == "pre"
            else nn.Identity()
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The embedded source x (B, S, d_model) with its key mask (B, 1, 1, S) (None: no
        padding) -> the memory (B, S, d_model) that every decoder layer attends to."""
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class Decoder(nn.Module):
    """§3.1: a stack of N identical decoder layers (plus a final LayerNorm when pre-LN)."""

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cross_attention) for _ in range(cfg.n_decoder_layers)
        )
        self.norm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
            if cfg.norm == "pre"
            else nn.Identity()
        )

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> Tensor:
        """The embedded target x (B, T, d_model), attending to memory (B, S, d_model) under
        memory_mask (B, 1, 1, S) -> (B, T, d_model), before the output projection. With a
        cache, x holds only the new positions (see `DecoderLayer.forward`)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, memory_mask, cache.layers[i] if cache is not None else None)
        return self.norm(x)


# --------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    """The encoder-decoder Transformer (Figure 1), or its encoder or decoder alone.

    `Transformer(cfg)(src_ids, tgt_ids)` gives logits (B, T, V_tgt). `n_decoder_layers=0` gives an
    encoder-only model (use `encode`), `n_encoder_layers=0` a decoder-only language model (use
    `decode` without memory); both use the same layer classes as the full model.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        has_encoder, has_decoder = cfg.n_encoder_layers > 0, cfg.n_decoder_layers > 0

        # Embeddings: one matrix for source and target when the vocabulary is shared (§3.4).
        def embeddings(vocab_size: int) -> Embeddings:
            return Embeddings(vocab_size, cfg.d_model, cfg.pad_id, cfg.scale_embeddings)

        self.src_embed = embeddings(cfg.src_vocab_size) if has_encoder else None
        self.tgt_embed = None
        if has_decoder:
            share = cfg.shared_vocab and has_encoder
            self.tgt_embed = self.src_embed if share else embeddings(cfg.tgt_vocab_size)
        if cfg.positions == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_len)
        else:
            self.positions = LearnedPositionalEmbedding(cfg.d_model, cfg.max_len)
        # BERT-style models normalise the embedding sum; the paper does not.
        self.embed_norm = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
            if cfg.embedding_norm
            else nn.Identity()
        )
        # §5.4: "we apply dropout to the sums of the embeddings and the positional encodings".
        self.embed_dropout = Dropout(cfg.dropout)
        self.encoder = Encoder(cfg) if has_encoder else None
        self.decoder = Decoder(cfg, cross_attention=has_encoder) if has_decoder else None
        # §3.4: "we share the same weight matrix between the two embedding layers and the
        # pre-softmax linear transformation". Tied: `generator.weight` IS the embedding matrix.
        self.generator = (
            nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
            if has_decoder
            else None
        )
        self._init_parameters()
        if has_decoder and cfg.tie_embeddings:
            self.generator.weight = self.tgt_embed.lut.weight

    def _init_parameters(self) -> None:
        """Initialisation of the reference implementations (the paper does not give one).

        Every matrix Xavier-uniform and every bias zero (as `torch.nn.Transformer` and fairseq),
        LayerNorm gain 1 and bias 0, and embeddings N(0, d_model^-0.5) (tensor2tensor, fairseq),
        so that embeddings times sqrt(d_model) have unit variance; the padding row is zero.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embed in {id(e): e for e in (self.src_embed, self.tgt_embed) if e is not None}.values():
            nn.init.normal_(embed.lut.weight, mean=0.0, std=self.cfg.d_model**-0.5)
            with torch.no_grad():
                embed.lut.weight[self.cfg.pad_id].zero_()
        if isinstance(self.positions, LearnedPositionalEmbedding):
            nn.init.normal_(self.positions.embedding.weight, mean=0.0, std=self.cfg.d_model**-0.5)

    # ------------------------------------------------------------------ helpers
    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters counted once each (tied matrices are one tensor)."""
        params = {id(p): p for p in self.parameters()}
        if not include_embeddings:
            for e in (self.src_embed, self.tgt_embed):
                if e is not None:
                    params.pop(id(e.lut.weight), None)
        return sum(p.numel() for p in params.values())

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding."""
        return KVCache(layers=[LayerCache() for _ in range(self.cfg.n_decoder_layers)])

    def _check_ids(self, ids: Tensor, vocab_size: int, name: str, start: int = 0) -> None:
        if ids.dim() != 2:
            raise DataError(
                f"{name} must be a (batch, length) tensor of token ids, got shape {tuple(ids.shape)}"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            raise DataError(f"{name} must hold integer token ids (torch.long), got {ids.dtype}")
        if start + ids.size(1) > self.cfg.max_len:
            raise DataError(
                f"{name} is {start + ids.size(1)} positions long but max_len is {self.cfg.max_len}: "
                "truncate the input or build the model with a larger max_len"
            )
        # Out-of-range ids would be a device-side assert on a GPU; check where it costs no sync
        # (on the CPU), and not inside torch.compile, where reading a value breaks the graph.
        if (
            ids.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and ids.numel()
            and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)
        ):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
            raise DataError(
                f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
            )

    def _check_memory(self, tgt_ids: Tensor, memory: Tensor, src_ids: Tensor) -> None:
        """memory (B, S, d_model), floating point, of the batch and length of src_ids (B, S);
        a batch broadcast against another would pair targets with the wrong sources."""
        if src_ids.size(0) != tgt_ids.size(0):
            raise DataError(
                f"src_ids has {src_ids.size(0)} rows but tgt_ids {tgt_ids.size(0)}: give one "
                "target row per source"
            )
        expected = (src_ids.size(0), src_ids.size(1), self.cfg.d_model)
        if not memory.is_floating_point() or memory.shape != expected:
            raise DataError(
                f"memory must be the encoder output for src_ids {tuple(src_ids.shape)}: a "
                f"float tensor of shape {expected}, got {memory.dtype} {tuple(memory.shape)}; "
                "pass encode(src_ids) with the same src_ids"
            )

    def _check_cache(self, cache: KVCache, tgt_ids: Tensor, memory: Tensor | None) -> None:
        """A cache serves one batch of sources for one search: refuse one of another model,
        another batch size or another memory length, before any layer appends to it. (Another
        memory of the same length cannot be told apart cheaply: its cross-attention keys and
        values, computed at the first step, would be reused.)"""
        if len(cache.layers) != len(self.decoder.layers):
            raise DataError(
                f"the cache has {len(cache.layers)} layers but the decoder {len(self.decoder.layers)}: "
                "make it with this model's new_cache()"
            )
        first = cache.layers[0] if cache.layers else None
        if first is None or first.self_k is None:
            return
        if first.self_k.size(0) != tgt_ids.size(0):
            raise DataError(
                f"the cache holds {first.self_k.size(0)} rows but tgt_ids has {tgt_ids.size(0)}: "
                "decode the same batch at every step (reorder the cache to change its rows)"
            )
        cross = first.cross_k
        if memory is not None and cross is not None and cross.size(2) != memory.size(1):
            raise DataError(
                f"the cache holds the keys and values of a {cross.size(2)}-position memory but "
                f"this memory has {memory.size(1)}: a cache serves one batch of sources; make "
                "a new one with new_cache()"
            )

    def _embed(self, embed: Embeddings, ids: Tensor, start: int = 0) -> Tensor:
        """Token embeddings plus positions, then dropout: (B, T) -> (B, T, d)."""
        x = embed(ids)
        return self.embed_dropout(
            self.embed_norm(x + self.positions(start, ids.size(1)).to(x.dtype))
        )

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, src_ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Encoder output ("memory") for source ids (B, S): (B, S, d_model).

        `key_mask` (B, 1, 1, S) replaces ``padding_mask(src_ids, pad_id)``: a search that pads
        sources further passes the mask of the sources it was given.
        """
        if self.encoder is None:
            raise ValueError(
                "this model has no encoder (n_encoder_layers=0); call decode() instead"
            )
        self._check_ids(src_ids, self.cfg.src_vocab_size, "src_ids")
        mask_shape = (src_ids.size(0), 1, 1, src_ids.size(1))
        if key_mask is None:
            key_mask = padding_mask(src_ids, self.cfg.pad_id)
        elif key_mask.dtype != torch.bool or key_mask.shape != mask_shape:
            # A float mask would be read as an additive bias by the fused attention, and a
            # (B, S) one broadcast over queries: both silently wrong.
            raise DataError(
                f"key_mask must be a bool tensor of shape {mask_shape} (True where a key may "
                f"be attended to), got {key_mask.dtype} {tuple(key_mask.shape)}; see padding_mask"
            )
        return self.encoder(self._embed(self.src_embed, src_ids), key_mask)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor | None = None,
        src_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Next-token logits (B, T, V_tgt) for target ids (B, T), each position seeing only its past.

        Args:
            tgt_ids: (B, T) target ids, starting with BOS. With a cache, only the new positions.
            memory: (B, S, d_model) encoder output; None for a decoder-only model.
            src_ids: (B, S) source ids, for the padding mask over memory.
            cache: a `KVCache` from `new_cache()`; when given, decoding is incremental: keys and
                values of past positions are reused and the new ones appended.
        """
        if self.decoder is None:
            raise ValueError(
                "this model has no decoder (n_decoder_layers=0); call encode() instead"
            )
        if self.encoder is not None and (memory is None or src_ids is None):
            raise ValueError(
                "an encoder-decoder model needs memory and src_ids: decode(tgt_ids, memory, src_ids)"
            )
        start = cache.length if cache is not None else 0
        self._check_ids(tgt_ids, self.cfg.tgt_vocab_size, "tgt_ids", start)
        if memory is not None:
            self._check_memory(tgt_ids, memory, src_ids)
        if isinstance(cache, KVCache):
            self._check_cache(cache, tgt_ids, memory)
        memory_mask = padding_mask(src_ids, self.cfg.pad_id) if src_ids is not None else None
        x = self.decoder(self._embed(self.tgt_embed, tgt_ids, start), memory, memory_mask, cache)
        if cache is not None:
            cache.length += tgt_ids.size(1)
        return self.generator(x)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V_tgt) for source ids (B, S) and shifted-right target ids (B, T)."""
        return self.decode(tgt_ids, self.encode(src_ids), src_ids)


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, every `MultiHeadAttention` of `model` keeps its latest attention weights.

    After a forward pass, `model.decoder.layers[i].cross_attn.weights` is (B, h, T, S): how much
    each target position attended to each source position in layer i. Costs one extra QK^T.
    """
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for m in modules:
        m.record_weights = True
    try:
        yield
    finally:
        for m in modules:
            m.record_weights = False
