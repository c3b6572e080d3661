"""Checks that need a CUDA GPU: the fixed-shape searches replayed as CUDA graphs, and a
training step that never waits for the device.

Skipped on machines without one (this project's CI); `bench/gpu.sh` runs them first on the
GPU machine. On a CPU the same searches run eagerly and are tested in test_decoding_model.py;
here the captured graphs must give the reference searches' outputs, batch after batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pretrain import WORDS, mlm_objective, mlm_tokenizer
from torch import nn

from aiayn import train
from aiayn.config import TransformerConfig
from aiayn.data.batching import TokenBatchSampler, example_lengths
from aiayn.decoding import TransformerDecoder, beam_search, greedy_search, translate_ids
from aiayn.heads import SequenceClassifier
from aiayn.lm_heads import MaskedLanguageModel
from aiayn.model import Transformer
from aiayn.static_decoding import StaticDecoding
from aiayn.tasks import classification, seq2seq
from aiayn.tasks.pretrain import KeyedBatchSampler
from aiayn.train import (
    TrainConfig,
    Trainer,
    _label_smoothed_nll,
    compiles_kernels_on,
    label_smoothed_nll,
)

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


# --------------------------------------------------------------------------- training steps


def task_trainer(task: str, run_dir: Path, device: str = "cuda") -> Trainer:
    """A Trainer of a tiny model on a few sentences, with the task's own batches and loss:
    translation (also summarization's and the denoising objective's), classification, or the
    masked-LM objective. Precision, optimiser (fused AdamW) and the rest as the Trainer's
    defaults for the device."""
    torch.manual_seed(0)
    tok = mlm_tokenizer()
    texts = [" ".join(WORDS.split()[i : i + 3 + i % 7]) for i in range(12)]
    ids = tok.encode_batch(texts)
    options = dict(vocab_size=tok.vocab_size, dropout=0.1)
    cfg = TransformerConfig.from_preset("tiny", **options)
    encoder_only = TransformerConfig.from_preset("tiny", n_decoder_layers=0, **options)
    pin = device == "cuda"
    if task == "translation":
        pairs = list(zip(ids, ids[::-1], strict=True))
        model = Transformer(cfg)
        sampler = TokenBatchSampler(example_lengths(pairs), 64)
        make = seq2seq.batch_maker(pairs, tok.pad_id, tok.bos_id, tok.eos_id, pin=pin)
        loss = seq2seq.seq2seq_loss(tok.pad_id, 0.1)
    elif task == "classification":
        model = SequenceClassifier(Transformer(encoder_only), n_classes=2)
        sampler = classification.make_sampler(ids, 64, shuffle=True)
        labels = [i % 2 for i in range(len(ids))]
        make = classification.batch_maker(ids, labels, tok.pad_id, pin=pin)
        loss = classification.classification_loss(0.1)
    else:  # the masked-LM objective
        model = MaskedLanguageModel(encoder_only)
        objective = mlm_objective(tok)
        sampler = KeyedBatchSampler(objective.lengths(ids), 64)
        make = objective.batch_maker(ids, seed=0)
        loss = objective.loss_fn(0.1)
    train = TrainConfig(
        max_steps=3, max_tokens=64, warmup_steps=2, device=device, eval_every=0, save_every=0,
        log_every=1, clip_norm=1.0,
    )  # fmt: skip
    return Trainer(
        model, train, sampler=sampler, make_batch=make, loss_fn=loss, run_dir=run_dir,
        run_config={"task": task}, d_model=cfg.d_model,
    )  # fmt: skip


@pytest.mark.parametrize("task", ["translation", "classification", "mlm"])
def test_a_training_step_never_waits_for_the_gpu(task: str, tmp_path: Path) -> None:
    """The fast path "no host synchronisation inside the step": `Trainer.train_step` queues
    the whole step (copies, forward, loss, backward, clipping, the fused AdamW that skips a
    non-finite update itself) without reading a value back, so the host prepares the next
    batches while the GPU computes. Under CUDA's sync debug mode "error" any call that makes
    the host wait for the device raises. (The translation and masked-LM losses are the
    compiled one, the default on a GPU.)"""
    trainer = task_trainer(task, tmp_path / "run")
    # Two epochs first: the optimiser's state is made, and the loss (compiled on a GPU) is
    # compiled for the batches' shapes; compiling is not part of a step.
    for _ in range(2 * len(trainer.sampler)):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, n_tokens, applied = trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and applied.device.type == "cuda"
    assert n_tokens > 0 and torch.isfinite(loss) and bool(applied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_loss_is_compiled_on_a_gpu_and_is_pytorchs(
    dtype: torch.dtype, monkeypatch
) -> None:
    """`label_smoothed_nll` compiles its row sums on a GPU by default: PyTorch's
    loss's value and gradient, padding ignored, for batches of three shapes."""
    assert compiles_kernels_on(torch.device("cuda"))
    compiled, used = train._compiled_label_smoothed_nll(), []
    monkeypatch.setattr(train, "_compiled_label_smoothed_nll", lambda: used.append(1) or compiled)
    torch.manual_seed(0)
    for rows, length in ((4, 7), (6, 5), (3, 9)):
        logits = torch.randn(rows, length, 1000, device="cuda", dtype=dtype, requires_grad=True)
        target = torch.randint(1, 1000, (rows, length), device="cuda")
        target[0, :2] = 0
        theirs = _label_smoothed_nll(logits, target, 0, 0.1)
        (their_grad,) = torch.autograd.grad(theirs, logits)
        ours = label_smoothed_nll(logits, target, 0, 0.1)
        (our_grad,) = torch.autograd.grad(ours, logits)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(our_grad, their_grad)
        assert our_grad[0, :2].abs().sum() == 0
    assert len(used) == 3  # the compiled loss, each time
