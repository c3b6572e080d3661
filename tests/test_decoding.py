"""Tests of greedy and beam search against a scripted decoder whose probabilities are known.

Vocabulary of the scripted decoder: pad=0, bos=1, eos=2 (written E), and two words A=3, B=4.
A "tree" maps an output prefix (tokens after bos) to the next-token probabilities, so the
expected hypotheses and scores below can be worked out by hand; each test says how.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from aiayn.decoding import (
    Hypothesis,
    beam_search,
    beam_step,
    greedy_search,
    length_penalty_factor,
    max_output_lengths,
    repeated_ngram_bans,
)
from aiayn.errors import ConfigError, DataError

PAD, BOS, E, A, B = 0, 1, 2, 3, 4
VOCAB = 5

Prefix = tuple[int, ...]
# (source without padding, output prefix) -> probabilities over the VOCAB tokens.
ProbsFn = Callable[[Prefix, Prefix], Sequence[float]]


@dataclass
class ScriptedState:
    sources: list[Prefix]  # each row's source, padding removed
    fed: list[Prefix]  # the tokens fed to each row so far, bos first


class ScriptedDecoder:
    """A fake :class:`IncrementalDecoder`: next-token probabilities are ``probs(source, prefix)``.

    It rebuilds each row's prefix from the tokens it is fed, so a search that loses track
    of which state row is which beam gets the wrong probabilities and fails the tests.
    """

    def __init__(self, probs: ProbsFn, *, eos_id: int = E) -> None:
        self.probs = probs
        self.eos_id = eos_id
        self.steps = 0  # number of step() calls
        self.rows = 0  # total rows over all step() calls

    def start(self, src_ids: Tensor) -> ScriptedState:
        sources = [tuple(t for t in row if t != PAD) for row in src_ids.tolist()]
        return ScriptedState(sources, [() for _ in sources])

    def step(self, tokens: Tensor, state: ScriptedState) -> Tensor:
        assert tokens.shape == (len(state.fed), 1)
        self.steps += 1
        self.rows += len(state.fed)
        out = []
        for i, token in enumerate(tokens[:, 0].tolist()):
            fed = state.fed[i] + (token,)
            # The search never feeds an eos: a finished row leaves the batch. (A dead beam, at
            # -inf, may be fed pad or bos; its probabilities never matter.)
            assert fed[0] == BOS and self.eos_id not in fed[1:], fed
            state.fed[i] = fed
            probs = torch.tensor(self.probs(state.sources[i], fed[1:]), dtype=torch.float64)
            out.append(probs.log())  # log(0) = -inf for impossible tokens
        return torch.stack(out)

    def reorder(self, state: ScriptedState, index: Tensor) -> ScriptedState:
        rows = index.tolist()
        return ScriptedState([state.sources[i] for i in rows], [state.fed[i] for i in rows])


def dist(probs: Mapping[int, float]) -> list[float]:
    """{token: probability} -> a probability list over the vocabulary."""
    assert math.isclose(sum(probs.values()), 1.0)
    return [probs.get(token, 0.0) for token in range(VOCAB)]


def tree(table: Mapping[Prefix, Mapping[int, float]], default: Mapping[int, float]) -> ProbsFn:
    """A source-independent decoder: ``table[prefix]``, or ``default`` for other prefixes."""
    return lambda source, prefix: dist(table.get(prefix, default))


def lp(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def summary(hyps: list[Hypothesis]) -> list[tuple[list[int], float, float]]:
    return [(h.tokens, h.score, h.log_prob) for h in hyps]


def expected(tokens: list[int], prob: float, alpha: float) -> tuple[list[int], float, float]:
    """(tokens, score, log_prob) of a hypothesis whose probability, eos included, is ``prob``."""
    log_prob = math.log(prob)
    return (tokens, pytest.approx(log_prob / lp(len(tokens) + 1, alpha)), pytest.approx(log_prob))


SRC = torch.tensor([[5, 6, 7]])  # any source; the trees ignore it

# Tree 1: greedy is wrong. Greedy takes A (0.5), then A (0.45), then E: P(A A E) = 0.225.
# Beam search also keeps B (0.4), and B E has P = 0.36.
TREE_1 = tree(
    {
        (): {A: 0.5, B: 0.4, E: 0.1},
        (A,): {A: 0.45, B: 0.3, E: 0.25},
        (A, A): {E: 1.0},
        (A, B): {E: 0.5, A: 0.3, B: 0.2},
        (B,): {E: 0.9, A: 0.06, B: 0.04},
    },
    default={E: 1.0},
)

# Tree 2: the length penalty changes the winner. Stopping at once, [] E, has P = 0.5; the
# longer A A E has P = 0.48 * 0.99 * 0.99 = 0.470448: worse with alpha = 0, but with
# alpha = 0.6 its penalty lp(3) = 1.188 beats lp(1) = 1: -0.7541 / 1.188 = -0.635 > -0.693.
TREE_2 = tree(
    {
        (): {E: 0.5, A: 0.48, B: 0.02},
        (A,): {A: 0.99, B: 0.01},
        (B,): {A: 0.6, B: 0.4},
        (A, A): {E: 0.99, A: 0.01},
    },
    default={E: 1.0},
)


# --- length penalty and limits ---------------------------------------------------------


def test_length_penalty_factor() -> None:
    assert length_penalty_factor(1, 0.6) == 1.0  # (5 + 1) / 6 = 1
    assert length_penalty_factor(7, 0.0) == 1.0
    assert length_penalty_factor(7, 1.0) == pytest.approx(2.0)
    assert length_penalty_factor(3, 0.6) == pytest.approx((8 / 6) ** 0.6)


def test_max_output_lengths_count_non_pad_source_tokens() -> None:
    src = torch.tensor([[5, 6, 7, 8], [5, 6, PAD, PAD], [PAD, PAD, PAD, PAD]])
    assert max_output_lengths(src, pad_id=PAD, max_len=None, max_len_a=1, max_len_b=50) == [
        54,
        52,
        50,
    ]
    assert max_output_lengths(src, pad_id=PAD, max_len=None, max_len_a=2, max_len_b=1) == [9, 5, 1]
    assert max_output_lengths(src, pad_id=PAD, max_len=7, max_len_a=2, max_len_b=1) == [7, 7, 7]


# --- beam_step ----------------------------------------------------------------------------


def test_beam_step_top_k_over_all_beams_and_tokens() -> None:
    log_probs = torch.tensor([[[-1.0, -2.0, -3.0], [-0.5, -4.0, -0.1]]])  # (B=1, K=2, V=3)
    scores = torch.tensor([[-1.0, -2.0]])
    # Totals: beam 0: -2, -3, -4; beam 1: -2.5, -6, -2.1.
    new_scores, beam, token = beam_step(log_probs, scores, num_candidates=4)
    torch.testing.assert_close(new_scores, torch.tensor([[-2.0, -2.1, -2.5, -3.0]]))
    assert beam.tolist() == [[0, 1, 1, 0]]
    assert token.tolist() == [[0, 2, 0, 1]]
    # By default K candidates.
    new_scores, beam, token = beam_step(log_probs, scores)
    assert new_scores.shape == beam.shape == token.shape == (1, 2)
    assert beam.tolist() == [[0, 1]] and token.tolist() == [[0, 2]]


def test_beam_step_first_step_has_no_duplicates() -> None:
    # At the first step all K beams hold the same state, so they give the same
    # distribution; only beam 0 is alive, so the K candidates are K different tokens.
    row = torch.tensor([-0.1, -1.0, -2.0, -3.0])
    log_probs = row.expand(2, 3, 4)  # (B=2, K=3, V=4)
    scores = torch.tensor([[0.0, -math.inf, -math.inf]] * 2)
    new_scores, beam, token = beam_step(log_probs, scores)
    assert beam.tolist() == [[0, 0, 0]] * 2
    assert token.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(new_scores, torch.tensor([[-0.1, -1.0, -2.0]] * 2))


def test_beam_step_is_batched_per_source() -> None:
    torch.manual_seed(0)
    log_probs = torch.randn(3, 2, 6).log_softmax(-1)
    scores = torch.randn(3, 2)
    batched = beam_step(log_probs, scores, num_candidates=4)
    for b in range(3):
        single = beam_step(log_probs[b : b + 1], scores[b : b + 1], num_candidates=4)
        for got, want in zip(batched, single, strict=True):
            assert torch.equal(got[b : b + 1], want)


# --- greedy search ------------------------------------------------------------------------


def test_greedy_takes_the_argmax_at_each_step() -> None:
    decoder = ScriptedDecoder(TREE_1)
    assert greedy_search(decoder, SRC) == [[A, A]]
    assert decoder.steps == 3  # A, A, then E; no more steps after the eos


def test_greedy_never_emits_pad_or_bos() -> None:
    decoder = ScriptedDecoder(tree({}, default={PAD: 0.5, BOS: 0.2, A: 0.2, E: 0.1}))
    assert greedy_search(decoder, SRC, max_len=3) == [[A, A, A]]


def test_greedy_special_ids_are_parameters() -> None:
    # With A as the eos, greedy stops at once: the most probable first token is A.
    assert greedy_search(ScriptedDecoder(TREE_1), SRC, eos_id=A) == [[]]


def test_greedy_max_length_is_a_times_source_length_plus_b() -> None:
    endless = tree({}, default={A: 0.9, E: 0.1})
    src = torch.tensor([[5, PAD, PAD], [5, 6, 7]])
    decoder = ScriptedDecoder(endless)
    assert greedy_search(decoder, src, max_len_a=2, max_len_b=1) == [[A] * 3, [A] * 7]
    assert decoder.steps == 7  # stops when the last row reaches its limit
    assert decoder.rows == 2 * 3 + 4  # the finished first row is dropped from the batch
    assert greedy_search(ScriptedDecoder(endless), src, max_len=4) == [[A] * 4, [A] * 4]
    assert greedy_search(ScriptedDecoder(endless), src, max_len=0) == [[], []]


def test_greedy_bad_source_shape() -> None:
    with pytest.raises(DataError):
        greedy_search(ScriptedDecoder(TREE_1), torch.tensor([5, 6]))


# --- beam search by hand --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_2_finds_the_sequence_greedy_misses(alpha: float) -> None:
    # Step 0: candidates A .5, B .4 | E .1 -> live A, B.
    # Step 1: B E .36 | A A .225, A B .15, A E .125 -> B E finished; live A A, A B.
    # Step 2: A A E .225, A B E .075 -> A A E finished (the beam is full, A B E is dropped).
    decoder = ScriptedDecoder(TREE_1)
    hyps = beam_search(decoder, SRC, beam_size=2, length_penalty=alpha, n_best=2)
    assert summary(hyps[0]) == [expected([B], 0.36, alpha), expected([A, A], 0.225, alpha)]
    assert decoder.steps == 3  # stopped early, long before the maximum length of 53


def test_beam_3_on_tree_1() -> None:
    # Step 0: A .5, B .4, E .1 all in the top 3 -> [] finished; live A, B (and a dead beam).
    # Step 1: B E .36, A A .225, A B .15 -> B E finished; live A A, A B, B A (.024).
    # Step 2: A A E .225, A B E .075, A B A .045 -> A A E finished; three finished, stop.
    alpha = 0.6
    hyps = beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=3, length_penalty=alpha, n_best=3)
    assert summary(hyps[0]) == [
        expected([B], 0.36, alpha),  # -1.02 / 1.097 = -0.931
        expected([A, A], 0.225, alpha),  # -1.49 / 1.188 = -1.255
        expected([], 0.1, alpha),  # -2.30 / 1 = -2.303
    ]


def test_length_penalty_changes_the_winner_beam_2() -> None:
    # Step 0: E .5, A .48 -> [] finished; live A, B.
    # Step 1: A A .4752, B A .012 -> live (no eos in the top 2).
    # Step 2: A A E .470448, B A E .012 -> A A E finished; the beam is full.
    hyps = beam_search(ScriptedDecoder(TREE_2), SRC, beam_size=2, length_penalty=0.0, n_best=2)
    assert summary(hyps[0]) == [expected([], 0.5, 0.0), expected([A, A], 0.470448, 0.0)]
    hyps = beam_search(ScriptedDecoder(TREE_2), SRC, beam_size=2, length_penalty=0.6, n_best=2)
    assert summary(hyps[0]) == [expected([A, A], 0.470448, 0.6), expected([], 0.5, 0.6)]
    # Greedy stops at once.
    assert greedy_search(ScriptedDecoder(TREE_2), SRC) == [[]]


def test_length_penalty_changes_the_winner_beam_3() -> None:
    # Step 0: E .5, A .48, B .02 -> [] finished; live A, B.
    # Step 1: A A .4752, B A .012, B B .008 -> live.
    # Step 2: A A E .470448, B A E .012, B B E .008 -> A A E, B A E finished; stop.
    hyps = beam_search(ScriptedDecoder(TREE_2), SRC, beam_size=3, length_penalty=0.0, n_best=3)
    assert summary(hyps[0]) == [
        expected([], 0.5, 0.0),
        expected([A, A], 0.470448, 0.0),
        expected([B, A], 0.012, 0.0),
    ]
    hyps = beam_search(ScriptedDecoder(TREE_2), SRC, beam_size=3, length_penalty=0.6, n_best=3)
    assert summary(hyps[0]) == [
        expected([A, A], 0.470448, 0.6),
        expected([], 0.5, 0.6),
        expected([B, A], 0.012, 0.6),
    ]


def test_n_best_returns_a_prefix_of_the_ranking() -> None:
    full = beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=3, n_best=3)[0]
    for n in (1, 2, 3):
        assert beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=3, n_best=n)[0] == full[:n]
    with pytest.raises(ConfigError):
        beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=2, n_best=3)
    with pytest.raises(ConfigError):
        beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=0)


def test_eos_ends_hypotheses_and_is_scored_but_not_returned() -> None:
    # [B] ended with E: its log-probability log(0.4 * 0.9) includes the eos, its length
    # for the penalty counts the eos (|Y| = 2), and the tokens exclude it.
    (best,) = beam_search(ScriptedDecoder(TREE_1), SRC, beam_size=2, length_penalty=1.0)[0]
    assert best.tokens == [B]
    assert best.log_prob == pytest.approx(math.log(0.36))
    assert best.score == pytest.approx(math.log(0.36) / (7 / 6))


def test_eos_can_be_any_id() -> None:
    # Swap the roles of E and B in tree 1: the same search, with B as the eos.
    swap = {E: B, B: E, A: A}

    def swapped(source: Prefix, prefix: Prefix) -> list[float]:
        probs = TREE_1(source, tuple(swap[t] for t in prefix))
        return [probs[swap.get(t, t)] for t in range(VOCAB)]

    hyps = beam_search(ScriptedDecoder(swapped, eos_id=B), SRC, beam_size=2, eos_id=B, n_best=2)
    assert summary(hyps[0]) == [expected([E], 0.36, 0.6), expected([A, A], 0.225, 0.6)]


# A chain that rarely ends, with different probabilities at each position (to avoid ties).
CHAIN = tree(
    {
        (): {A: 0.9, B: 0.09, E: 0.01},
        **{(x,): {A: 0.7, B: 0.25, E: 0.05} for x in (A, B)},
        **{(x, y): {A: 0.6, B: 0.35, E: 0.05} for x in (A, B) for y in (A, B)},
    },
    default={A: 0.6, B: 0.3, E: 0.1},
)


def test_max_length_finalises_live_beams_with_an_eos() -> None:
    # Step 0: A .9, B .09 -> live.  Step 1: A A .63, A B .225 -> live.
    # Step 2: A A A .378, A A B .2205 -> live.  Step 3 = max length: only eos is allowed,
    # the two beams end with P(E) = 0.1 counted.
    decoder = ScriptedDecoder(CHAIN)
    hyps = beam_search(decoder, SRC, beam_size=2, max_len=3, n_best=2)
    assert summary(hyps[0]) == [
        expected([A, A, A], 0.378 * 0.1, 0.6),
        expected([A, A, B], 0.2205 * 0.1, 0.6),
    ]
    assert decoder.steps == 4
    assert greedy_search(ScriptedDecoder(CHAIN), SRC, max_len=3) == [[A, A, A]]
    # The default limit is source length (3) + 50, with a and b as parameters.
    hyps = beam_search(ScriptedDecoder(CHAIN), SRC, beam_size=2, max_len_a=0, max_len_b=3)
    assert hyps[0][0].tokens == [A, A, A]
    # max_len = 0: the only hypothesis is the empty one.
    assert summary(
        beam_search(ScriptedDecoder(CHAIN), SRC, beam_size=3, max_len=0, n_best=3)[0]
    ) == [expected([], 0.01, 0.6)]


def test_beam_search_never_emits_pad_or_bos() -> None:
    decoder = ScriptedDecoder(tree({}, default={PAD: 0.5, BOS: 0.2, A: 0.2, E: 0.1}))
    hyps = beam_search(decoder, SRC, beam_size=2, max_len=2, n_best=2)[0]
    assert all(t == A for h in hyps for t in h.tokens)


def test_empty_batch() -> None:
    src = torch.empty((0, 4), dtype=torch.long)
    assert beam_search(ScriptedDecoder(TREE_1), src) == []
    assert greedy_search(ScriptedDecoder(TREE_1), src) == []


# --- random trees -------------------------------------------------------------------------


def random_tree(seed: int) -> ProbsFn:
    """Random positive probabilities for E, A, B that depend on the source and the prefix."""

    def probs(source: Prefix, prefix: Prefix) -> list[float]:
        rng = random.Random(f"{seed}/{source}/{prefix}")
        weights = {E: rng.random() * 0.5 + 0.01, A: rng.random() + 0.01, B: rng.random() + 0.01}
        total = sum(weights.values())
        return [weights.get(t, 0.0) / total for t in range(VOCAB)]

    return probs


def reference_beam_search(
    probs: ProbsFn, source: Prefix, *, beam: int, alpha: float, limit: int, n_best: int
) -> list[tuple[list[int], float, float]]:
    """The same beam search, one source at a time, in plain Python and float64.

    Each step extends every live beam by every allowed token; eos extensions among the
    best ``beam`` candidates finish (while fewer than ``beam`` are finished); the best
    ``beam`` other candidates live on. At ``limit`` tokens only eos is allowed.
    """
    live: list[tuple[Prefix, float]] = [((), 0.0)]
    finished: list[tuple[list[int], float, float]] = []
    for step in range(limit + 1):
        candidates = []
        for prefix, log_prob in live:
            p = probs(source, prefix)
            for token in (E, A, B) if step < limit else (E,):
                if p[token] > 0:
                    candidates.append((log_prob + math.log(p[token]), prefix, token))
        candidates.sort(key=lambda c: -c[0])
        for log_prob, prefix, token in candidates[:beam]:
            if token == E and len(finished) < beam:
                score = log_prob / lp(len(prefix) + 1, alpha)
                finished.append((list(prefix), score, log_prob))
        live = [(prefix + (token,), s) for s, prefix, token in candidates if token != E][:beam]
        if len(finished) == beam or not live:
            break
    finished.sort(key=lambda h: -h[1])
    return finished[:n_best]


def path_log_prob(probs: ProbsFn, source: Prefix, tokens: list[int]) -> float:
    """log P(tokens, eos) under ``probs``."""
    total = 0.0
    for i, token in enumerate([*tokens, E]):
        total += math.log(probs(source, tuple(tokens[:i]))[token])
    return total


search_cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "beam": st.integers(1, 4),
        "alpha": st.sampled_from([0.0, 0.6, 1.0, 2.0]),
        "limit": st.integers(0, 6),
    }
)


@settings(max_examples=60, deadline=None)
@given(case=search_cases, data=st.data())
def test_beam_search_matches_the_reference(case: dict, data: st.DataObject) -> None:
    n_best = data.draw(st.integers(1, case["beam"]))
    probs = random_tree(case["seed"])
    hyps = beam_search(
        ScriptedDecoder(probs),
        SRC,
        beam_size=case["beam"],
        length_penalty=case["alpha"],
        max_len=case["limit"],
        n_best=n_best,
    )[0]
    want = reference_beam_search(
        probs,
        tuple(SRC[0].tolist()),
        beam=case["beam"],
        alpha=case["alpha"],
        limit=case["limit"],
        n_best=n_best,
    )
    assert [h.tokens for h in hyps] == [tokens for tokens, _, _ in want]
    assert [h.score for h in hyps] == pytest.approx([score for _, score, _ in want])
    assert [h.log_prob for h in hyps] == pytest.approx([log_prob for _, _, log_prob in want])


@settings(max_examples=60, deadline=None)
@given(case=search_cases)
def test_hypotheses_are_sorted_and_consistent(case: dict) -> None:
    probs = random_tree(case["seed"])
    beam, alpha, limit = case["beam"], case["alpha"], case["limit"]
    hyps = beam_search(
        ScriptedDecoder(probs),
        SRC,
        beam_size=beam,
        length_penalty=alpha,
        max_len=limit,
        n_best=beam,
    )[0]
    assert 1 <= len(hyps) <= beam
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True)
    source = tuple(SRC[0].tolist())
    for h in hyps:
        assert len(h.tokens) <= limit
        assert all(t in (A, B) for t in h.tokens)
        assert h.log_prob == pytest.approx(path_log_prob(probs, source, h.tokens))
        assert h.score == pytest.approx(h.log_prob / lp(len(h.tokens) + 1, alpha))
    assert len({tuple(h.tokens) for h in hyps}) == len(hyps)  # no duplicates


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), limit=st.integers(0, 8), alpha=st.sampled_from([0.0, 0.6]))
def test_beam_1_is_greedy(seed: int, limit: int, alpha: float) -> None:
    probs = random_tree(seed)
    src = torch.tensor([[5, 6, PAD], [7, 8, 9], [5, PAD, PAD]])
    greedy = greedy_search(ScriptedDecoder(probs), src, max_len_a=1, max_len_b=limit)
    beam = beam_search(
        ScriptedDecoder(probs), src, beam_size=1, length_penalty=alpha, max_len_a=1, max_len_b=limit
    )
    assert [hyps[0].tokens for hyps in beam] == greedy


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    beam=st.integers(1, 4),
    sources=st.lists(st.lists(st.integers(5, 9), min_size=1, max_size=5), min_size=1, max_size=4),
)
def test_batched_sources_give_the_same_results_as_one_by_one(
    seed: int, beam: int, sources: list[list[int]]
) -> None:
    # The tree depends on the source, and the limit (length + 2) differs per source.
    probs = random_tree(seed)
    width = max(len(s) for s in sources)
    src = torch.tensor([s + [PAD] * (width - len(s)) for s in sources])
    options = {"max_len_a": 1, "max_len_b": 2}
    batched_beam = beam_search(ScriptedDecoder(probs), src, beam_size=beam, n_best=beam, **options)
    batched_greedy = greedy_search(ScriptedDecoder(probs), src, **options)
    for i, s in enumerate(sources):
        one = torch.tensor([s])
        assert (
            batched_beam[i]
            == beam_search(ScriptedDecoder(probs), one, beam_size=beam, n_best=beam, **options)[0]
        )
        assert batched_greedy[i] == greedy_search(ScriptedDecoder(probs), one, **options)[0]


# --------------------------------------------------------------------------- n-gram blocking


def test_repeated_ngram_bans_by_hand():
    # history A B A: the bigram that A would start again is (A, B), so B is banned.
    assert repeated_ngram_bans([A, B, A], 2) == {B}
    assert repeated_ngram_bans([A, B, A, B], 3) == {A}  # (B, A, B)... the trigram (A, B, A)
    assert repeated_ngram_bans([A, B], 3) == set()  # (B, ?) never seen with a follower
    assert repeated_ngram_bans([A, B, A], 1) == {A, B}  # unigrams: every emitted token
    assert repeated_ngram_bans([], 2) == set() and repeated_ngram_bans([A], 0) == set()


def looping(source: Prefix, prefix: Prefix) -> Sequence[float]:
    """Loops A B A B ...: 0.6 for the loop's next word, 0.3 for the other, 0.1 for eos."""
    if len(prefix) % 2 == 0:
        return [0.0, 0.0, 0.1, 0.6, 0.3]
    return [0.0, 0.0, 0.1, 0.3, 0.6]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_no_repeat_ngram_blocks_the_loop(search):
    """Free, the decoder loops A B A B ... With bigram blocking, by hand (greedy): A, B, A; then
    B would repeat (A, B), so A (0.3 beats eos's 0.1); then both A and B would repeat a bigram
    starting with A, (A, B) and (A, A): eos. Beam search may find other outputs, but none
    repeats a bigram."""
    src = torch.tensor([[A, A]])
    if search == "greedy":
        free = greedy_search(ScriptedDecoder(looping), src, max_len=8)[0]
        blocked = greedy_search(ScriptedDecoder(looping), src, max_len=8, no_repeat_ngram_size=2)[0]
        assert blocked == [A, B, A, A]
    else:
        free = beam_search(ScriptedDecoder(looping), src, beam_size=2, max_len=8)[0][0].tokens
        blocked = beam_search(
            ScriptedDecoder(looping), src, beam_size=2, max_len=8, no_repeat_ngram_size=2
        )[0][0].tokens
    assert free == [A, B, A, B, A, B, A, B]
    bigrams = list(zip(blocked, blocked[1:], strict=False))
    assert len(bigrams) == len(set(bigrams)), blocked
