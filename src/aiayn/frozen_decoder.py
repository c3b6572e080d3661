"""The decoder's weights laid out for decoding on a CPU, and one decoder step written with them.

A search asks the decoder the same small question at every step: N rows (sentences x beams),
one new position each, through every layer and the output layer. On a CPU the matrix products
of such a step are most of its time, and with N = 16 the matrix library runs them about twice
as fast on a weight stored as W^T (d_in x d_out, contiguous) as on ``nn.Linear``'s
(d_out x d_in): 1.15 against 2.38 ms for one step's products at the small size (d_model 256,
3 layers, vocabulary 8,000) in fp32 on this project's 2-core CPU. With a thousand rows, as in
training, the two layouts run at the same speed, so the model keeps the usual one and this
module keeps a second copy for decoding:

* W^T of every decoder projection, the self-attention's [W^Q; W^K; W^V] as one d x 3d matrix
  (one product instead of three), and the output layer's W^T (d x V: for a tied model a copy
  of the embedding matrix, transposed);
* the queries' projections scaled by 1/sqrt(d_k) in advance (eq. (1)'s scale), so that
  Q K^T is a plain batched product;
* a key/value cache of its own (:class:`FrozenCache`), positions first: writing a position
  is one contiguous copy, and beam search reorders only the positions written so far, in one
  gather into a second buffer (a quarter of the time of reordering the model's layout);
* the step itself (:meth:`FrozenDecoder.logits`): the arithmetic of ``DecoderLayer.forward``
  with a cache, for one query position, over exactly the t + 1 positions decoded so far (the
  cache is sliced, not masked) and the source positions under an additive mask.

It is the same function as the model's decoder (tests: logits equal to ``Transformer.decode``
with a cache, to rounding, for every decoder option of ``TransformerConfig``), used by
:class:`aiayn.static_decoding.StaticDecoding` on a CPU. The copy is "frozen": it does not see
later changes to the model's parameters. :meth:`FrozenDecoder.is_current` tells whether it
still matches them, and ``StaticDecoding`` makes a new one when it does not. Version counters
alone cannot tell: PyTorch's fused optimisers (``AdamW(fused=True)``, the Trainer's choice)
update parameters in place without incrementing them, so the check also compares a sample of
every parameter's values with the sample taken when the copy was made (see `_SAMPLE_STRIDE`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from aiayn.model import DecoderLayer, Transformer

__all__ = ["FrozenCache", "FrozenDecoder", "first_argmax", "largest_k"]

_BLOCK = 64  # columns per block in `first_argmax` and `largest_k`
# `FrozenDecoder.is_current` compares every 61st value of each copied parameter (in memory
# order) with its value at copy time. An optimiser step changes every value whose gradient or
# state is non-zero; a row of a (d_out, d_in) matrix or of the embedding is sampled at about
# d_in / 61 places (4 at d_model 256), so where d_in >= 61 changing any whole row is seen. The
# whole check takes about 1 ms at the small size (d_model 256, 3 layers, 8,000 words; most of
# it per-tensor overhead), against 3.7 ms to compare every value.
_SAMPLE_STRIDE = 61
# Samples are compared as bits (an integer type of the same width), so that NaN equals itself.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def first_argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)`` of a (N, V) tensor, the first index of the largest value: (N,) long.

    On a CPU ``argmax`` over 16 x 8,000 logits took 163 µs; this takes 63 (this project's
    CPU): the largest value of each block of 64 columns (a vectorised reduction), the first
    block that holds the row's largest, then the first largest within that block. The same
    index as ``argmax``, ties included (NaN, if any, counts as the largest, as there).
    """
    n, v = x.shape
    if v % _BLOCK or x.device.type != "cpu":
        return x.argmax(-1)
    blocks = x.view(n, v // _BLOCK, _BLOCK)
    block = blocks.amax(-1).argmax(-1)  # (N,) the first block holding the row's largest
    rows = torch.arange(n, device=x.device)
    return block * _BLOCK + blocks[rows, block].argmax(-1)


def largest_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` of a (N, V) tensor: the k largest values of each row, largest
    first, and their column indices; each (N, k).

    Beam search picks its 2K candidates among K x V scores per source: on a CPU ``topk`` over
    16 x 32,000 took 548 µs, this 171 (k = 8, this project's CPU). The k largest values lie in
    the k blocks of 64 columns with the largest maxima (a block outside them holds nothing
    above the k-th of those maxima), so ``topk`` runs over those k x 64 values only. The same
    values as ``topk``; where several columns hold equal values at the k-th place, which of
    them are returned may differ (``topk`` does not specify it either).
    """
    n, v = x.shape
    if v % _BLOCK or x.device.type != "cpu" or k > v // _BLOCK:
        return x.topk(k, dim=1)
    blocks = x.view(n, v // _BLOCK, _BLOCK)
    best = blocks.amax(-1).topk(k, dim=1).indices  # (N, k) blocks holding the k largest
    within = blocks.gather(1, best.unsqueeze(-1).expand(-1, -1, _BLOCK)).view(n, k * _BLOCK)
    values, at = within.topk(k, dim=1)
    return values, best.gather(1, at // _BLOCK) * _BLOCK + at % _BLOCK


class FrozenCache:
    """Keys and values of N rows, preallocated for L target and S source positions.

    Attributes:
        self_kv: (L, n_layers, 2, N, d_model) self-attention keys ([:, i, 0]) and values
            ([:, i, 1]) of layer i, heads side by side; positions first, so that positions
            0 .. t are one contiguous block.
        cross_k: (n_layers, N, h, d_k, S) keys of the encoder output, transposed (written once,
            read at every step).
        cross_v: (n_layers, N, h, S, d_k) its values.
        cross_bias: (N h, 1, S) 0 where a source position may be attended to, -inf at padding.
        logits: (N, V) the output of the latest step (see :meth:`FrozenDecoder.logits`).
        position: a 0-d long tensor, the position the next step decodes (the search's clock).
    """

    def __init__(self, decoder: FrozenDecoder, rows: int, positions: int, src_len: int) -> None:
        n_layers, h, d_k = len(decoder.layers), decoder.n_heads, decoder.d_k
        kw = dict(dtype=decoder.dtype, device=decoder.device)
        # Empty, not zeros: a step reads only the positions written before it, and `load`
        # writes all of the rest. (Zeroing a beam search's cache costs more than a short
        # search: 250 MB at 64 sentences x 4 beams, 3 layers, 80 positions, d_model 256.)
        self.self_kv = torch.empty(positions, n_layers, 2, rows, h * d_k, **kw)
        self._spare: Tensor | None = None  # where `reorder` gathers into (beam search only)
        self.cross_k = torch.empty(n_layers, rows, h, d_k, src_len, **kw)
        self.cross_v = torch.empty(n_layers, rows, h, src_len, d_k, **kw)
        self.cross_bias = torch.empty(rows * h, 1, src_len, **kw)
        self.logits = torch.empty(rows, decoder.out_weight.size(1), **kw)  # each step's output
        self.position = torch.zeros((), dtype=torch.long, device=decoder.device)
        self.rows, self.n_heads = rows, h

    def load(self, model: Transformer, memory: Tensor, memory_mask: Tensor, repeat: int) -> None:
        """Project the encoder output (B, S, d) of every decoder layer into keys and values,
        each source repeated for its ``repeat`` rows, and set the padding mask (B, 1, 1, S)."""
        for i, layer in enumerate(model.decoder.layers):
            k, v = layer.cross_attn.project_kv(memory)  # (B, h, S, d_k)
            self.cross_k[i].copy_(k.transpose(-1, -2).repeat_interleave(repeat, dim=0))
            self.cross_v[i].copy_(v.repeat_interleave(repeat, dim=0))
        keep = memory_mask.repeat_interleave(repeat, dim=0)  # (N, 1, 1, S)
        keep = keep.expand(-1, self.n_heads, -1, -1).reshape(self.rows * self.n_heads, 1, -1)
        self.cross_bias.zero_().masked_fill_(~keep, float("-inf"))

    def reorder(self, rows: Tensor) -> None:
        """Row i of the self-attention cache becomes row ``rows[i]``, in place (beam search),
        for the positions written so far: 0 .. position (the search reorders after the step
        that wrote ``position``, before it advances). Cross-attention keys and values stay:
        beams are only reordered within a source."""
        written = int(self.position) + 1
        if self._spare is None:
            self._spare = torch.empty_like(self.self_kv)
        torch.index_select(self.self_kv[:written], 3, rows, out=self._spare[:written])
        self.self_kv, self._spare = self._spare, self.self_kv

    def write(self, layer: int, t: int, keys_values: Tensor) -> None:
        """Store layer ``layer``'s keys and values (N, 2, d_model) of position t."""
        self.self_kv[t, layer].copy_(keys_values.transpose(0, 1))

    def read(self, layer: int, t: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s keys and values of positions 0 .. t, each (N h, t + 1, d_k)."""
        kv = self.self_kv[: t + 1, layer]  # (t + 1, 2, N, d_model)
        d_k = kv.size(-1) // self.n_heads
        heads = kv.view(t + 1, 2, self.rows * self.n_heads, d_k).permute(1, 2, 0, 3)
        return heads[0], heads[1]


class _FrozenLayer:
    """One decoder layer's weights, transposed for ``torch.addmm(bias, x, weight)``."""

    def __init__(self, layer: DecoderLayer) -> None:
        self_attn, cross, ffn = layer.self_attn, layer.cross_attn, layer.feed_forward
        d_model = self_attn.w_q.weight.size(1)
        scale = 1.0 / math.sqrt(self_attn.d_k)

        self.sources: list[Tensor] = []  # the parameters whose values are copied here

        def transposed(*linears: nn.Linear) -> tuple[Tensor, Tensor]:
            self.sources += [t for linear in linears for t in (linear.weight, linear.bias)]
            weight = torch.cat([linear.weight.detach() for linear in linears])
            bias = torch.cat([linear.bias.detach() for linear in linears])
            return weight.t().contiguous(), bias

        def scaled_queries(weight_bias: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            """The first d_model outputs (the queries) times 1/sqrt(d_k)."""
            weight, bias = weight_bias
            weight[:, :d_model] *= scale
            bias[:d_model] *= scale
            return weight, bias

        # (d, 3d) and (3d,): [W^Q / sqrt(d_k); W^K; W^V] transposed, and their biases.
        self.qkv = scaled_queries(transposed(self_attn.w_q, self_attn.w_k, self_attn.w_v))
        self.self_out = transposed(self_attn.w_o)
        self.cross_q = scaled_queries(transposed(cross.w_q))
        self.cross_out = transposed(cross.w_o)
        self.ffn_in = transposed(ffn.w_1)
        self.ffn_out = transposed(ffn.w_2)
        # ReLU (the paper's) in place on the new (N, d_ff) tensor; GELU or SiLU as the module.
        self.activation = torch.relu_ if isinstance(ffn.activation, nn.ReLU) else ffn.activation
        # The LayerNorms' parameters, not copied: (normalized_shape, weight, bias, eps).
        self.norms = [
            (norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            for norm in (sublayer.norm for sublayer in layer.sublayer)
        ]


def _linear(x: Tensor, weight_bias: tuple[Tensor, Tensor]) -> Tensor:
    """x (N, d_in) W + b with W stored (d_in, d_out): (N, d_out)."""
    weight, bias = weight_bias
    return torch.addmm(bias, x, weight)


class FrozenDecoder:
    """A decoding copy of an encoder-decoder model's decoder and output layer (see the module
    docstring). Make it from a model in eval mode; it does not follow later changes to the
    model's parameters (check :meth:`is_current`).

    Args:
        model: an encoder-decoder :class:`~aiayn.model.Transformer`.
    """

    def __init__(self, model: Transformer) -> None:
        cfg = model.cfg
        self.model = model
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.d_k = cfg.d_model // cfg.n_heads
        self.pre_norm = cfg.norm == "pre"
        weight = model.generator.weight
        self.dtype, self.device = weight.dtype, weight.device
        with torch.no_grad():
            self.layers = [_FrozenLayer(layer) for layer in model.decoder.layers]
            self.out_weight = weight.detach().t().contiguous()  # (d, V)
            bias = model.generator.bias
            self.out_bias = bias.detach().clone() if bias is not None else None  # (V,)
            positions = model.positions
            # Every position's encoding in the model's dtype, as `Transformer._embed` adds it.
            table = positions.pe if hasattr(positions, "pe") else positions.embedding.weight
            self.positions = table.detach().to(self.dtype).clone()  # (max_len, d)
        self.embeddings = model.tgt_embed.lut.weight  # (V, d), read in place
        self.embed_scale = model.tgt_embed.scale
        self.embed_norm = model.embed_norm
        self.final_norm = model.decoder.norm
        # Parameters whose values are copied above (the rest are read in place, current).
        learned = positions.embedding.weight if hasattr(positions, "embedding") else None
        self._copied = [t for layer in self.layers for t in layer.sources] + [
            t for t in (weight, bias, learned) if t is not None
        ]
        self._versions = self._parameter_versions()
        self._samples = [sample.clone() for sample in self._copied_samples()]

    def _parameter_versions(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for p in self.model.parameters()]

    def _copied_samples(self) -> list[Tensor]:
        """Every `_SAMPLE_STRIDE`-th value of each copied parameter, as its bits (views): a NaN
        equals itself, so a model with one is not remade at every call."""
        return [
            t.detach().reshape(-1)[::_SAMPLE_STRIDE].view(_BITS[t.element_size()])
            for t in self._copied
        ]

    def is_current(self) -> bool:
        """False once any of the model's parameters has been replaced, changed in place as
        PyTorch records it (its version counter), or changed at a sampled value (what a fused
        optimiser's step, which PyTorch does not record, is seen by)."""
        if self._parameter_versions() != self._versions:
            return False
        now = self._copied_samples()
        return all(torch.equal(a, b) for a, b in zip(now, self._samples, strict=True))

    def new_cache(self, rows: int, positions: int, src_len: int) -> FrozenCache:
        """An empty cache for ``rows`` rows, ``positions`` target and ``src_len`` source positions."""
        return FrozenCache(self, rows, positions, src_len)

    def output_bias_banning(self, ids: Tensor) -> Tensor:
        """The output layer's bias (V,) (zeros if it has none) with -inf at ``ids``."""
        vocab = self.out_weight.size(1)
        bias = self.out_bias if self.out_bias is not None else self.out_weight.new_zeros(vocab)
        return bias.clone().index_fill_(0, ids, float("-inf"))

    def logits(self, tokens: Tensor, cache: FrozenCache, bias: Tensor | None = None) -> Tensor:
        """Next-token logits (N, V) for the tokens (N,) fed at position ``cache.position``.

        Writes their keys and values into the cache; the caller advances the position.
        ``bias`` (V,) replaces the output layer's bias (e.g. with -inf at banned ids). The
        result is ``cache.logits``, a buffer that the next call overwrites: a fresh (N, V)
        tensor per step costs a CPU more than the rest of the output layer's elementwise work
        (new pages from the system, each one faulted in).
        """
        t = int(cache.position)
        n, d, h, d_k = tokens.size(0), self.d_model, self.n_heads, self.d_k
        x = self.embeddings.index_select(0, tokens).mul_(self.embed_scale).add_(self.positions[t])
        x = self.embed_norm(x)  # (N, d)
        for i, layer in enumerate(self.layers):
            # Masked self-attention over positions 0 .. t.
            y = F.layer_norm(x, *layer.norms[0]) if self.pre_norm else x
            qkv = _linear(y, layer.qkv)  # (N, 3d): queries already divided by sqrt(d_k)
            q = qkv[:, :d].reshape(n * h, 1, d_k)
            cache.write(i, t, qkv[:, d:].view(n, 2, d))
            keys, values = cache.read(i, t)  # each (N h, t + 1, d_k)
            scores = torch.bmm(q, keys.transpose(1, 2))  # (N h, 1, t + 1)
            x = self._residual(
                x, _linear(self._attend(scores, values, n), layer.self_out), layer, 0
            )
            # Attention over the encoder output.
            y = F.layer_norm(x, *layer.norms[1]) if self.pre_norm else x
            q = _linear(y, layer.cross_q).view(n * h, 1, d_k)
            keys = cache.cross_k[i].view(n * h, d_k, -1)
            values = cache.cross_v[i].view(n * h, -1, d_k)
            scores = torch.baddbmm(cache.cross_bias, q, keys)  # (N h, 1, S)
            x = self._residual(
                x, _linear(self._attend(scores, values, n), layer.cross_out), layer, 1
            )
            # Position-wise feed-forward.
            y = F.layer_norm(x, *layer.norms[2]) if self.pre_norm else x
            y = _linear(layer.activation(_linear(y, layer.ffn_in)), layer.ffn_out)
            x = self._residual(x, y, layer, 2)
        x = self.final_norm(x)
        bias = self.out_bias if bias is None else bias
        if bias is None:
            return torch.mm(x, self.out_weight, out=cache.logits)
        return torch.addmm(bias, x, self.out_weight, out=cache.logits)

    def _attend(self, scores: Tensor, values: Tensor, n: int) -> Tensor:
        """softmax(scores) V, heads concatenated: scores (N h, 1, T), values (N h, T, d_k) ->
        (N, d). Half-precision scores take their softmax in float32, as the fused kernel does."""
        if scores.dtype in (torch.float16, torch.bfloat16):
            weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
        else:
            weights = scores.softmax(-1)
        return torch.bmm(weights, values).view(n, self.d_model)

    def _residual(self, x: Tensor, y: Tensor, layer: _FrozenLayer, k: int) -> Tensor:
        """The residual connection around sub-layer k, whose output on x is y (§3.1)."""
        if self.pre_norm:
            return x + y
        return F.layer_norm(y.add_(x), *layer.norms[k])
