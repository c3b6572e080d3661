"""The CTranslate2 peer of the decoding benchmark (bench/ctranslate2_peer.py).

An aiayn model written in CTranslate2's format is the same function: the log-probability CTranslate2
gives every target token equals aiayn's (float32, to rounding), for the benchmark's model and for
the other options the converter carries (pre-LN, learned positions, GELU, an output bias); and
its forced-length searches give aiayn's greedy outputs and the lengths the benchmark needs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ctranslate2")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiayn.model import Transformer  # noqa: E402
from bench import common, ctranslate2_peer  # noqa: E402
from bench.decode_throughput import LENGTH_PENALTY, aiayn_decode, make_sources  # noqa: E402

TINY = common.SIZES["tiny"].config()
VARIANTS = {
    "benchmark": {},
    "pre-LN, learned positions, GELU, output bias, untied": dict(
        norm="pre",
        positions="learned",
        activation="gelu",
        output_bias=True,
        tie_embeddings=False,
        shared_vocab=False,
    ),
}


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, **changes)).eval()
    with torch.no_grad():  # random biases and LayerNorm parameters: zeros and ones hide mistakes
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _searches(model: Transformer, folder: Path) -> ctranslate2_peer.CT2Searches:
    ctranslate2_peer.to_ctranslate2(model, folder)
    return ctranslate2_peer.CT2Searches(
        folder,
        vocab_size=model.cfg.tgt_vocab_size,
        device="cpu",
        threads=1,
        compute_type="float32",
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctranslate2_scores_every_token_as_aiayn(variant: str, tmp_path: Path) -> None:
    model = _model(**VARIANTS[variant])
    ct2 = _searches(model, tmp_path)
    src = make_sources(model.cfg, batch=3, src_len=8, seed=1)
    generator = torch.Generator().manual_seed(2)
    tgt = common.random_ids(3, 6, model.cfg.tgt_vocab_size, generator)
    names = ct2.names
    sources = [[names[i] for i in row if i != common.PAD_ID] for row in src.tolist()]
    scored = ct2.translator.score_batch(sources, [[names[i] for i in row] for row in tgt.tolist()])
    # aiayn: the decoder fed bos + target; CTranslate2 scores the target tokens, then eos.
    full = torch.cat([tgt, torch.full((3, 1), common.EOS_ID)], dim=1)
    decoder_in = torch.cat([torch.full((3, 1), common.BOS_ID), tgt], dim=1)
    with torch.no_grad():
        log_probs = model(src, decoder_in).log_softmax(-1)
    ours = log_probs.gather(-1, full[..., None])[..., 0]  # (3, 7)
    theirs = torch.tensor([result.log_probs for result in scored])
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # Not a check that holds for any two models: a shuffled target scores differently.
    assert (theirs - ours[:, torch.randperm(7)]).abs().max() > 1e-2


def test_forced_length_searches_match_aiayn(tmp_path: Path) -> None:
    model = _model()
    ct2 = _searches(model, tmp_path)
    src = make_sources(model.cfg, batch=4, src_len=8, seed=1)
    steps = 7
    greedy = ct2.decode(src, "greedy", steps, 4, LENGTH_PENALTY)
    assert greedy == aiayn_decode(model, src, "greedy", steps, 4)
    assert {len(row) for row in greedy} == {steps}
    assert len({token for row in greedy for token in row}) > 1, "a degenerate check: one token"
    beam = ct2.decode(src, "beam", steps, 4, LENGTH_PENALTY)
    assert {len(row) for row in beam} == {steps - 1}  # as aiayn's beam output, eos dropped
    banned = {common.PAD_ID, common.BOS_ID, common.EOS_ID}
    assert not banned & {token for row in greedy + beam for token in row}


def test_what_ctranslate2_cannot_hold_is_refused(tmp_path: Path) -> None:
    model = Transformer(dataclasses.replace(TINY, embedding_norm=True))
    with pytest.raises(ValueError, match="embedding LayerNorm"):
        ctranslate2_peer.to_ctranslate2(model, tmp_path)


def test_the_peer_in_its_own_process_decodes_the_same(tmp_path: Path) -> None:
    """`CT2Process` (what the benchmark times: CTranslate2's OpenMP threads apart from
    PyTorch's) gives the in-process searches' outputs, reports a model it cannot load, and
    ends its process when closed."""
    model = _model()
    here = _searches(model, tmp_path)
    options = dict(vocab_size=model.cfg.tgt_vocab_size, device="cpu", compute_type="float32")
    apart = ctranslate2_peer.CT2Process(tmp_path, threads=1, **options)
    try:
        src = make_sources(model.cfg, batch=4, src_len=8, seed=3)
        for search in ("greedy", "beam"):
            assert apart.decode(src, search, 6, 4, LENGTH_PENALTY) == here.decode(
                src, search, 6, 4, LENGTH_PENALTY
            )
        with pytest.raises(RuntimeError, match="CTranslate2: "):
            apart.decode(src, "beam", 6, 0, LENGTH_PENALTY)  # beam_size 0 is refused there
    finally:
        apart.close()
    assert not apart._process.is_alive()
    with pytest.raises(RuntimeError, match="could not load"):
        ctranslate2_peer.CT2Process(tmp_path / "missing", threads=1, **options)
