"""Checks that need a CUDA GPU: the fixed-shape searches replayed as CUDA graphs.

Skipped on machines without one (this project's CI); `bench/gpu.sh` runs them first on the
GPU machine. On a CPU the same searches run eagerly and are tested in test_decoding_model.py;
here the captured graphs must give the reference searches' outputs, batch after batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aiayn.config import TransformerConfig
from aiayn.decoding import TransformerDecoder, beam_search, greedy_search, translate_ids
from aiayn.model import Transformer
from aiayn.static_decoding import StaticDecoding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAD, BOS, EOS, VOCAB = 0, 1, 2, 16


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A tiny model trained for 60 steps to copy its source (varied output lengths), float64
    on the GPU so that the two searches cannot break a tie differently."""
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=VOCAB)
    model = Transformer(cfg).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    for _ in range(60):
        src = torch.randint(3, VOCAB, (32, 6), device="cuda")
        bos = torch.full((32, 1), BOS, device="cuda")
        eos = torch.full((32, 1), EOS, device="cuda")
        logits = model(src, torch.cat([bos, src], dim=1))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat([src, eos], 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


def batches() -> list[torch.Tensor]:
    """Batches of different sizes and lengths, some in the same shape bucket."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for rows, length in ((3, 6), (5, 7), (8, 6), (2, 12), (3, 6)):
        src = torch.randint(3, VOCAB, (rows, length), generator=generator)
        src[0, length // 2 :] = PAD  # one padded row per batch
        out.append(src.cuda())
    return out


def summary(results):
    return [[(h.tokens, round(h.score, 9)) for h in hyps] for hyps in results]


def test_graphed_greedy_and_beam_equal_the_reference(model: Transformer) -> None:
    search = StaticDecoding(model)
    assert search.cuda_graphs
    for src in batches():
        for options in (dict(max_len_b=8), dict(max_len=5, min_len=3), dict(max_len=0)):
            reference = greedy_search(TransformerDecoder(model), src, **options)
            assert search.greedy(src, **options) == reference
            reference = beam_search(TransformerDecoder(model), src, n_best=4, **options)
            assert summary(search.beam(src, n_best=4, **options)) == summary(reference)
    assert len(search._plans) == 4  # the least recently used shapes were dropped


def test_translate_ids_uses_the_graphs_on_a_gpu(model: Transformer) -> None:
    src = batches()[1]
    reference = translate_ids(model, src, static=False)
    assert translate_ids(model, src) == reference
    assert model._static_decoding.cuda_graphs


def test_bfloat16_graphs_decode_the_forced_length() -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig.from_preset("tiny", vocab_size=VOCAB)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    src = batches()[2]
    search = StaticDecoding(model)
    assert [len(o) for o in search.greedy(src, max_len=9, min_len=9)] == [9] * src.size(0)
    for hyps in search.beam(src, max_len=9, min_len=9, n_best=4):
        assert [len(h.tokens) for h in hyps] == [9] * 4


def test_graphs_of_every_window_and_buffer_equal_the_reference(
    model: Transformer, monkeypatch
) -> None:
    """Windows of 2, 4, 8, ... positions (16, 32, ... by default): a graph per window reached
    and, for beam search, per buffer, captured at its first step (run eagerly) and replayed at
    the later ones, batch after batch."""
    from aiayn import static_decoding

    monkeypatch.setattr(static_decoding, "_FIRST_WINDOW", 2)
    search = StaticDecoding(model)
    options = dict(max_len_b=8)
    for src in [*batches(), batches()[0]]:
        assert search.greedy(src, **options) == greedy_search(
            TransformerDecoder(model), src, **options
        )
        reference = beam_search(TransformerDecoder(model), src, n_best=4, **options)
        assert summary(search.beam(src, n_best=4, **options)) == summary(reference)
    beam_plans = [p for p in search._plans.values() if p.beam > 1]
    assert beam_plans
    for plan in beam_plans:
        windows = {w for w, _ in plan.graphs}
        assert len(windows) >= 3 and windows <= set(plan.windows)
        assert {parity for _, parity in plan.graphs} == {0, 1}
    # The same batch again: every step replays a graph, none is captured.
    captured = {id(p): len(p.graphs) for p in search._plans.values()}
    src = batches()[0]
    search.greedy(src, **options)
    search.beam(src, n_best=4, **options)
    assert {id(p): len(p.graphs) for p in search._plans.values()} == captured
