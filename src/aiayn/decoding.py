"""Greedy and beam search over any incremental decoder.

The search never touches the model directly. It talks to an :class:`IncrementalDecoder`,
a three-method protocol (fairseq style), so that the search can be tested against a tiny
scripted decoder whose probabilities are known by hand, and so that the model is free to
keep whatever it likes (encoder memory, padding mask, key/value cache) in its state:

* ``start(src_ids)`` encodes the sources once and returns the decoder state;
* ``step(tokens, state)`` feeds one token per row and returns next-token log-probabilities;
* ``reorder(state, index)`` selects, reorders or duplicates rows of the state.

:class:`TransformerDecoder` puts an encoder-decoder :class:`~aiayn.model.Transformer`
behind the protocol (encoder memory once, then one cached decoder position per step), and
:func:`translate_ids` runs the whole thing: ids in, best output ids out.

Paper, §6.1: "we used beam search with a beam size of 4 and length penalty α = 0.6 [...]
We set the maximum output length during inference to input length + 50, but terminate
early when possible." Those are the defaults here.

Choices this module makes (each one is the fairseq one):

* **Length normalisation.** Hypotheses are ranked by ``log P(Y) / lp(Y)`` with the length
  penalty of Wu et al. (2016), ``lp(Y) = ((5 + |Y|) / 6) ** alpha``, where ``|Y|`` counts
  the output tokens *and the eos* (bos is not counted). ``log P(Y)`` includes the eos's
  log-probability. ``alpha = 0`` ranks by plain log-probability.
* **Stopping.** A source stops as soon as it has ``beam_size`` finished hypotheses. The
  search is not exhaustive: with ``alpha > 0`` a live beam might, in principle, still have
  grown into a better normalised score. This rule is what makes ``beam_size=1`` exactly
  greedy search, and it is what "terminate early when possible" means in practice.
* **Maximum length.** A source may emit at most ``max_len_a * source_length + max_len_b``
  tokens before the eos (``source_length`` = non-pad tokens of that source row). At that
  length only the eos is allowed, so the live beams are finalised with an eos appended and
  its log-probability counted, as in fairseq.
* **Positional limit.** A decoder may declare ``max_output_length``, an int: the longest
  output (eos excluded) its positions allow. Every limit above, ``max_len`` included, is
  capped to it, so the search never feeds the model a position it does not have (fairseq
  caps with ``max_decoder_positions()`` the same way). :class:`TransformerDecoder` sets
  it to ``cfg.max_len - 2``: bos + output + eos then fit in ``max_len`` positions, as a
  training example does.
* **Banned tokens.** pad and bos are never emitted (their log-probabilities are set to
  -inf), so a half-trained model cannot produce them.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from aiayn.errors import ConfigError, DataError

if TYPE_CHECKING:
    from aiayn.model import KVCache, Transformer
    from aiayn.static_decoding import StaticDecoding

__all__ = [
    "DecoderState",
    "Hypothesis",
    "IncrementalDecoder",
    "TransformerDecoder",
    "TransformerDecoderState",
    "beam_search",
    "beam_step",
    "greedy_search",
    "length_penalty_factor",
    "max_output_lengths",
    "release_static_decoding",
    "static_decoding_of",
    "translate_ids",
]

# The decoder's state is opaque to the search: it only ever hands it back to the decoder.
DecoderState = Any


class IncrementalDecoder(Protocol):
    """What the search needs from a model: encode once, then decode one token at a time."""

    def start(self, src_ids: Tensor) -> DecoderState:
        """Encode the sources and return the initial decoder state.

        Args:
            src_ids: (B, S) source token ids, right-padded with the pad id.

        Returns:
            The state for B rows, one per source, positioned before the first target token.
        """
        ...

    def step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed one token per row and advance ``state`` by one position, in place.

        Args:
            tokens: (N, 1) the last token of each row (bos at the first step).
            state: the state for N rows.

        Returns:
            (N, V) log-probabilities (log_softmax) of the next token of each row.
        """
        ...

    def reorder(self, state: DecoderState, index: Tensor) -> DecoderState:
        """Select rows of the state: row ``i`` of the result is row ``index[i]`` of ``state``.

        Args:
            state: the state for N rows.
            index: (N',) long tensor of row numbers in ``[0, N)``; may repeat or drop rows.

        Returns:
            The state for N' rows (like ``index_select`` along the batch dimension).
        """
        ...


@dataclass(frozen=True)
class Hypothesis:
    """One finished output of beam search.

    Attributes:
        tokens: the output token ids, without bos and eos.
        score: the length-normalised score used for ranking, ``log_prob / lp(len(tokens) + 1)``.
        log_prob: the sum of the token log-probabilities, the eos's included.
    """

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty_factor(length: int, alpha: float) -> float:
    """The length penalty of Wu et al. (2016): ``((5 + length) / 6) ** alpha``.

    Args:
        length: the hypothesis length, counting its eos token (not bos).
        alpha: the strength; 0 disables normalisation (the factor is 1).

    Returns:
        The divisor of the hypothesis's log-probability.
    """
    return ((5.0 + length) / 6.0) ** alpha


def max_output_lengths(
    src_ids: Tensor,
    *,
    pad_id: int,
    max_len: int | None,
    max_len_a: int,
    max_len_b: int,
    cap: int | None = None,
) -> list[int]:
    """How many tokens (eos excluded) each source may emit.

    Args:
        src_ids: (B, S) source ids, right-padded with ``pad_id``.
        pad_id: the padding id; pad tokens do not count towards the source length.
        max_len: if given, the limit for every source, overriding ``max_len_a``/``max_len_b``.
        max_len_a: the limit is ``max_len_a * source_length + max_len_b`` otherwise.
        max_len_b: see ``max_len_a``.
        cap: if given, an upper bound on every limit (the decoder's ``max_output_length``).

    Returns:
        B non-negative limits.
    """
    if max_len is not None:
        limits = [max_len] * src_ids.size(0)
    else:
        source_lengths = src_ids.ne(pad_id).sum(dim=1).tolist()
        limits = [max_len_a * length + max_len_b for length in source_lengths]
    if cap is not None:
        limits = [min(limit, cap) for limit in limits]
    return [max(0, limit) for limit in limits]


def _output_cap(decoder: IncrementalDecoder) -> int | None:
    """The decoder's optional ``max_output_length`` (see the module docstring), or None."""
    cap = getattr(decoder, "max_output_length", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)):
        raise TypeError(f"decoder.max_output_length must be an int or None, got {cap!r}")
    return cap


def beam_step(
    log_probs: Tensor, scores: Tensor, num_candidates: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One expansion of the beam: the best ``num_candidates`` (beam, token) pairs per source.

    Every beam is extended by every token and the extensions of all K beams of a source
    compete together (top-k over K * V). Dead beams carry a score of -inf; at the first
    step only beam 0 is alive, which is what stops the K identical copies of the start
    state from filling the beam with K duplicates.

    Args:
        log_probs: (B, K, V) next-token log-probabilities of each beam.
        scores: (B, K) cumulative log-probability of each beam (-inf for a dead beam).
        num_candidates: how many candidates to return per source; K when not given.
            It must not exceed K * V.

    Returns:
        ``(candidate_scores, beam_index, token)``, each (B, num_candidates), best first:
        the cumulative log-probability of the extended beam, the beam it extends (in
        ``[0, K)``), and the token appended.
    """
    batch, beam, vocab = log_probs.shape
    if num_candidates is None:
        num_candidates = beam
    # Broadcasting adds each beam's score to all of its V extensions.
    total = scores.unsqueeze(-1) + log_probs  # (B, K, V)
    candidate_scores, flat_index = total.reshape(batch, beam * vocab).topk(num_candidates, dim=1)
    # The flat index over K * V is beam * V + token.
    return candidate_scores, flat_index // vocab, flat_index % vocab


def _check_n_best(n_best: int, beam_size: int) -> None:
    if not 1 <= n_best <= beam_size:
        raise ConfigError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")


def _check_pad_id(model: Transformer, pad_id: int) -> None:
    if pad_id != model.cfg.pad_id:
        # The model masks its own pad id; the search counts source lengths with this one.
        raise ConfigError(f"pad_id={pad_id} differs from the model's cfg.pad_id={model.cfg.pad_id}")


def _check_on_model_device(src_ids: Tensor, model: Transformer) -> None:
    device = model.generator.weight.device
    if src_ids.device != device:
        # The search creates its tokens on src_ids' device; they must meet the model there.
        raise DataError(
            f"src_ids are on {src_ids.device} but the model is on {device}: "
            "move them with src_ids.to(device)"
        )


def _check_inputs(src_ids: Tensor) -> None:
    if src_ids.dim() != 2:
        raise DataError(
            f"src_ids must be a (batch, length) tensor of token ids, got shape {tuple(src_ids.shape)}"
        )


def _check_search_arguments(
    vocab_size: int | None,
    max_len: int | None,
    ids: tuple[int, int, int],
    lengths: tuple[int, int, int],
    no_repeat_ngram_size: int,
    **values: Any,
) -> None:
    """Refuse search settings that would fail deep inside a search or silently mislead it:
    each must be an integer, and the ids (bos, eos, pad) token ids of the model's target
    vocabulary (`vocab_size`, when the decoder says it): an eos the model cannot emit would
    leave beam search with no finished hypothesis at all. `lengths` are max_len_a,
    max_len_b and min_len; `values` any other integer settings (beam_size, n_best)."""
    values |= dict(zip(("bos_id", "eos_id", "pad_id"), ids, strict=True))
    values |= dict(zip(("max_len_a", "max_len_b", "min_len"), lengths, strict=True))
    values["no_repeat_ngram_size"] = no_repeat_ngram_size
    if max_len is not None:
        values["max_len"] = max_len
    for name, value in values.items():
        try:
            operator.index(value)
        except TypeError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if vocab_size is None:
        return
    for name in ("bos_id", "eos_id", "pad_id"):
        if name in values and not 0 <= values[name] < vocab_size:
            raise ConfigError(
                f"{name}={values[name]} is not a token id of the model's target vocabulary "
                f"[0, {vocab_size}): pass the tokenizer's id"
            )


def _next_log_probs(
    decoder: IncrementalDecoder, tokens: Tensor, state: DecoderState, banned: Tensor
) -> Tensor:
    """Run one decoder step and return its (N, V) log-probabilities, banned ids at -inf."""
    log_probs = decoder.step(tokens, state)
    if log_probs.dim() != 2 or log_probs.size(0) != tokens.size(0):
        raise ValueError(
            f"decoder.step must return (rows, vocab) log-probabilities for {tokens.size(0)} rows, "
            f"got shape {tuple(log_probs.shape)}"
        )
    # Accumulate scores in at least float32 even when the model runs in half precision,
    # but keep float64 if that is what the decoder gives.
    log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
    if banned.numel():
        # index_fill returns a copy, so the decoder's own tensor is never modified.
        log_probs = log_probs.index_fill(-1, banned, float("-inf"))
    return log_probs


def _banned_ids(*, bos_id: int, eos_id: int, pad_id: int, device: torch.device) -> Tensor:
    """The ids no output may contain, on the search's device (made once, not every step)."""
    # Some vocabularies use one id for bos and eos (fairseq does); eos must stay allowed.
    return torch.tensor(sorted({pad_id, bos_id} - {eos_id}), dtype=torch.long, device=device)


def _ban_eos(log_probs: Tensor, rows: Tensor, eos_id: int) -> Tensor:
    """A copy of log_probs (N, V) with eos at -inf in ``rows`` (a minimum length not reached)."""
    minus_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    return log_probs.index_put((rows, torch.full_like(rows, eos_id)), minus_inf)


def repeated_ngram_bans(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``history`` if appended to it (n-gram blocking).

    The next token t completes the n-gram ``history[-(n-1):] + [t]``; it is banned when that
    n-gram already occurs in ``history`` (Paulus et al. 2018; fairseq's and Hugging Face's
    ``no_repeat_ngram_size``). ``n`` of 1 bans every token already emitted.
    """
    if n < 1 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - (n - 1) :])
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


def _block_repeats(log_probs: Tensor, histories: Sequence[Sequence[int]], n: int) -> Tensor:
    """Set to -inf, row by row, the tokens that would repeat an n-gram of that row's history."""
    rows, cols = [], []
    for row, history in enumerate(histories):
        for token in repeated_ngram_bans(history, n):
            rows.append(row)
            cols.append(token)
    if not rows:
        return log_probs
    index = torch.tensor([rows, cols], device=log_probs.device)
    minus_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    return log_probs.index_put((index[0], index[1]), minus_inf)


def greedy_search(
    decoder: IncrementalDecoder,
    src_ids: Tensor,
    *,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 0,
    max_len: int | None = None,
    max_len_a: int = 1,
    max_len_b: int = 50,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[list[int]]:
    """Decode each source by always taking the most probable next token.

    A row stops at its eos or after its maximum length (see :func:`max_output_lengths`;
    it is capped by the decoder's ``max_output_length``, if it has one);
    finished rows are dropped from the decoder state, and the search stops when all rows
    have finished.

    Args:
        decoder: the model, behind the :class:`IncrementalDecoder` protocol.
        src_ids: (B, S) source ids, right-padded with ``pad_id``.
        bos_id: the id fed at the first step.
        eos_id: the id that ends an output.
        pad_id: the padding id of ``src_ids``.
        max_len: if given, the maximum output length of every source.
        max_len_a: otherwise each source's maximum is ``max_len_a * its length + max_len_b``.
        max_len_b: see ``max_len_a``.
        min_len: eos is banned until an output has this many tokens (or its maximum length).
        no_repeat_ngram_size: if n > 0, no output repeats one of its own n-grams.

    Returns:
        B lists of output token ids, without bos and eos.
    """
    _check_inputs(src_ids)
    vocab = getattr(decoder, "vocab_size", None)
    ids, lengths = (bos_id, eos_id, pad_id), (max_len_a, max_len_b, min_len)
    _check_search_arguments(vocab, max_len, ids, lengths, no_repeat_ngram_size)
    batch = src_ids.size(0)
    limits = max_output_lengths(
        src_ids,
        pad_id=pad_id,
        max_len=max_len,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        cap=_output_cap(decoder),
    )
    banned = _banned_ids(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, device=src_ids.device)
    outputs: list[list[int]] = [[] for _ in range(batch)]

    # `active[i]` is the source that row i of the decoder state belongs to.
    active = [b for b in range(batch) if limits[b] > 0]
    if not active:
        return outputs
    device = src_ids.device
    state = decoder.start(src_ids)
    if len(active) < batch:
        state = decoder.reorder(state, torch.tensor(active, device=device))
    last = torch.full((len(active), 1), bos_id, dtype=torch.long, device=device)

    for step in itertools.count():
        log_probs = _next_log_probs(decoder, last, state, banned)  # (A, V)
        # Every active row has emitted `step` tokens.
        # Rows still below their minimum length (a host loop, so only when one is asked for).
        early = min_len and [r for r, src in enumerate(active) if step < min(min_len, limits[src])]
        if early:
            log_probs = _ban_eos(log_probs, torch.tensor(early, device=device), eos_id)
        if no_repeat_ngram_size:
            histories = [outputs[source] for source in active]
            log_probs = _block_repeats(log_probs, histories, no_repeat_ngram_size)
        next_tokens = log_probs.argmax(dim=-1)  # (A,)
        keep = []
        for row, (source, token) in enumerate(zip(active, next_tokens.tolist(), strict=True)):
            if token == eos_id:
                continue
            outputs[source].append(token)
            if len(outputs[source]) < limits[source]:
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(active):
            # Drop the finished rows so that no more compute is spent on them.
            index = torch.tensor(keep, device=device)
            state = decoder.reorder(state, index)
            next_tokens = next_tokens[index]
            active = [active[row] for row in keep]
        last = next_tokens.unsqueeze(1)


def beam_search(
    decoder: IncrementalDecoder,
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
    n_best: int = 1,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[list[Hypothesis]]:
    """Decode each source with beam search, batched over B sources x ``beam_size`` beams.

    Each step expands the K live beams of a source into its 2K best (beam, token)
    candidates (:func:`beam_step`). Candidates ending in eos that rank among the top K are
    finished hypotheses; the K best candidates not ending in eos are the next live beams.
    (Taking 2K candidates guarantees K of them do not end in eos.)

    A source stops when it has ``beam_size`` finished hypotheses, or at its maximum length
    (capped by the decoder's ``max_output_length``, if it has one),
    where the live beams are finalised with an eos appended (its log-probability counted);
    see the module docstring. Finished sources are dropped from the decoder state, and the
    search stops when every source has stopped.

    Scores are length-normalised with Wu et al.'s penalty: ``score = log P(Y) / lp(|Y|)``,
    ``lp(n) = ((5 + n) / 6) ** length_penalty``, where ``|Y|`` and ``log P(Y)`` include
    the eos. The penalty only ranks finished hypotheses; live beams compete on plain
    log-probability (all have the same length).

    Args:
        decoder: the model, behind the :class:`IncrementalDecoder` protocol.
        src_ids: (B, S) source ids, right-padded with ``pad_id``.
        beam_size: K, the number of live beams per source (and of finished hypotheses kept).
        length_penalty: alpha of the length penalty; 0 ranks by log-probability.
        bos_id: the id fed at the first step.
        eos_id: the id that ends an output.
        pad_id: the padding id of ``src_ids``.
        max_len: if given, the maximum output length (eos excluded) of every source.
        max_len_a: otherwise each source's maximum is ``max_len_a * its length + max_len_b``.
        max_len_b: see ``max_len_a``.
        n_best: how many hypotheses to return per source, ``1 <= n_best <= beam_size``.
        min_len: eos is banned until a hypothesis has this many tokens (or its maximum length).
        no_repeat_ngram_size: if n > 0, no hypothesis repeats one of its own n-grams.

    Returns:
        B lists of up to ``n_best`` hypotheses, best (highest score) first. A list is
        shorter only if the decoder gave probability 0 to every way of finishing.
    """
    _check_inputs(src_ids)
    vocab = getattr(decoder, "vocab_size", None)
    ids, lengths = (bos_id, eos_id, pad_id), (max_len_a, max_len_b, min_len)
    _check_search_arguments(
        vocab, max_len, ids, lengths, no_repeat_ngram_size, beam_size=beam_size, n_best=n_best
    )
    if beam_size < 1:
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}")
    _check_n_best(n_best, beam_size)
    batch = src_ids.size(0)
    if batch == 0:
        return []
    k = beam_size
    device = src_ids.device
    limits = max_output_lengths(
        src_ids,
        pad_id=pad_id,
        max_len=max_len,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        cap=_output_cap(decoder),
    )
    banned = _banned_ids(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, device=src_ids.device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    # Layout: row a * K + j of the decoder state is beam j of the a-th active source, and
    # `active[a]` is that source's index in the batch. Encode once, then copy each source's
    # state K times.
    state = decoder.start(src_ids)
    state = decoder.reorder(state, torch.arange(batch, device=device).repeat_interleave(k))
    active = list(range(batch))
    active_on_device = torch.arange(batch, device=device)
    limits_on_device = torch.tensor(limits, device=device)
    # (A, K) cumulative log-probabilities; only beam 0 is alive before the first step.
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    # The tokens so far live on the host: the search reads them only to finish hypotheses,
    # and keeping them there saves a device round trip per finished hypothesis.
    history = torch.empty((batch * k, 0), dtype=torch.long)  # (A*K, t), CPU
    last = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    not_eos: Tensor | None = None

    for step in range(max(limits) + 1):
        log_probs = _next_log_probs(decoder, last, state, banned)  # (A*K, V)
        if no_repeat_ngram_size:
            log_probs = _block_repeats(log_probs, history.tolist(), no_repeat_ngram_size)
        vocab = log_probs.size(-1)
        log_probs = log_probs.view(len(active), k, vocab)
        if not_eos is None:
            not_eos = torch.arange(vocab, device=device).ne(eos_id)

        # Sources at their maximum length may only end: every token but eos gets -inf.
        at_limit = limits_on_device[active_on_device] <= step  # (A,)
        early = min_len and [a for a, src in enumerate(active) if step < min(min_len, limits[src])]
        if early:
            beams = torch.tensor(early).repeat_interleave(k) * k + torch.arange(k).repeat(
                len(early)
            )
            log_probs = _ban_eos(log_probs.view(-1, vocab), beams.to(device), eos_id)
            log_probs = log_probs.view(len(active), k, vocab)
        force_eos = at_limit.view(-1, 1, 1) & not_eos.view(1, 1, -1)  # (A, 1, V)
        log_probs = log_probs.masked_fill(force_eos, float("-inf"))

        cand_scores, cand_beams, cand_tokens = beam_step(
            log_probs, scores, num_candidates=min(2 * k, k * vocab)
        )  # each (A, 2K)
        cand_is_eos = cand_tokens.eq(eos_id)

        # The next live beams: the K best candidates that do not end in eos. A stable sort
        # on the eos flag moves them to the front while keeping their rank order.
        live = cand_is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :k]  # (A, K)
        live_scores = cand_scores.gather(1, live)
        # Only with a vocabulary of one token could an eos be picked here; it must be dead.
        live_scores = live_scores.masked_fill(cand_is_eos.gather(1, live), float("-inf"))
        live_beams = cand_beams.gather(1, live)
        live_tokens = cand_tokens.gather(1, live)

        # Everything the host decides on, in one transfer (one synchronisation per step):
        # float64 holds the scores exactly (float32 or float64) and token ids below 2^53.
        on_host = torch.cat(
            [
                cand_scores[:, :k].double(),
                cand_beams[:, :k].double(),
                cand_is_eos[:, :k].double(),
                live_beams.double(),
                live_tokens.double(),
                live_scores.isfinite().any(dim=1, keepdim=True).double(),
            ],
            dim=1,
        ).cpu()
        top_scores, top_beams, top_is_eos, host_beams, host_tokens, alive = on_host.split(
            [k, k, k, k, k, 1], dim=1
        )  # in the order of the cat above
        top_scores, top_beams = top_scores.tolist(), top_beams.long().tolist()
        top_is_eos, alive = top_is_eos.bool().tolist(), alive.view(-1).bool().tolist()
        host_beams, host_tokens = host_beams.long(), host_tokens.long()

        # Finalise the eos candidates that rank among the top K, best first, while the
        # source has room. A -inf candidate extends a dead beam and is skipped.
        for a, source in enumerate(active):
            for c in range(k):
                log_prob = top_scores[a][c]
                if not top_is_eos[a][c] or log_prob == float("-inf"):
                    continue
                if len(finished[source]) == k:
                    break
                tokens = history[a * k + top_beams[a][c]].tolist()
                score = log_prob / length_penalty_factor(len(tokens) + 1, length_penalty)
                finished[source].append(Hypothesis(tokens, score, log_prob))

        keep = [
            a
            for a, source in enumerate(active)
            if len(finished[source]) < k and step < limits[source] and alive[a]
        ]
        if not keep:
            break
        kept = torch.tensor(keep)
        # Rows of the current state that the kept sources' new beams extend.
        rows = ((kept * k).unsqueeze(1) + host_beams[kept]).view(-1)  # (A' * K,)
        tokens = host_tokens[kept].view(-1)  # (A' * K,)
        history = torch.cat([history[rows], tokens.unsqueeze(1)], dim=1)
        # One copy to the device for the three index vectors.
        n_rows, n_kept = rows.numel(), kept.numel()
        indices = torch.cat([rows, kept, tokens]).to(device, non_blocking=True)
        rows_d, kept_d = indices[:n_rows], indices[n_rows : n_rows + n_kept]
        state = decoder.reorder(state, rows_d)
        last = indices[n_rows + n_kept :].view(-1, 1)
        scores = live_scores[kept_d]
        active_on_device = active_on_device[kept_d]
        active = [active[a] for a in keep]

    # sorted() is stable, so equal scores keep the order in which they finished.
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]


# --- the Transformer behind the protocol ----------------------------------------------------


@dataclass
class TransformerDecoderState:
    """The state of :class:`TransformerDecoder` for N rows.

    Attributes:
        memory: (N, S, d_model) encoder output of each row's source.
        src_ids: (N, S) each row's source ids, for the padding mask over ``memory``.
        cache: the decoder's key/value cache, N rows, ``cache.length`` positions so far.
    """

    memory: Tensor
    src_ids: Tensor
    cache: KVCache


class TransformerDecoder:
    """:class:`IncrementalDecoder` for an encoder-decoder :class:`~aiayn.model.Transformer`.

    The sources are encoded once; each step then runs the decoder on the one new position,
    reusing the keys and values of the past ones from a :class:`~aiayn.model.KVCache`.
    Everything runs under ``torch.inference_mode``. The model is used in whatever mode it is
    in: put it in eval mode first (:func:`translate_ids` does), or dropout makes the search
    random.

    Attributes:
        model: the wrapped model.
        max_output_length: ``model.cfg.max_len - 2``, the longest output (eos excluded) the
            search may ask for: bos + output + eos then fit in the model's ``max_len``
            positions. The search reads it and caps its limits (see the module docstring).
    """

    def __init__(self, model: Transformer) -> None:
        if model.encoder is None or model.decoder is None:
            raise ConfigError(
                "TransformerDecoder needs an encoder-decoder model; this one has "
                f"n_encoder_layers={model.cfg.n_encoder_layers} and "
                f"n_decoder_layers={model.cfg.n_decoder_layers}"
            )
        self.model = model

    @property
    def max_output_length(self) -> int:
        """``cfg.max_len - 2``: bos + output + eos fit in the model's positions."""
        return self.model.cfg.max_len - 2

    @property
    def vocab_size(self) -> int:
        """V, the target vocabulary's size: the searches check their token ids against it."""
        return self.model.cfg.tgt_vocab_size

    @torch.inference_mode()
    def start(self, src_ids: Tensor) -> TransformerDecoderState:
        """Encode the sources: (B, S) ids on the model's device -> the state for B rows."""
        _check_on_model_device(src_ids, self.model)
        memory = self.model.encode(src_ids)  # (B, S, d)
        return TransformerDecoderState(memory, src_ids, self.model.new_cache())

    @torch.inference_mode()
    def step(self, tokens: Tensor, state: TransformerDecoderState) -> Tensor:
        """Feed tokens (N, 1) at position ``state.cache.length``; (N, V) log-probabilities.

        Any id of the vocabulary may be fed, pad and bos included: the search feeds them to
        dead beams, whose outputs it ignores.
        """
        logits = self.model.decode(tokens, state.memory, state.src_ids, cache=state.cache)
        last = logits[:, -1]  # (N, V): the cache holds the past, so this is the only position
        # The softmax runs in at least float32 even for a half-precision model, so that the
        # search's sums of log-probabilities do not lose precision (float64 stays float64).
        return last.log_softmax(dim=-1, dtype=torch.promote_types(last.dtype, torch.float32))

    @torch.inference_mode()
    def reorder(self, state: TransformerDecoderState, index: Tensor) -> TransformerDecoderState:
        """Rows ``index`` (N',) of the state. The cache is reordered in place, so the old
        state must not be used afterwards (the search never does)."""
        index = index.to(state.memory.device)
        state.cache.reorder(index)
        return TransformerDecoderState(
            state.memory.index_select(0, index), state.src_ids.index_select(0, index), state.cache
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Within the block the whole model is in eval mode; after it, every submodule is back in
    its own previous mode (a model may mix them, e.g. a frozen encoder kept in eval)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def static_decoding_of(model: Transformer) -> StaticDecoding:
    """The model's :class:`~aiayn.static_decoding.StaticDecoding`, made once and kept on the
    model so that its captured graphs serve every later batch (remade if the model has moved
    to another device or dtype since)."""
    from aiayn.static_decoding import StaticDecoding

    weight = model.generator.weight
    search = getattr(model, "_static_decoding", None)
    if search is None or search.placement != (weight.device, weight.dtype):
        search = StaticDecoding(model)
        model._static_decoding = search  # a plain attribute: not a submodule, not saved
    return search


def release_static_decoding(model: Transformer) -> None:
    """Drop the graphs, caches and CPU copy of the decoder that :func:`static_decoding_of`
    kept on the model (GPU memory; weights changed in a way PyTorch does not record)."""
    model.__dict__.pop("_static_decoding", None)


def translate_ids(
    model: Transformer,
    src_ids: Tensor,
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 0,
    max_len_a: int = 1,
    max_len_b: int = 50,
    min_len: int = 0,
    no_repeat_ngram_size: int = 0,
    static: bool | None = None,
) -> list[list[int]]:
    """Translate a batch of sources with an encoder-decoder model: the paper's decoding (§6.1).

    The model is put in eval mode for the call (no dropout) and each of its modules is then
    restored to its previous mode, even if the search raises. The output length of a source
    is at most ``max_len_a * source_length + max_len_b``, and at most ``model.cfg.max_len - 2``
    (so that bos + output + eos fit in the model's positions).

    Args:
        model: an encoder-decoder :class:`~aiayn.model.Transformer`.
        src_ids: (B, S) source ids, right-padded with ``pad_id``; moved to the model's device.
        beam_size: 1 for greedy search, more for beam search.
        length_penalty: alpha of the length penalty (beam search only).
        bos_id: the id that starts every output.
        eos_id: the id that ends an output.
        pad_id: the padding id; must be the model's ``cfg.pad_id``.
        max_len_a: see above.
        max_len_b: see above.
        min_len: eos is banned until an output has this many tokens (or its maximum length).
        no_repeat_ngram_size: n-gram blocking (0: off, the paper's decoding).
        static: use :mod:`aiayn.static_decoding` (the same search with fixed shapes: one CUDA
            graph launch per step on a GPU, the decoder's frozen copy on a CPU); default: when
            the model is on CUDA or a CPU, not sharded (FSDP), and no n-gram blocking is asked
            for (it does not do that). The CPU copy is remade when the model's parameters
            change as PyTorch records it (an optimiser step, `load_state_dict`, in-place ops)
            or at sampled values; a write through `.data` at a value it does not sample goes
            unseen: after such a change, call `release_static_decoding(model)`.

    Returns:
        B lists of output token ids, without bos and eos: the best hypothesis of each source.
    """
    _check_pad_id(model, pad_id)
    if model.encoder is None or model.decoder is None:
        missing = "encoder" if model.encoder is None else "decoder"
        raise ConfigError(
            f"translate_ids needs an encoder-decoder model, and this one has no {missing} "
            "(n_encoder_layers and n_decoder_layers must both be 1 or more)"
        )
    _check_search_arguments(
        model.cfg.tgt_vocab_size,
        None,
        (bos_id, eos_id, pad_id),
        (max_len_a, max_len_b, min_len),
        no_repeat_ngram_size,
        beam_size=beam_size,
    )
    if beam_size < 1:  # before choosing a search: each one would read 0 differently
        raise ConfigError(f"beam_size must be at least 1, got {beam_size}")
    device = model.generator.weight.device
    if static is None:
        from aiayn.sharding import is_sharded

        # A sharded (FSDP) model gathers its layers with collectives, which no graph captures.
        static = (
            device.type in ("cuda", "cpu") and not no_repeat_ngram_size and not is_sharded(model)
        )
    elif static and no_repeat_ngram_size:
        raise ConfigError("no_repeat_ngram_size is not available with static=True")
    src_ids = src_ids.to(device)
    # The settings every search takes alike.
    common = dict(
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        min_len=min_len,
    )
    with _eval_mode(model):
        if static and beam_size == 1:
            return static_decoding_of(model).greedy(src_ids, **common)
        if static:
            hypotheses = static_decoding_of(model).beam(
                src_ids, beam_size=beam_size, length_penalty=length_penalty, **common
            )
        elif beam_size == 1:
            return greedy_search(
                TransformerDecoder(model),
                src_ids,
                no_repeat_ngram_size=no_repeat_ngram_size,
                **common,
            )
        else:
            hypotheses = beam_search(
                TransformerDecoder(model),
                src_ids,
                beam_size=beam_size,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                **common,
            )
    # A source has no hypothesis only if the model gave probability 0 to every ending.
    return [hyps[0].tokens if hyps else [] for hyps in hypotheses]
