"""Greedy and beam search on a real Transformer, through :class:`TransformerDecoder`.

The search itself is tested against hand-computed probabilities in ``test_decoding.py``;
these tests check the model adapter: that the key/value cache, the reordering of beams and
the padding of a batch give the same outputs and log-probabilities as recomputing a full
forward pass, and that the model's limits (eval mode, ``max_len``) are respected.

A random model is a poor test subject: it often emits eos at once or repeats one token, so
most tests use a tiny model trained for a few dozen steps to copy its source. Half-trained,
it gives outputs of varied lengths (some ending in eos, some reaching the length limit) and
beams that genuinely compete.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from aiayn import static_decoding
from aiayn.config import TransformerConfig
from aiayn.decoding import (
    Hypothesis,
    TransformerDecoder,
    beam_search,
    greedy_search,
    length_penalty_factor,
    max_output_lengths,
    release_static_decoding,
    static_decoding_of,
    translate_ids,
)
from aiayn.errors import ConfigError
from aiayn.model import Transformer
from aiayn.static_decoding import StaticDecoding, StaticKVCache

PAD, BOS, EOS = 0, 1, 2
VOCAB = 16  # words are 3 .. 15
MAX_LEN_B = 10  # outputs of at most source length + 10 tokens keep the tests fast

# A padded batch of three sources of different lengths.
SRC = torch.tensor(
    [
        [5, 6, 7, 8, 9, 10],
        [3, 4, 5, PAD, PAD, PAD],
        [11, 12, 13, 14, PAD, PAD],
    ]
)


def tiny_config(**overrides) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run this module's tiny models on one CPU thread, then restore the setting.

    Matrices of 32 x 64 gain nothing from intra-op threads, and on a busy machine the
    threads' spin-waiting made the training fixture ~100x slower (50 s instead of 0.5 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A tiny model trained for 40 seeded steps to copy sources of 6 words (in eval mode)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    for _ in range(40):
        src = torch.randint(3, VOCAB, (32, 6))
        tgt_in = torch.cat([torch.full((32, 1), BOS), src], dim=1)  # bos + copy
        tgt_out = torch.cat([src, torch.full((32, 1), EOS)], dim=1)  # copy + eos
        loss = nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def unpadded(row: Tensor) -> Tensor:
    """A (S,) source row -> (1, S') without its padding."""
    return row[row.ne(PAD)].unsqueeze(0)


def limit_of(row: Tensor, max_len_a: int = 1, max_len_b: int = MAX_LEN_B) -> int:
    return max_len_a * int(row.ne(PAD).sum()) + max_len_b


@torch.no_grad()
def naive_greedy(model: Transformer, src: Tensor, limit: int) -> list[int]:
    """Greedy search without a cache: a full forward pass of the whole prefix at each step.

    Args:
        src: (1, S) one source, unpadded.
        limit: the most tokens to emit before stopping (eos excluded).
    """
    prefix = [BOS]
    while len(prefix) - 1 < limit:
        log_probs = model(src, torch.tensor([prefix]))[0, -1].log_softmax(-1)  # (V,)
        log_probs[[PAD, BOS]] = float("-inf")  # the search never emits them
        token = int(log_probs.argmax())
        if token == EOS:
            break
        prefix.append(token)
    return prefix[1:]


@torch.no_grad()
def full_log_prob(model: Transformer, src: Tensor, tokens: list[int]) -> float:
    """log P(tokens + eos | src) from one teacher-forced forward pass; src is (1, S)."""
    tgt_in = torch.tensor([[BOS, *tokens]])
    targets = torch.tensor([[*tokens, EOS]])
    log_probs = model(src, tgt_in).log_softmax(-1)  # (1, T, V)
    return float(log_probs.gather(-1, targets.unsqueeze(-1)).sum())


def summary(hyps: list[Hypothesis]) -> list[tuple[list[int], float, float]]:
    return [
        (h.tokens, pytest.approx(h.score, abs=1e-4), pytest.approx(h.log_prob, abs=1e-4))
        for h in hyps
    ]


# --- greedy -------------------------------------------------------------------------------


def test_cached_greedy_equals_naive_greedy_on_a_padded_batch(model: Transformer) -> None:
    outputs = greedy_search(TransformerDecoder(model), SRC, max_len_b=MAX_LEN_B)
    for row, output in zip(SRC, outputs, strict=True):
        assert output == naive_greedy(model, unpadded(row), limit_of(row))
    # Not a degenerate case: real outputs, one ending at its eos and one at its limit.
    lengths = [len(output) for output in outputs]
    assert min(lengths) > 1
    assert any(length < limit_of(row) for row, length in zip(SRC, lengths, strict=True))
    assert any(length == limit_of(row) for row, length in zip(SRC, lengths, strict=True))


def test_beam_size_1_is_greedy(model: Transformer) -> None:
    decoder = TransformerDecoder(model)
    greedy = greedy_search(decoder, SRC, max_len_b=MAX_LEN_B)
    beam = beam_search(decoder, SRC, beam_size=1, max_len_b=MAX_LEN_B)
    assert [hyps[0].tokens for hyps in beam] == greedy
    assert translate_ids(model, SRC, beam_size=1, max_len_b=MAX_LEN_B) == greedy


# --- beam search --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_len_a", "max_len_b"),
    [(1, MAX_LEN_B), (0, 3)],  # (0, 3): every source reaches its limit and is given an eos
)
def test_hypothesis_log_prob_is_the_full_forward_log_prob(
    model: Transformer, max_len_a: int, max_len_b: int
) -> None:
    alpha = 0.6
    results = beam_search(
        TransformerDecoder(model),
        SRC,
        beam_size=4,
        n_best=4,
        length_penalty=alpha,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
    )
    for row, hyps in zip(SRC, results, strict=True):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4  # four different hypotheses
        for h in hyps:
            assert len(h.tokens) <= limit_of(row, max_len_a, max_len_b)
            if max_len_a == 0:  # the half-trained model does not stop within 3 tokens
                assert len(h.tokens) == max_len_b
            assert not {PAD, BOS, EOS} & set(h.tokens)
            assert h.log_prob == pytest.approx(
                full_log_prob(model, unpadded(row), h.tokens), abs=1e-4
            )
            assert h.score == pytest.approx(
                h.log_prob / length_penalty_factor(len(h.tokens) + 1, alpha)
            )


def test_batched_beam_search_equals_one_source_at_a_time(model: Transformer) -> None:
    decoder = TransformerDecoder(model)
    batched = beam_search(decoder, SRC, beam_size=4, n_best=4, max_len_b=MAX_LEN_B)
    for row, hyps in zip(SRC, batched, strict=True):
        [alone] = beam_search(decoder, unpadded(row), beam_size=4, n_best=4, max_len_b=MAX_LEN_B)
        assert summary(hyps) == summary(alone)


def test_translate_ids_returns_the_best_hypothesis(model: Transformer) -> None:
    best = [
        hyps[0].tokens
        for hyps in beam_search(TransformerDecoder(model), SRC, beam_size=4, max_len_b=MAX_LEN_B)
    ]
    assert translate_ids(model, SRC, max_len_b=MAX_LEN_B) == best


# --- the decoder adapter ------------------------------------------------------------------


def test_step_accepts_pad_and_bos_and_rows_are_independent(model: Transformer) -> None:
    # The search may feed pad or bos to a dead beam; that row's output is ignored, but the
    # step must not fail, and it must not change the other rows.
    decoder = TransformerDecoder(model)
    state = decoder.start(SRC)
    decoder.step(torch.full((3, 1), BOS), state)
    log_probs = decoder.step(torch.tensor([[PAD], [BOS], [7]]), state)  # (3, V)
    assert log_probs.shape == (3, VOCAB) and log_probs.dtype == torch.float32
    assert torch.isfinite(log_probs).all()
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))
    with torch.no_grad():
        expected = model(unpadded(SRC[2]), torch.tensor([[BOS, 7]]))[0, -1].log_softmax(-1)
    torch.testing.assert_close(log_probs[2], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_log_probs_are_at_least_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).to(dtype).eval()
    decoder = TransformerDecoder(model)
    log_probs = decoder.step(torch.full((3, 1), BOS), decoder.start(SRC))
    assert log_probs.dtype == torch.promote_types(dtype, torch.float32)


def test_a_decoder_only_model_or_another_pad_id_is_refused() -> None:
    lm = Transformer(tiny_config(n_encoder_layers=0))
    with pytest.raises(ConfigError, match="encoder-decoder"):
        TransformerDecoder(lm)
    for static in (None, True, False):  # the same message whichever search would run
        with pytest.raises(ConfigError, match="translate_ids needs an encoder-decoder model, and"):
            translate_ids(lm, SRC, static=static)
    with pytest.raises(ConfigError, match="pad_id"):
        translate_ids(Transformer(tiny_config()), SRC, pad_id=3)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(eos_id=VOCAB), rf"eos_id={VOCAB} is not a token id of the model's target vocabulary \[0, {VOCAB}\)"),
        (dict(bos_id=-1), r"bos_id=-1 is not a token id"),
        (dict(max_len_a=0.5), r"max_len_a must be an integer, got 0.5"),
        (dict(beam_size=2.5), r"beam_size must be an integer, got 2.5"),
    ],
)  # fmt: skip
def test_search_settings_that_are_not_token_ids_or_integers_are_refused(
    model, arguments, message
) -> None:
    """An eos the model cannot emit left beam search with no hypothesis at all (empty
    outputs); a float length failed deep inside the fixed-shape search."""
    for static in (True, False):
        with pytest.raises(ConfigError, match=message):
            translate_ids(model, SRC, static=static, **arguments)
    decoder = TransformerDecoder(model)
    with pytest.raises(ConfigError, match=r"pad_id=60 is not a token id"):
        greedy_search(decoder, SRC, pad_id=60)
    with pytest.raises(ConfigError, match=r"eos_id=-1 is not a token id"):
        beam_search(decoder, SRC, eos_id=-1)
    assert greedy_search(decoder, SRC, eos_id=torch.tensor(EOS).item())  # int-like: fine


# --- eval mode ----------------------------------------------------------------------------


def test_translate_ids_runs_in_eval_mode_and_restores_the_modes() -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_config(dropout=0.5))
    model.eval()
    expected = greedy_search(TransformerDecoder(model), SRC, max_len_b=5)

    # A mixed state: training, except for a frozen encoder.
    model.train()
    model.encoder.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    for beam_size in (1, 2, 1, 2):
        # With dropout at 0.5 in train mode the outputs would vary from call to call.
        outputs = translate_ids(model, SRC, beam_size=beam_size, max_len_b=5)
        if beam_size == 1:
            assert outputs == expected
        assert {name: module.training for name, module in model.named_modules()} == modes

    # Restored even when the search raises.
    with pytest.raises(ConfigError, match="beam_size"):
        translate_ids(model, SRC, beam_size=0)
    assert {name: module.training for name, module in model.named_modules()} == modes

    model.eval()
    translate_ids(model, SRC, max_len_b=5)
    assert not any(module.training for module in model.modules())


# --- the max_len cap ----------------------------------------------------------------------


@pytest.fixture
def eos_averse_model() -> Transformer:
    """A random model with max_len=10 that never emits eos unless the search forces it."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(max_len=10, output_bias=True)).eval()
    with torch.no_grad():
        model.generator.bias[EOS] = -1e4
    return model


def test_output_length_is_capped_so_bos_output_eos_fit_in_max_len(
    eos_averse_model: Transformer,
) -> None:
    model = eos_averse_model
    src = torch.tensor([[3] * 10, [4, 5, 6] + [PAD] * 7])  # the longest source that fits
    decoder = TransformerDecoder(model)
    assert decoder.max_output_length == 8
    # max_len_b=50 asks for 53 and 60 tokens; 8 (+ bos + eos = 10 positions) is the most.
    for beam_size in (1, 4):
        outputs = translate_ids(model, src, beam_size=beam_size, max_len_b=50)
        assert [len(output) for output in outputs] == [8, 8]
    # The cap also holds when the search is called directly, and over an explicit max_len.
    assert [len(o) for o in greedy_search(decoder, src, max_len=50)] == [8, 8]
    results = beam_search(decoder, src, beam_size=3, n_best=3, max_len_b=50)
    assert all(len(h.tokens) == 8 for hyps in results for h in hyps)


def test_max_output_lengths_cap() -> None:
    src = torch.tensor([[5, 6, 7], [5, PAD, PAD]])
    lengths = dict(pad_id=PAD, max_len_a=1, max_len_b=50)
    assert max_output_lengths(src, max_len=None, cap=8, **lengths) == [8, 8]
    assert max_output_lengths(src, max_len=None, cap=52, **lengths) == [52, 51]
    assert max_output_lengths(src, max_len=100, cap=8, **lengths) == [8, 8]
    assert max_output_lengths(src, max_len=None, cap=-1, **lengths) == [0, 0]


# --- fixed shapes: aiayn.static_decoding --------------------------------------------------
# The same searches with a preallocated cache and the bookkeeping on the device (one CUDA
# graph per step on a GPU). The reference searches define the results: equal in float64.

STATIC_CASES = [
    dict(max_len_b=MAX_LEN_B),
    dict(max_len_a=0, max_len_b=3),  # every source reaches its limit
    dict(max_len=7, min_len=4),
    dict(max_len_b=MAX_LEN_B, min_len=30),  # min_len above the limits: the limits win
    dict(max_len=0),
]


@pytest.fixture(scope="module")
def model64(model: Transformer) -> Transformer:
    """The trained model in float64, where rounding cannot break ties differently."""
    return copy.deepcopy(model).double()


def outputs_and_scores(results: list[list[Hypothesis]]) -> list[list[tuple]]:
    return [[(h.tokens, round(h.score, 9), round(h.log_prob, 9)) for h in hyps] for hyps in results]


# frozen: the CPU's decoder step (aiayn.frozen_decoder); not frozen: the model's own modules,
# the step a GPU captures.
FROZEN = pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "modules"])


@FROZEN
@pytest.mark.parametrize("options", STATIC_CASES)
def test_static_greedy_equals_the_reference(
    model64: Transformer, options: dict, frozen: bool
) -> None:
    expected = greedy_search(TransformerDecoder(model64), SRC, **options)
    assert StaticDecoding(model64, frozen=frozen).greedy(SRC, **options) == expected


@FROZEN
@pytest.mark.parametrize("options", STATIC_CASES)
@pytest.mark.parametrize("beam_size", [2, 4])
def test_static_beam_equals_the_reference(
    model64: Transformer, options: dict, beam_size: int, frozen: bool
) -> None:
    search = dict(beam_size=beam_size, n_best=beam_size, length_penalty=0.6, **options)
    expected = beam_search(TransformerDecoder(model64), SRC, **search)
    got = StaticDecoding(model64, frozen=frozen).beam(SRC, **search)
    assert outputs_and_scores(got) == outputs_and_scores(expected)


@pytest.mark.parametrize("double_buffered", [True, False], ids=["two-buffers", "one-buffer"])
def test_beam_cache_reorders_into_its_other_buffer(
    model64: Transformer, double_buffered: bool, monkeypatch
) -> None:
    """The modules' beam search (the step a GPU captures) keeps two self-attention caches and
    gathers each step's reordered rows into the other one; one buffer reordered in place (the
    before row of bench/decode_throughput.py) gives the same results, and so does a second
    batch that starts on whichever buffer the first one left current."""
    monkeypatch.setattr(StaticKVCache, "double_buffered", double_buffered)
    search = StaticDecoding(model64, frozen=False)
    options = dict(beam_size=3, n_best=3, length_penalty=0.6, max_len_b=MAX_LEN_B)
    parities = []
    for src in (SRC, SRC[[2, 0, 1]], SRC):
        expected = beam_search(TransformerDecoder(model64), src, **options)
        got = search.beam(src, **options)
        assert outputs_and_scores(got) == outputs_and_scores(expected)
        (plan,) = search._plans.values()
        parities.append(plan.state.cache.parity)
    cache = plan.state.cache
    assert len(cache._buffers) == len(plan.state.histories) == (2 if double_buffered else 1)
    assert cache.self_kv is cache._buffers[cache.parity]
    # The histories follow the cache's buffers: the current one is the parity's.
    assert plan.state.history is plan.state.histories[cache.parity % len(cache._buffers)]
    assert cache.layers[0].self_k.data_ptr() == cache.self_kv.data_ptr()
    # Greedy search never reorders: one buffer whatever the setting.
    search.greedy(SRC, max_len=5)
    greedy_plan = next(p for p in search._plans.values() if p.beam == 1)
    assert len(greedy_plan.state.cache._buffers) == 1
    if double_buffered:  # each step flips the parity: some batch ended on the second buffer
        assert 1 in parities
    else:
        assert parities == [0, 0, 0]


@pytest.mark.parametrize("shares_memory", [True, False], ids=["shared", "repeated"])
def test_beams_share_their_sources_cross_attention_keys_and_values(
    model64: Transformer, shares_memory: bool, monkeypatch
) -> None:
    """The modules' beam search keeps the memory's keys and values once per source, read by
    its K rows together (a copy per row: the before row of bench/decode_throughput.py); the
    same results either way, on a padded batch, and greedy search has one row per source."""
    monkeypatch.setattr(StaticKVCache, "shares_memory", shares_memory)
    search = StaticDecoding(model64, frozen=False)
    options = dict(beam_size=3, n_best=3, length_penalty=0.6, max_len_b=MAX_LEN_B)
    expected = beam_search(TransformerDecoder(model64), SRC, **options)
    assert outputs_and_scores(search.beam(SRC, **options)) == outputs_and_scores(expected)
    (plan,) = search._plans.values()
    cache, rows = plan.state.cache, plan.batch * plan.beam
    sources = plan.batch if shares_memory else rows
    assert cache.beams == (3 if shares_memory else 1)
    assert cache.cross_kv.size(2) == sources and cache.memory_mask.size(0) == sources
    assert cache.layers[0].cross_k.size(0) == sources
    # Each source's padding mask: one row, or one per beam (SRC's lengths: 6, 3 and 4).
    lengths = cache.memory_mask.view(sources, -1).sum(-1)
    assert lengths[:: 1 if shares_memory else 3][:3].tolist() == [6, 3, 4]


@pytest.mark.parametrize("double_buffered", [True, False], ids=["two-buffers", "one-buffer"])
def test_steps_attend_over_growing_windows_of_the_cache(
    model64: Transformer, double_buffered: bool, monkeypatch
) -> None:
    """Step t attends over (and beam search reorders) the smallest window of positions that
    holds 0 .. t: here windows of 2, 4, 8, ... positions (16, 32, ... by default), the
    results still those of the reference searches."""
    monkeypatch.setattr(static_decoding, "_FIRST_WINDOW", 2)
    monkeypatch.setattr(StaticKVCache, "double_buffered", double_buffered)
    assert static_decoding._windows(13) == [2, 4, 8, 13]
    assert static_decoding._windows(2) == [2] and static_decoding._windows(1) == [1]
    seen = []
    extend = static_decoding.StaticLayerCache.extend

    def recording_extend(self, k, v):
        keys, values, mask = extend(self, k, v)
        seen.append((int(self.position), keys.size(2), values.size(2), mask.size(-1)))
        return keys, values, mask

    monkeypatch.setattr(static_decoding.StaticLayerCache, "extend", recording_extend)
    search = StaticDecoding(model64, frozen=False)
    for src in (SRC, SRC[[1, 2, 0]]):
        for options in (dict(max_len_b=MAX_LEN_B), dict(max_len=7, min_len=4)):
            assert search.greedy(src, **options) == greedy_search(
                TransformerDecoder(model64), src, **options
            )
            beam = dict(beam_size=3, n_best=3, length_penalty=0.6, **options)
            expected = beam_search(TransformerDecoder(model64), src, **beam)
            assert outputs_and_scores(search.beam(src, **beam)) == outputs_and_scores(expected)
    windows = {w for _, w, _, _ in seen}
    assert {2, 4, 8} <= windows  # small windows used, and ...
    for t, keys, values, mask in seen:  # ... each the smallest that holds positions 0 .. t
        assert keys == values == mask and t < keys and (keys == 2 or t >= keys // 2)


class RecordedStep:
    """A stand-in for a CUDA graph on a CPU: what `_Plan.step` does with graphs, checked on
    the host. Capturing records which window and buffer the step was captured for and runs
    nothing (as a capture runs nothing); replaying checks that it is replayed for those, runs
    the step, and undoes the step's host-side effect (the parity flip, which a real replay
    does not make: `_Plan.step` makes it)."""

    def __init__(self, step) -> None:
        self.step, self.cache = step, step.__self__.state.cache
        self.key = (self.cache.window, self.cache.parity)
        self.replays = 0

    def replay(self) -> None:
        assert (self.cache.window, self.cache.parity) == self.key
        self.step()
        self.cache.parity = self.key[1]
        self.replays += 1

    def pool(self) -> str:
        return "pool"


def test_graphs_are_captured_at_first_use_and_replayed_after(
    model64: Transformer, monkeypatch
) -> None:
    """With graphs (a stand-in here), the first step of each (window, buffer) runs eagerly and
    is captured, the later ones replay it: the same results as the reference searches, one
    graph per window and buffer reached, none captured again for a batch of a known shape."""
    monkeypatch.setattr(static_decoding, "_FIRST_WINDOW", 2)
    pools = []

    def record(step, pool):
        pools.append(pool)
        return RecordedStep(step)

    monkeypatch.setattr(static_decoding, "_cuda_graph", record)
    search = StaticDecoding(model64, frozen=False)
    monkeypatch.setattr(search, "cuda_graphs", True)  # rows rounded up to 8, as on a GPU
    options = dict(max_len_b=MAX_LEN_B)
    beam = dict(beam_size=3, n_best=3, length_penalty=0.6, **options)
    for src in (SRC, SRC[[2, 0, 1]], SRC[:2]):
        assert search.greedy(src, **options) == greedy_search(
            TransformerDecoder(model64), src, **options
        )
        expected = beam_search(TransformerDecoder(model64), src, **beam)
        assert outputs_and_scores(search.beam(src, **beam)) == outputs_and_scores(expected)
    greedy_plan, beam_plan = sorted(search._plans.values(), key=lambda p: p.beam)
    assert len(search._plans) == 2  # every batch rounded up to 8 rows: one shape per search
    # Greedy: one buffer; beam: both buffers of every window it reached.
    assert {parity for _, parity in greedy_plan.graphs} == {0}
    for plan in (greedy_plan, beam_plan):
        reached = {w for w, _ in plan.graphs}
        assert len(reached) >= 3 and reached <= set(plan.windows)
    assert {p for _, p in beam_plan.graphs} == {0, 1} and len(beam_plan.graphs) >= 6
    # Every graph but those of the longest window reached (perhaps at one step only) replayed.
    longest = max(w for w, _ in beam_plan.graphs)
    assert all(g.replays > 0 for (w, _), g in beam_plan.graphs.items() if w < longest)
    # One pool per plan: its first capture makes it, every later one shares it.
    assert pools[0] is None and pools.count(None) == 2 and set(pools) == {None, "pool"}
    captured = len(pools)
    search.beam(SRC, **beam)
    search.greedy(SRC, **options)
    assert len(pools) == captured


@FROZEN
def test_static_searches_take_empty_batches_and_empty_sources(
    model64: Transformer, frozen: bool
) -> None:
    """An empty batch gives no outputs; a source made only of padding (an empty sentence) gets
    what the reference search gives it (the CPU's encoder computes such a row whole)."""
    search = StaticDecoding(model64, frozen=frozen)
    empty = torch.zeros((0, 4), dtype=torch.long)
    assert search.greedy(empty) == greedy_search(TransformerDecoder(model64), empty) == []
    assert search.beam(empty) == []
    src = torch.cat([SRC, torch.full((1, SRC.size(1)), PAD)])
    assert search.greedy(src, max_len=6) == greedy_search(
        TransformerDecoder(model64), src, max_len=6
    )
    expected = beam_search(TransformerDecoder(model64), src, n_best=2, max_len=6)
    got = search.beam(src, n_best=2, max_len=6)
    assert outputs_and_scores(got) == outputs_and_scores(expected)


@pytest.mark.parametrize("seed", range(8))
def test_static_searches_equal_the_reference_on_random_inputs(seed: int) -> None:
    """Differential check over random models, batches (empty sources included, lengths not a
    multiple of the rounding) and search options, float64, both kinds of step. Before
    f2891ed it found a source made only of padding decoded differently (71 of 240 cases)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(6):
        vocab = rng.choice([11, 29, 70])
        norm = rng.choice(["post", "pre"])
        model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=vocab, norm=norm))
        with torch.no_grad():  # larger weights than at initialisation: sharper choices
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        model = model.double().eval()
        B, S = rng.randint(1, 5), rng.randint(1, 10)
        src = torch.randint(3, vocab, (B, S))
        for row in range(B):
            src[row, rng.randint(0, S) :] = PAD
        options = dict(max_len_b=rng.choice([3, 8]), min_len=rng.choice([0, 2, 6]))
        if rng.random() < 0.5:
            options["max_len"] = rng.choice([0, 1, 5, 12])
        beam = dict(beam_size=rng.choice([2, 3, 4]), length_penalty=0.6)
        beam["n_best"] = rng.randint(1, beam["beam_size"])
        greedy_ref = greedy_search(TransformerDecoder(model), src, **options)
        beam_ref = beam_search(TransformerDecoder(model), src, **beam, **options)
        for frozen in (True, False):
            search = StaticDecoding(model, frozen=frozen)
            assert search.greedy(src, **options) == greedy_ref, (frozen, options, src)
            got = search.beam(src, **beam, **options)
            assert outputs_and_scores(got) == outputs_and_scores(beam_ref), (frozen, options, src)


def test_static_plans_are_reused_and_reset_between_batches(model64: Transformer) -> None:
    search = StaticDecoding(model64)
    other = torch.tensor([[7, 8, 9, PAD, PAD], [4, 4, 4, 4, PAD], [9, 9, PAD, PAD, PAD]])
    plans = []
    for src in (SRC, other, SRC[:1], SRC):
        expected = beam_search(TransformerDecoder(model64), src, n_best=2, max_len=9)
        assert outputs_and_scores(search.beam(src, n_best=2, max_len=9)) == outputs_and_scores(
            expected
        )
        assert search.greedy(src, max_len=9) == greedy_search(
            TransformerDecoder(model64), src, max_len=9
        )
        plans.append(list(search._plans.values()))
    # On a CPU the batch is not rounded up (a GPU rounds it to 8 rows: tests/test_gpu.py), the
    # source length is (to 8): batches of 3 rows and 5-6 positions share one plan per search.
    assert len(plans[0]) == 2 and plans[1] == plans[0] and set(plans[0]) < set(plans[3])
    # Rows: one per source for greedy, beam_size (4) per source for beam search.
    assert {len(p.state.last) for p in plans[2]} == {1, 3, 1 * 4, 3 * 4}


def test_translate_ids_static_gives_the_same_translations(model: Transformer) -> None:
    release_static_decoding(model)  # what earlier greedy translate_ids calls kept (CPU default)
    for beam_size in (1, 4):
        reference = translate_ids(model, SRC, beam_size=beam_size, static=False)
        assert translate_ids(model, SRC, beam_size=beam_size, static=True) == reference
    kept = static_decoding_of(model)
    assert translate_ids(model, SRC, static=True) and static_decoding_of(model) is kept
    assert len(kept._plans) == 2  # greedy and beam: reused by every later call
    release_static_decoding(model)  # what validation during training does afterwards
    assert static_decoding_of(model) is not kept
    release_static_decoding(model)
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        translate_ids(model, SRC, static=True, no_repeat_ngram_size=3)


def test_static_decoding_refuses_what_it_cannot_do(model: Transformer) -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        StaticDecoding(model, cuda_graphs=True)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        StaticDecoding(Transformer(tiny_config(n_encoder_layers=0)))
    with pytest.raises(ConfigError, match="beam_size"):
        StaticDecoding(model).beam(SRC, beam_size=1)
    with pytest.raises(ConfigError, match="pad_id"):
        StaticDecoding(model).greedy(SRC, pad_id=3)


def test_min_len_bans_eos_below_it(model: Transformer) -> None:
    """min_len (both searches): no output shorter than it, unless its limit is shorter."""
    decoder = TransformerDecoder(model)
    short = greedy_search(decoder, SRC, max_len_b=MAX_LEN_B)
    assert min(len(o) for o in short) < 9  # without it, some outputs are shorter
    longer = greedy_search(decoder, SRC, max_len_b=MAX_LEN_B, min_len=9)
    assert all(len(o) >= 9 for o in longer)
    assert [len(o) for o in greedy_search(decoder, SRC, max_len=5, min_len=9)] == [5, 5, 5]
    for hyps in beam_search(decoder, SRC, n_best=4, max_len_b=MAX_LEN_B, min_len=9):
        assert hyps and all(len(h.tokens) >= 9 for h in hyps)


@pytest.mark.parametrize(("cuda_graphs", "static"), [(True, None), (False, False)])
def test_decode_cuda_graphs_chooses_the_search(monkeypatch, cuda_graphs: bool, static) -> None:
    """decode.cuda_graphs: true lets translate_ids pick the fixed-shape search on a GPU;
    false keeps the reference search everywhere."""
    from aiayn.data.tokenizer import Tokenizer
    from aiayn.tasks import translation

    seen = []
    monkeypatch.setattr(
        translation, "translate_ids", lambda *args, **kw: seen.append(kw["static"]) or [[]]
    )
    tokenizer = Tokenizer.train(["a b c d"] * 5, vocab_size=40, min_frequency=1)
    model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
    decode = translation.DecodeConfig(cuda_graphs=cuda_graphs)
    translation.Translator(model, tokenizer, decode).translate(["a b"])
    assert seen == [static]


@FROZEN
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
@pytest.mark.parametrize("shared", [True, False])
def test_static_search_on_every_model_layout(
    norm: str, positions: str, shared: bool, frozen: bool
) -> None:
    """Pre-LN's final norm, learned positions (looked up by a device tensor), separate
    vocabularies and an output bias: the fixed-shape step goes through each of them."""
    torch.manual_seed(0)
    options = dict(norm=norm, positions=positions, output_bias=True)
    if shared:
        cfg = TransformerConfig.from_preset("tiny", vocab_size=30, **options)
    else:
        cfg = TransformerConfig.from_preset(
            "tiny", src_vocab_size=30, tgt_vocab_size=23, shared_vocab=False,
            tie_embeddings=False, **options,
        )  # fmt: skip
    model = Transformer(cfg).double().eval()
    src = torch.randint(3, 30, (3, 11), generator=torch.Generator().manual_seed(1))
    src[2, 5:] = PAD
    search = StaticDecoding(model, frozen=frozen)
    assert search.greedy(src, max_len=15) == greedy_search(
        TransformerDecoder(model), src, max_len=15
    )
    expected = beam_search(TransformerDecoder(model), src, n_best=3, max_len=15)
    assert outputs_and_scores(search.beam(src, n_best=3, max_len=15)) == outputs_and_scores(
        expected
    )
