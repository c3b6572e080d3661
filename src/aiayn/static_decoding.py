"""Greedy and beam search with every shape fixed in advance: one CUDA graph launch per step.

:mod:`aiayn.decoding` holds the reference searches. They are written for reading: the model
sits behind a three-method protocol, finished rows are dropped from the batch, and the host
decides what happens to every hypothesis. On a GPU that costs more than the arithmetic: one
decoder step of the base model is ~150 small kernels, and launching them from Python takes
longer than running them (about 4 ms per step at 64 sentences on an H100, with the GPU mostly
idle). This module does the same searches, with the same results, in a form the GPU can run on
its own:

* **A preallocated key/value cache** (:class:`StaticKVCache`): room for every position from
  the start; step t writes position t in place (``index_copy_`` with t held in a device
  tensor) and attends under a key mask (key j visible iff j <= t) over a window of the cache:
  the first 16, 32, 64, ... positions, the smallest that holds 0 .. t, so that a short
  output does not pay for the room a long one would need, while the shapes stay a few fixed
  ones. Cross-attention keys and values are projected once per batch. Beam search's cache is
  double-buffered: each step gathers the surviving beams' rows (of its window) into the
  other buffer, one pass instead of a gather and a copy back.
* **The search's bookkeeping on the device**: scores, token histories, finished hypotheses and
  a done flag per source are tensors updated in place; a source that is done stays in the
  batch, frozen, instead of being dropped.
* **CUDA graphs**: the whole step (decoder, log-softmax, banned tokens, top-k, finishing
  hypotheses, reordering the cache) is captured once per shape, window and buffer, the first
  time a search reaches them (that step runs eagerly), and every later step is one launch.
  The host reads the done flags every ``check_every`` steps to stop early.

On a CPU the same step runs eagerly (there are no graphs to replay), and its decoder part is
:class:`aiayn.frozen_decoder.FrozenDecoder`: the decoder's weights copied once in the layout
the CPU's matrix library is fastest with, and one step written with them (greedy search 1.5x
the reference search on the small benchmark model; docs/performance.md). A CPU also gains
nothing from fixed shapes elsewhere: the batch is not rounded up, the encoder skips padding
(:mod:`aiayn.packed_encoder`), and the searches keep their bookkeeping in Python lists.

Both kinds of step are tested against the reference searches, which stay the definition of
what the search does: their docstrings (and the module docstring of :mod:`aiayn.decoding`)
give the length penalty, the stopping rule and the length limits, all of which hold here
unchanged. What differs: n-gram blocking is not available here (use the reference searches),
and outputs may differ from the reference's where two candidates tie to within rounding
(attention sums over a padded cache are grouped differently).

Graphs are kept per shape (batch rounded up to a multiple of 8 on a GPU, source length to a
multiple of 8, output length limit), a few at a time: decoding a file in length-sorted batches
reuses them. Padding rows and positions are masked, so they change no result (a source made
only of padding keeps the mask of its own length, as the reference search sees it). Each kept
shape holds its cache, rows x layers x 2 x L x d_model numbers (64 sentences x beam 4, 6
layers, L = 98, d_model 512 in bf16: 308 MB; beam search two of them, where reordering one
in place took a temporary of the same size), and its graphs' memory pool; `translate_ids` keeps one
`StaticDecoding` on the model (`aiayn.decoding.static_decoding_of`), and validation during
training drops it afterwards (`release_static_decoding`) so that training gets the memory back.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from aiayn.decoding import (
    Hypothesis,
    _banned_ids,
    _check_inputs,
    _check_n_best,
    _check_on_model_device,
    _check_pad_id,
    length_penalty_factor,
    max_output_lengths,
)
from aiayn.errors import ConfigError
from aiayn.frozen_decoder import FrozenCache, FrozenDecoder, first_argmax, largest_k
from aiayn.model import padding_mask
from aiayn.packed_encoder import packed_encode

if TYPE_CHECKING:
    from aiayn.model import Transformer

__all__ = ["StaticDecoding", "StaticKVCache", "StaticLayerCache"]

_ROUND = 8  # batch rows and source positions are rounded up to a multiple of this
_MAX_PLANS = 4  # captured shapes kept per model (each holds its cache and graphs)
_FIRST_WINDOW = 16  # the smallest window of positions a step attends over (see `_windows`)


def _round_up(n: int, multiple: int = _ROUND) -> int:
    return multiple * math.ceil(n / multiple)


def _cuda_graph(step: Callable[[], None], pool: tuple | None) -> torch.cuda.CUDAGraph:
    """``step`` captured as a CUDA graph, recorded and not run, in the memory pool ``pool``
    (None: a new one, ``graph.pool()``)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def _windows(positions: int) -> list[int]:
    """The windows of self-attention positions the steps of a search over ``positions``
    positions use: 16, 32, 64, ... below ``positions``, then ``positions`` itself. Step t
    attends over (and beam search reorders) the smallest window that holds positions 0 .. t,
    not the whole cache: with the default limits (a 25-token output in room for 98) most steps
    touch a quarter of it. Each window is one more CUDA graph."""
    windows, window = [], _FIRST_WINDOW
    while window < positions:
        windows.append(window)
        window *= 2
    return windows + [positions]


class StaticLayerCache:
    """One decoder layer's keys and values, preallocated for every position.

    Attributes:
        self_k, self_v: (N, h, L, d_k) self-attention keys/values of positions 0 .. L-1.
        cross_k, cross_v: (N / beams, h, S, d_k) cross-attention keys/values of the encoder
            output, one row per source, shared by its ``beams`` consecutive rows.
        position: a 0-d long tensor shared by all layers: the position being decoded.
        key_mask: (1, 1, 1, W) boolean, True for positions 0 .. position of the step's window
            of W <= L positions (both set each step).
    """

    def __init__(
        self, self_k: Tensor, self_v: Tensor, cross_kv: Tensor, position: Tensor, beams: int
    ) -> None:
        self.self_k, self.self_v = self_k, self_v
        self.cross_k, self.cross_v = cross_kv[0], cross_kv[1]
        self.position, self.beams = position, beams
        self.key_mask: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write the new position's keys/values (N, h, 1, d_k) at ``position``; return the
        cache's window (N, h, W, d_k) and the mask of the positions written so far in it."""
        index = self.position.view(1)
        self.self_k.index_copy_(2, index, k)
        self.self_v.index_copy_(2, index, v)
        window = self.key_mask.size(-1) if self.key_mask is not None else self.self_k.size(2)
        return self.self_k[:, :, :window], self.self_v[:, :, :window], self.key_mask


class StaticKVCache:
    """The decoder's state for N rows and up to L positions, every tensor allocated once.

    Args:
        model: the encoder-decoder model whose decoder it serves.
        rows: N, the batch rows (sources x beams).
        positions: L, the most target positions (bos included) the search will feed.
        src_len: S, the source positions of the encoder output.
        reorders: whether the search reorders rows (beam search). Its self-attention cache is
            then double-buffered: each reorder gathers the rows from the current buffer into
            the other, which becomes current (``parity``), one pass over the cache instead of
            gathering into a temporary and copying back (on an H200, 75 against 150 µs per
            step at 256 rows, 6 layers, 48 positions; bench/decode_kernels.py).
        beams: rows per source (beam search's K; a divisor of ``rows``). The cross-attention
            keys and values are kept once per source and shared by its rows, which attend
            together (`DecoderLayer.forward`): K times less memory to keep and to read per
            step. On an H200 a cross-attention call of beam search over K copies took 29 µs,
            greedy search's, as many (source, head) pairs as a shared call, 10 µs
            (bench/results/h200-2026-11-27, run 2's profiles); not measured end to end yet.
    """

    # Beam search's cache double-buffered (see above). False keeps one buffer, reordered by a
    # gather and a copy back: the "before" row of bench/decode_throughput.py on a GPU.
    double_buffered = True
    # The memory's keys/values shared by a source's beams (see above). False keeps a copy per
    # row: the "before" row `aiayn-static-repeated-memory` of bench/decode_throughput.py.
    shares_memory = True

    def __init__(
        self,
        model: Transformer,
        rows: int,
        positions: int,
        src_len: int,
        reorders: bool = False,
        beams: int = 1,
    ) -> None:
        cfg = model.cfg
        param = model.generator.weight
        h, d_k = cfg.n_heads, cfg.d_model // cfg.n_heads
        n_layers = cfg.n_decoder_layers
        kw = dict(dtype=param.dtype, device=param.device)
        # Zeros, not empty: masked positions still enter the attention product (times 0).
        # Rows first: reordering the beams then copies whole contiguous rows (on an H200 half
        # the time of selecting rows along an inner dimension; bench/decode_kernels.py).
        shape = (rows, n_layers, 2, h, positions, d_k)
        buffers = 2 if reorders and self.double_buffered else 1
        self._buffers = [torch.zeros(shape, **kw) for _ in range(buffers)]
        self.parity = 0  # which buffer is current; a CUDA graph is captured for each
        # (C,): the pieces of a row, one per (layer, key or value, head), for `reorder`.
        self._pieces = torch.arange(n_layers * 2 * h, device=param.device)
        self.window = positions  # the positions the next step uses (set per step, `_windows`)
        self.beams = beams if self.shares_memory else 1
        sources = rows // self.beams
        self.cross_kv = torch.zeros(n_layers, 2, sources, h, src_len, d_k, **kw)
        self.memory_mask = torch.ones(sources, 1, 1, src_len, dtype=torch.bool, device=param.device)
        self.position = torch.zeros((), dtype=torch.long, device=param.device)
        self.key_range = torch.arange(positions, device=param.device)
        self._layers = [
            [
                StaticLayerCache(
                    kv[:, i, 0], kv[:, i, 1], self.cross_kv[i], self.position, self.beams
                )
                for i in range(n_layers)
            ]
            for kv in self._buffers
        ]

    @property
    def self_kv(self) -> Tensor:
        """(N, n_layers, 2, h, L, d_k): the current self-attention keys and values."""
        return self._buffers[self.parity]

    @property
    def layers(self) -> list[StaticLayerCache]:
        """Each decoder layer's view of the current buffer (what ``Decoder.forward`` reads)."""
        return self._layers[self.parity]

    def load(self, model: Transformer, memory: Tensor, memory_mask: Tensor, repeat: int) -> None:
        """Project the encoder output (B, S, d) of every decoder layer into keys and values
        and set the padding mask (B, 1, 1, S), for sources of ``repeat`` rows each (kept
        once per source where the rows share them, else repeated for every row)."""
        copies = repeat // self.beams
        for i, layer in enumerate(model.decoder.layers):
            k, v = layer.cross_attn.project_kv(memory)  # (B, h, S, d_k)
            self.cross_kv[i, 0].copy_(k.repeat_interleave(copies, dim=0))
            self.cross_kv[i, 1].copy_(v.repeat_interleave(copies, dim=0))
        self.memory_mask.copy_(memory_mask.repeat_interleave(copies, dim=0))

    def begin_step(self) -> None:
        """Set the key mask of the step's window for the current position (device-side: no
        host read); its length is the window the layers attend over."""
        mask = (self.key_range[: self.window] <= self.position).view(1, 1, 1, -1)
        for layer in self.layers:
            layer.key_mask = mask

    def reorder(self, rows: Tensor) -> None:
        """Row i of the self-attention cache becomes row ``rows[i]``, for the positions of the
        step's window (the later ones are written before they are read). Double-buffered, the
        rows are gathered into the other buffer, which becomes current (the parity flips);
        otherwise in place. Cross-attention keys and values are not touched: the search only
        reorders beams within a source."""
        source = self._window_rows(self.self_kv)
        index = self._window_index(rows)
        if len(self._buffers) == 1:
            source.copy_(source.index_select(0, index))
            return
        torch.index_select(source, 0, index, out=self._window_rows(self._buffers[1 - self.parity]))
        self.parity = 1 - self.parity

    def _window_rows(self, kv: Tensor) -> Tensor:
        """The step's window of a (N, n_layers, 2, h, L, d_k) buffer as rows to gather, each
        a contiguous piece of memory: (N, everything) for the whole cache; for a window, one
        row per (row, layer, key or value, head), (N * C, W * d_k). A gather of contiguous
        rows runs PyTorch's vectorised kernel on a GPU; a window's rows taken whole are not
        contiguous (C pieces each), and PyTorch's CUDA gather then falls back to an
        element-by-element kernel: a beam batch's profile on an H200 had 32 calls of it at
        120 µs, one per step in the windows of 16 and 32 of 49 positions, where gathering the
        whole cache takes about 75 (bench/results/h200-2026-11-27/run2/profile_static_beam.txt,
        bench/results/h200-2026-11-26/decode_kernels.txt)."""
        rows, positions, d_k = kv.size(0), kv.size(-2), kv.size(-1)
        if self.window == positions:
            return kv.view(rows, -1)
        return kv.view(-1, positions * d_k)[:, : self.window * d_k]

    def _window_index(self, rows: Tensor) -> Tensor:
        """`rows` (N,) as the index of `_window_rows`' rows: (N,), or (N * C,) for a window."""
        if self.window == self.self_kv.size(-2):
            return rows
        pieces = self._pieces
        return (rows.view(-1, 1) * pieces.numel() + pieces).view(-1)


@dataclass
class _Search:
    """The fixed-shape state of one search, updated in place by each step."""

    cache: StaticKVCache | FrozenCache
    last: Tensor  # (N,) the token fed at this step
    limits: Tensor  # (B,) output limit of each source
    min_lens: Tensor  # (B,) eos banned while the step is below this
    done: Tensor  # (B,) bool
    # Greedy: the outputs so far. Beam: the live beams' histories, in two buffers where the
    # cache has two (reordered like its rows: gathered into the other one, see `history`).
    histories: list[Tensor]  # each (N, L) long
    lengths: Tensor | None = None  # greedy: (B,) tokens emitted
    scores: Tensor | None = None  # beam: (B, K) cumulative log-probabilities
    fin_tokens: Tensor | None = None  # beam: (B, K, L) finished hypotheses' tokens
    fin_len: Tensor | None = None  # beam: (B, K) their lengths
    fin_logp: Tensor | None = None  # beam: (B, K) their log-probabilities
    n_fin: Tensor | None = None  # beam: (B,) finished so far

    @property
    def history(self) -> Tensor:
        """(N, L) long: the current histories, those of the cache's current buffer (as many
        buffers as the cache has; a `FrozenCache` has no parity and one history buffer: it
        reorders its own buffers on the host)."""
        return self.histories[getattr(self.cache, "parity", 0)]


@dataclass
class _HostSearch:
    """A search's bookkeeping in Python lists, for a CPU (the frozen decoder's plans).

    On a CPU each PyTorch call costs microseconds whatever its size: the tensor version of
    this bookkeeping (in `_Plan.greedy_step` and `beam_step`, which a CUDA graph replays) is
    about 20 calls per greedy step on (B,) tensors, 200 µs, and about 40 per beam step; a
    Python loop over 16 rows does greedy's in about 15 µs.
    """

    done: list[bool]  # per source
    limits: list[int]  # output limit of each source
    min_lens: list[int]  # eos banned while the step is below this
    t: int = 0  # the position the next step decodes


@dataclass
class _HostGreedy(_HostSearch):
    outputs: list[list[int]] = field(default_factory=list)  # each source's tokens so far


@dataclass
class _HostBeam(_HostSearch):
    # Per source: its finished hypotheses as (tokens, log-prob), in finishing order.
    finished: list[list[tuple[list[int], float]]] = field(default_factory=list)


class _Plan:
    """Buffers, step and (on CUDA) graphs for one shape: B sources x K beams, S, L.

    With ``frozen`` (on a CPU) the decoder step is :meth:`FrozenDecoder.logits` over a
    :class:`FrozenCache`; otherwise the model's own decoder over a :class:`StaticKVCache`.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        batch: int,
        beam: int,
        src_len: int,
        positions: int,
        ids: tuple[int, int, int],
        use_graph: bool,
        frozen: FrozenDecoder | None = None,
    ) -> None:
        self.model, self.batch, self.beam, self.frozen = model, batch, beam, frozen
        self.bos_id, self.eos_id, self.pad_id = ids
        device = model.generator.weight.device
        rows = batch * beam
        vocab = model.cfg.tgt_vocab_size
        score_dtype = torch.promote_types(model.generator.weight.dtype, torch.float32)
        self.banned = _banned_ids(
            bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, device=device
        )
        self.not_eos = torch.arange(vocab, device=device).ne(self.eos_id)  # (V,)
        # (1, C): the first of a beam's C candidates (see `_candidates`).
        self.first_column = torch.arange(min(2 * beam, vocab), device=device).eq(0).view(1, -1)
        self.row_base = torch.arange(batch, device=device) * beam  # (B,) first row of each source
        self.slots = torch.arange(beam, device=device)
        long = dict(dtype=torch.long, device=device)
        if frozen is not None:
            cache = frozen.new_cache(rows, positions, src_len)
            # Greedy search needs only the largest logit, so the banned ids can be -inf in the
            # output layer's bias: no log-softmax, no separate masking.
            self.ban_bias = frozen.output_bias_banning(self.banned)
            self.scratch: Tensor | None = None  # beam search's (N, V) work space, made once
        else:
            cache = StaticKVCache(model, rows, positions, src_len, reorders=beam > 1, beams=beam)
        # The windows of positions the steps use (the frozen decoder slices its cache exactly).
        self.windows = _windows(positions) if frozen is None else [positions]
        self.state = _Search(
            cache=cache,
            last=torch.zeros(rows, **long),
            limits=torch.zeros(batch, **long),
            min_lens=torch.zeros(batch, **long),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            histories=[
                torch.zeros(rows, positions, **long)
                for _ in range(len(cache._buffers) if frozen is None else 1)
            ],
        )
        # On a CPU both searches keep their bookkeeping on the host (set by `load`).
        self.host: _HostSearch | None = None
        if beam == 1:
            self.state.lengths = torch.zeros(batch, **long)
        else:
            self.state.scores = torch.zeros(batch, beam, dtype=score_dtype, device=device)
            self.state.fin_tokens = torch.zeros(batch, beam, positions, **long)
            self.state.fin_len = torch.zeros(batch, beam, **long)
            self.state.fin_logp = torch.zeros(batch, beam, dtype=score_dtype, device=device)
            self.state.n_fin = torch.zeros(batch, **long)
        # CUDA graphs keyed by (window, parity), each captured at its first use (see `step`).
        self.use_graph = use_graph
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None  # the graphs' one memory pool, made with the first

    # ----------------------------------------------------------------- one step, in place
    def logits(self) -> Tensor:
        """The decoder on ``last`` at the cache's position: (N, V) logits, a new tensor that
        the step may change in place. (The model's own modules; a plan with a frozen decoder
        computes what it needs of this in `_host_greedy_step` and `_frozen_candidates`.)"""
        model, s = self.model, self.state
        cache = s.cache
        cache.begin_step()
        x = model.tgt_embed(s.last.view(-1, 1))  # (N, 1, d)
        x = x + model.positions.at(cache.position.view(1)).to(x.dtype)
        x = model.embed_dropout(model.embed_norm(x))
        x = model.decoder(x, None, cache.memory_mask, cache)  # (N, 1, d)
        return model.generator(x[:, 0])  # (N, V)

    def _ban(self, scores: Tensor, below_min: Tensor) -> Tensor:
        """The banned ids, and eos in the rows below their minimum length (``below_min``,
        (N,) bool), at -inf in ``scores`` (N, V), in place: a few columns written, not a pass
        over the whole (N, V) tensor."""
        scores.index_fill_(-1, self.banned, float("-inf"))
        scores.select(-1, self.eos_id).masked_fill_(below_min, float("-inf"))
        return scores

    def _candidates(self, log_probs: Tensor, at_limit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`decoding.beam_step`'s candidates from (N, V) log-probabilities (bans applied), for
        sources at their length limit (``at_limit``, (B,)) eos alone: (scores, beams, tokens),
        each (B, C), C = min(2K, K * V), best first.

        In two top-k's: each beam's C best tokens first (a source's C best extensions are
        among its beams' C best, since a beam's score is added to all of its tokens alike),
        then the C best of the K * C. The one top-k over K * V per source that this replaces
        took about 145 of a graphed beam step's 1,350 µs on an H200 (64 sentences x beam 4,
        V = 37,000; bench/results/h200-2026-11-27/run2/); with two, the search ran 1.04x
        faster (run3/)."""
        s, B, K = self.state, self.batch, self.beam
        vocab = log_probs.size(-1)
        per_source = min(2 * K, K * vocab)
        per_beam = min(per_source, vocab)
        best, tokens = log_probs.topk(per_beam, dim=1)  # (N, per_beam)
        # A source at its limit may only end: its beams' one candidate each is eos (at -inf
        # if also below the minimum length), every other candidate -inf.
        limited = at_limit.view(B, 1).expand(B, K).reshape(-1, 1)  # (N, 1)
        eos = log_probs[:, self.eos_id : self.eos_id + 1]  # (N, 1)
        only_eos = torch.where(self.first_column, eos, -math.inf)  # (N, per_beam)
        best = torch.where(limited, only_eos, best)
        tokens = torch.where(limited & self.first_column, self.eos_id, tokens)
        total = (best + s.scores.view(-1, 1)).view(B, K * per_beam)
        cand_scores, flat = total.topk(per_source, dim=1)  # (B, C)
        cand_tokens = tokens.view(B, K * per_beam).gather(1, flat)
        return cand_scores, flat // per_beam, cand_tokens

    def greedy_step(self) -> None:
        if isinstance(self.host, _HostGreedy):
            return self._host_greedy_step()
        s = self.state
        t = s.cache.position
        # The largest logit is the largest log-probability: no log-softmax needed.
        logits = self._ban(self.logits(), t < s.min_lens)
        token = logits.argmax(dim=-1)  # (B,)
        emit = ~s.done & token.ne(self.eos_id)
        # Every live row emits one token per step, so a row's next output goes to column t.
        s.history.index_copy_(1, t.view(1), torch.where(emit, token, 0).view(-1, 1))
        s.lengths.add_(emit)
        s.done.logical_or_(token.eq(self.eos_id)).logical_or_(s.lengths >= s.limits)
        s.last.copy_(token)
        t.add_(1)

    def _host_greedy_step(self) -> None:
        """`greedy_step` with the frozen decoder, its bookkeeping in `self.host`."""
        s, host = self.state, self.host
        assert isinstance(host, _HostGreedy) and self.frozen is not None
        # The same choice as `greedy_step`'s: the largest logit is the largest log-probability.
        logits = self.frozen.logits(s.last, s.cache, self.ban_bias)  # (B, V)
        below_min = [row for row, m in enumerate(host.min_lens) if host.t < m]
        if below_min:
            logits[below_min, self.eos_id] = float("-inf")
        token = first_argmax(logits)  # (B,)
        s.last.copy_(token)
        for row, tok in enumerate(token.tolist()):
            if host.done[row]:
                continue
            if tok == self.eos_id:
                host.done[row] = True
                continue
            host.outputs[row].append(tok)
            host.done[row] = len(host.outputs[row]) >= host.limits[row]
        host.t += 1
        s.cache.position.add_(1)

    def finished(self) -> bool:
        """Whether every source is done (on a GPU this waits for the device)."""
        if self.host is not None:
            return all(self.host.done)
        return bool(self.state.done.all())

    def _frozen_candidates(self, host: _HostBeam) -> tuple[list[list[float]], list[list[int]]]:
        """What `beam_step` computes up to its candidates, in place on one (N, V) tensor (on a
        CPU each pass over it costs about as much as the decoder layers' products): score +
        log p = logits + (score - logsumexp(logits)), bans as columns, the eos and at-limit
        bans only for the rows that need them. Returns the candidates' scores and their
        indices into each source's K x V scores, as lists (B, 2K)."""
        s, B, K = self.state, self.batch, self.beam
        logits = self.frozen.logits(s.last, s.cache)  # (N, V)
        vocab = logits.size(-1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.scratch is None:
            self.scratch = torch.empty_like(logits)
        # logsumexp, with the (N, V) intermediate in the scratch buffer instead of a new tensor.
        largest = logits.amax(-1, keepdim=True)  # (N, 1)
        exp_sum = torch.sub(logits, largest, out=self.scratch).exp_().sum(-1, keepdim=True)
        offset = s.scores.view(-1, 1) - exp_sum.log_().add_(largest)  # score - logsumexp
        total = logits.add_(offset).index_fill_(-1, self.banned, float("-inf"))
        below_min = [b * K + j for b, m in enumerate(host.min_lens) if host.t < m for j in range(K)]
        if below_min:
            total[below_min, self.eos_id] = float("-inf")
        total = total.view(B, K, vocab)
        # Sources at their limit may only end: every token but eos at -inf.
        at_limit = [b for b, limit in enumerate(host.limits) if limit <= host.t]
        if at_limit:
            total[at_limit] = total[at_limit].masked_fill(self.not_eos, float("-inf"))
        scores, index = largest_k(total.view(B, K * vocab), min(2 * K, K * vocab))
        return scores.tolist(), index.tolist()

    def _host_beam_step(self) -> None:
        """`beam_step` with the frozen decoder, its bookkeeping in `self.host`: the same
        rules, candidate by candidate. The histories stay a tensor (reordered in one call);
        a finished hypothesis reads its row."""
        s, host, K, eos = self.state, self.host, self.beam, self.eos_id
        assert isinstance(host, _HostBeam) and self.frozen is not None
        vocab, t = self.frozen.out_weight.size(1), host.t
        cand_scores, cand_index = self._frozen_candidates(host)
        rows, tokens, scores = [], [], []
        for b, (c_scores, c_index) in enumerate(zip(cand_scores, cand_index, strict=True)):
            cands = [(score, *divmod(i, vocab)) for score, i in zip(c_scores, c_index, strict=True)]
            finished = host.finished[b]
            # Finish the eos candidates among the top K, best first, while the source has room.
            if not host.done[b]:
                for score, beam, token in cands[:K]:
                    if token == eos and math.isfinite(score) and len(finished) < K:
                        finished.append((s.history[b * K + beam, :t].tolist(), score))
            # The next live beams: the K best candidates that do not end in eos, in rank order
            # (an eos, picked only with a vocabulary of one, is dead).
            live = [c for c in cands if c[2] != eos][:K]
            if len(live) < K:
                live += [c for c in cands if c[2] == eos][: K - len(live)]
            alive = False
            for score, beam, token in live:
                rows.append(b * K + beam)
                tokens.append(token)
                scores.append(score if token != eos else float("-inf"))
                alive = alive or (token != eos and math.isfinite(score))
            at_limit = host.limits[b] <= t
            host.done[b] = host.done[b] or len(finished) >= K or at_limit or not alive
        index = torch.tensor(rows, device=s.last.device)
        s.cache.reorder(index)
        s.history.copy_(s.history.index_select(0, index))
        s.last.copy_(torch.tensor(tokens))
        s.history[:, t] = s.last
        s.scores.copy_(torch.tensor(scores, dtype=torch.float64).view_as(s.scores))
        host.t += 1
        s.cache.position.add_(1)

    def beam_step(self) -> None:
        if isinstance(self.host, _HostBeam):
            return self._host_beam_step()
        s, B, K = self.state, self.batch, self.beam
        t = s.cache.position
        # Sources at their limit may only end: every token but eos at -inf.
        at_limit = s.limits <= t  # (B,)
        logits = self.logits()
        log_probs = logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        below_min = (t < s.min_lens).view(-1, 1).expand(B, K).reshape(-1)  # (N,)
        # The 2K best (beam, token) extensions of each source.
        cand_scores, cand_beams, cand_tokens = self._candidates(
            self._ban(log_probs, below_min), at_limit
        )  # each (B, 2K)
        cand_is_eos = cand_tokens.eq(self.eos_id)

        # Finish the eos candidates among the top K, best first, while the source has room:
        # the r-th of them (r = 1, 2, ...) goes to slot n_fin + r - 1 if that is below K.
        top_eos = cand_is_eos[:, :K] & cand_scores[:, :K].isfinite() & ~s.done.view(-1, 1)
        slot = s.n_fin.view(-1, 1) + top_eos.long().cumsum(dim=1) - 1  # (B, K candidates)
        accept = top_eos & (slot < K)
        hit = accept.unsqueeze(2) & slot.unsqueeze(2).eq(self.slots.view(1, 1, -1))  # (B, Kc, Ks)
        filled = hit.any(dim=1)  # (B, K slots)
        cand_of_slot = hit.float().argmax(dim=1)  # (B, K slots): the candidate written there
        rows_of_slot = self.row_base.view(-1, 1) + cand_beams[:, :K].gather(1, cand_of_slot)
        # In place (`out=`): a copy_ of a whole buffer is a memory copy, which in a CUDA
        # graph took 19 µs each on an H200 (three a step), more than a kernel writing it.
        gathered = s.history[rows_of_slot.view(-1)].view_as(s.fin_tokens)
        torch.where(filled.unsqueeze(2), gathered, s.fin_tokens, out=s.fin_tokens)
        torch.where(filled, t, s.fin_len, out=s.fin_len)
        logp = cand_scores[:, :K].gather(1, cand_of_slot)
        torch.where(filled, logp, s.fin_logp, out=s.fin_logp)
        s.n_fin.add_(accept.sum(dim=1))

        # The next live beams: the K best candidates that do not end in eos (stable sort on
        # the eos flag keeps their rank order); an eos picked here (vocabulary of one) is dead.
        live = cand_is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :K]  # (B, K)
        live_scores = cand_scores.gather(1, live).masked_fill(
            cand_is_eos.gather(1, live), float("-inf")
        )
        live_beams, live_tokens = cand_beams.gather(1, live), cand_tokens.gather(1, live)
        alive = live_scores.isfinite().any(dim=1)
        s.done.logical_or_(s.n_fin >= K).logical_or_(at_limit).logical_or_(~alive)

        rows = (self.row_base.view(-1, 1) + live_beams).view(-1)  # (N,)
        history = s.history  # of the current buffer, before the reorder flips it
        s.cache.reorder(rows)
        if len(s.histories) == 1:
            history.copy_(history.index_select(0, rows))
        else:  # into the other buffer, current now (as the cache's rows)
            torch.index_select(history, 0, rows, out=s.history)
        s.history.index_copy_(1, t.view(1), live_tokens.view(-1, 1))
        s.last.copy_(live_tokens.view(-1))
        s.scores.copy_(live_scores)
        t.add_(1)

    def step(self, t: int) -> None:
        """Step t of the search (the host counts the steps; the device holds t too).

        With CUDA graphs: a replay of the graph of step t's window and the current buffer,
        or, the first time that pair comes up, the step run eagerly and then captured for the
        later ones. So a plan captures only the windows its searches reach (most outputs are
        short), and each graph's kernels have run once, on this state, before their capture
        (what a warm-up is for: lazy initialisation, such as an attention kernel's plan for a
        new key length).
        """
        cache = self.state.cache
        if isinstance(cache, StaticKVCache):
            # The smallest window that holds positions 0 .. t.
            cache.window = next(w for w in self.windows if w > t)
        if not self.use_graph:
            self._eager_step()
            return
        key = (cache.window, cache.parity)  # read before the step flips the parity
        graph = self.graphs.get(key)
        if graph is None:
            self._eager_step()
            self._capture(*key)
            return
        graph.replay()
        if len(cache._buffers) == 2:  # the replayed step reordered into the other buffer
            cache.parity = 1 - cache.parity

    def _eager_step(self) -> None:
        if self.beam == 1:
            self.greedy_step()
        else:
            self.beam_step()

    # ----------------------------------------------------------------- loading a batch
    def load(
        self, src_ids: Tensor, limits: list[int], min_len: int, real: int, src_len: int
    ) -> None:
        """Encode ``src_ids`` (B, S) and reset every state tensor for a new search.

        The first ``real`` rows are the caller's sources, their first ``src_len`` positions
        the caller's; the rest are padding rows, done from the start, and padding positions.
        """
        model, s, K = self.model, self.state, self.beam
        # The caller's key mask, extended with padding: a source made only of padding is left
        # unmasked over its own length (`padding_mask`), not over the rounded-up one.
        mask = F.pad(
            padding_mask(src_ids[:, :src_len], self.pad_id), (0, src_ids.size(1) - src_len)
        )
        # On a CPU (with the frozen decoder) the encoder works on real tokens only.
        if self.frozen is not None:
            memory = packed_encode(model, src_ids, mask)
        else:
            memory = model.encode(src_ids, mask)
        s.cache.load(model, memory, mask, K)
        s.cache.position.zero_()
        s.last.fill_(self.bos_id)
        host_limits = torch.tensor(limits + [0] * (self.batch - len(limits)), dtype=torch.long)
        s.limits.copy_(host_limits)
        s.min_lens.copy_(host_limits.clamp(max=min_len))
        done = torch.arange(self.batch) >= real  # padding rows
        for history in s.histories:
            history.zero_()
        if K == 1:
            # The reference search never steps a source whose limit is 0.
            done |= host_limits <= 0
            s.lengths.zero_()
        else:
            # It does step such a source once: at its limit it may only end (eos).
            s.scores.fill_(float("-inf"))
            s.scores[:, 0] = 0.0
            s.fin_tokens.zero_()
            s.fin_len.zero_()
            s.fin_logp.zero_()
            s.n_fin.zero_()
        s.done.copy_(done)
        if self.frozen is not None:
            lists = dict(
                done=done.tolist(),
                limits=host_limits.tolist(),
                min_lens=host_limits.clamp(max=min_len).tolist(),
            )
            self.host = (
                _HostGreedy(**lists, outputs=[[] for _ in range(self.batch)])
                if K == 1
                else _HostBeam(**lists, finished=[[] for _ in range(self.batch)])
            )

    # ----------------------------------------------------------------- the CUDA graph
    def _capture(self, window: int, parity: int) -> None:
        """Capture the step over ``window`` positions of buffer ``parity`` (recorded, not run:
        the search's state is left as it is). All graphs of the plan share one memory pool:
        they never run at once, and no tensor made inside a step outlives it."""
        cache = self.state.cache
        after = cache.parity  # the buffer the eager step left current
        cache.window, cache.parity = window, parity
        graph = _cuda_graph(self._eager_step, self._pool)
        self._pool = graph.pool()
        self.graphs[window, parity] = graph
        cache.parity = after


class StaticDecoding:
    """Greedy and beam search for one encoder-decoder model, with fixed shapes (see the module
    docstring). Create it once and call it for every batch, so that captured graphs are reused.

    Args:
        model: an encoder-decoder :class:`~aiayn.model.Transformer`, in eval mode (it is used
            as it is; dropout would make the search random).
        cuda_graphs: replay each step as a CUDA graph; default: when the model is on CUDA.
        check_every: steps between two reads of the done flags (each read waits for the GPU).
        frozen: take each decoder step with a :class:`~aiayn.frozen_decoder.FrozenDecoder`
            (the decoder's weights copied and laid out for a CPU's matrix library); default:
            when the model is on a CPU. The copy is remade when the model's parameters change.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        cuda_graphs: bool | None = None,
        check_every: int = 8,
        frozen: bool | None = None,
    ) -> None:
        if model.encoder is None or model.decoder is None:
            raise ConfigError("StaticDecoding needs an encoder-decoder model")
        on_cuda = model.generator.weight.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ConfigError("cuda_graphs=True needs the model on a CUDA device")
        self.model = model
        weight = model.generator.weight
        self.placement = (weight.device, weight.dtype)  # what the plans' buffers were made for
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.check_every = max(1, check_every) if self.cuda_graphs else 1
        if frozen and self.cuda_graphs:
            raise ConfigError("frozen=True takes eager steps: it needs cuda_graphs=False")
        self.frozen = not on_cuda if frozen is None else frozen
        self._frozen: FrozenDecoder | None = None
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    def _frozen_decoder(self) -> FrozenDecoder | None:
        """The frozen copy of the decoder, remade (with every plan, which use it) when the
        model's parameters have changed since it was made."""
        if not self.frozen:
            return None
        if self._frozen is None or not self._frozen.is_current():
            self._frozen = FrozenDecoder(self.model)
            self._plans.clear()
        return self._frozen

    def _plan(self, *, batch: int, beam: int, src_len: int, positions: int, ids: tuple) -> _Plan:
        frozen = self._frozen_decoder()
        key = (batch, beam, src_len, positions, ids)
        plan = self._plans.pop(key, None)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.popitem(last=False)  # the least recently used shape
            plan = _Plan(
                self.model,
                batch=batch,
                beam=beam,
                src_len=src_len,
                positions=positions,
                ids=ids,
                use_graph=self.cuda_graphs,
                frozen=frozen,
            )
        self._plans[key] = plan
        return plan

    @torch.inference_mode()
    def _run(
        self,
        src_ids: Tensor,
        *,
        beam: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        max_len: int | None,
        max_len_a: int,
        max_len_b: int,
        min_len: int,
    ) -> _Plan:
        _check_inputs(src_ids)
        model = self.model
        _check_pad_id(model, pad_id)
        _check_on_model_device(src_ids, model)
        device = model.generator.weight.device
        real, src_len = src_ids.shape
        cap = model.cfg.max_len - 2  # bos + output + eos fit in the model's positions
        limits = max_output_lengths(
            src_ids,
            pad_id=pad_id,
            max_len=max_len,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            cap=cap,
        )
        # Source positions rounded up too, but never past the model's positions (the encoder
        # refuses a longer input; a source that fits must stay one that fits). The batch is
        # rounded up for CUDA graphs only: a CPU step's work grows with its rows (one sentence
        # rounded up to 8 rows took 8x the work, and beam search 1.0x `generate` at batch 1).
        batch, padded_len = (
            _round_up(real) if self.cuda_graphs else real,
            max(src_len, min(_round_up(src_len), model.cfg.max_len)),
        )
        # Room for the longest limit any source of this padded length could have, so that
        # batches of one bucket share a plan; the search feeds positions 0 .. limit.
        longest = max_len if max_len is not None else max_len_a * padded_len + max_len_b
        positions = max(0, min(longest, cap)) + 1
        src = torch.full((batch, padded_len), pad_id, dtype=src_ids.dtype, device=device)
        src[:real, :src_len] = src_ids
        plan = self._plan(
            batch=batch,
            beam=beam,
            src_len=padded_len,
            positions=positions,
            ids=(bos_id, eos_id, pad_id),
        )
        plan.load(src, limits, min_len, real, src_len)
        steps = max(limits, default=0) + (0 if beam == 1 else 1)
        for step in range(steps):
            plan.step(step)
            if (step + 1) % self.check_every == 0 and plan.finished():
                break
        return plan

    def greedy(
        self,
        src_ids: Tensor,
        *,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_id: int = 0,
        max_len: int | None = None,
        max_len_a: int = 1,
        max_len_b: int = 50,
        min_len: int = 0,
    ) -> list[list[int]]:
        """:func:`aiayn.decoding.greedy_search` for this model: src_ids (B, S), padded with
        pad_id, -> B lists of output ids (no bos, no eos)."""
        if src_ids.dim() == 2 and src_ids.size(0) == 0:
            return []
        plan = self._run(
            src_ids,
            beam=1,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            max_len=max_len,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            min_len=min_len,
        )
        real = src_ids.size(0)
        if isinstance(plan.host, _HostGreedy):
            return [list(tokens) for tokens in plan.host.outputs[:real]]
        history = plan.state.history[:real].cpu()
        lengths = plan.state.lengths[:real].tolist()
        return [history[b, :n].tolist() for b, n in enumerate(lengths)]

    def beam(
        self,
        src_ids: Tensor,
        *,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_id: int = 0,
        max_len: int | None = None,
        max_len_a: int = 1,
        max_len_b: int = 50,
        min_len: int = 0,
        n_best: int = 1,
    ) -> list[list[Hypothesis]]:
        """:func:`aiayn.decoding.beam_search` for this model: src_ids (B, S), padded with
        pad_id, -> B lists of n_best `Hypothesis`, best first."""
        if beam_size < 2:
            raise ConfigError(
                f"beam search needs beam_size >= 2 here (1 is greedy), got {beam_size}"
            )
        _check_n_best(n_best, beam_size)
        if src_ids.size(0) == 0:
            return []
        plan = self._run(
            src_ids,
            beam=beam_size,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            max_len=max_len,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            min_len=min_len,
        )
        s, real = plan.state, src_ids.size(0)
        # Each source's finished hypotheses as (tokens, log-prob), in finishing order.
        if isinstance(plan.host, _HostBeam):
            finished = plan.host.finished[:real]
        else:
            n_fin = s.n_fin[:real].tolist()
            fin_len = s.fin_len[:real].tolist()
            fin_logp = s.fin_logp[:real].tolist()
            fin_tokens = s.fin_tokens[:real].cpu()
            finished = [
                [
                    (fin_tokens[b, slot, : fin_len[b][slot]].tolist(), fin_logp[b][slot])
                    for slot in range(n_fin[b])
                ]
                for b in range(real)
            ]
        results = []
        for hypotheses in finished:
            # In finishing order, so that the stable sort breaks ties as the reference does.
            hyps = [
                Hypothesis(
                    tokens,
                    log_prob / length_penalty_factor(len(tokens) + 1, length_penalty),
                    log_prob,
                )
                for tokens, log_prob in hypotheses
            ]
            results.append(sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best])
        return results
