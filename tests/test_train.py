"""The training loop: the paper's schedule and loss, exact resume, determinism, non-finite steps."""

import json
import logging
import math
import os
import shutil

import pytest
import torch

import aiayn.loss
import aiayn.train
from aiayn import checkpoint as ckpt
from aiayn.config import TransformerConfig
from aiayn.data.batching import TokenBatchSampler, example_lengths
from aiayn.errors import CheckpointError, ConfigError
from aiayn.model import Transformer
from aiayn.tasks.seq2seq import batch_maker, seq2seq_loss
from aiayn.train import (
    TrainConfig,
    Trainer,
    TrainingError,
    TrainingStopped,
    label_smoothed_nll,
    learning_rate,
    precision_advice,
    resolve_precision,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rate_is_equation_3():
    d, warmup = 512, 4000
    for step in (1, 100, 3999, 4000, 4001, 100_000):
        expected = d**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert learning_rate(step, d, warmup) == pytest.approx(expected, rel=1e-12)
    # Linear warm-up, the peak at warmup_steps, then inverse square root decay.
    assert learning_rate(2000, d, warmup) == pytest.approx(learning_rate(1000, d, warmup) * 2)
    peak = learning_rate(4000, d, warmup)
    assert peak == pytest.approx(512**-0.5 * 4000**-0.5)
    assert learning_rate(16000, d, warmup) == pytest.approx(peak / 2)
    assert learning_rate(10, d, warmup, scale=2.0) == pytest.approx(
        2 * learning_rate(10, d, warmup)
    )


def test_label_smoothed_loss_matches_the_smoothed_target_distribution():
    torch.manual_seed(0)
    V, eps, pad = 7, 0.1, 0
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    target = torch.tensor([[3, 4, 0], [1, 2, 5]])
    log_p = logits.log_softmax(-1)
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if target[b, t] == pad:
                continue
            q = torch.full((V,), eps / V, dtype=torch.float64)
            q[target[b, t]] += 1 - eps
            expected -= float((q * log_p[b, t]).sum())
    assert float(label_smoothed_nll(logits, target, pad, eps)) == pytest.approx(expected, rel=1e-6)
    plain = -sum(
        float(log_p[b, t, target[b, t]]) for b in range(2) for t in range(3) if target[b, t] != pad
    )
    assert float(label_smoothed_nll(logits, target, pad, 0.0)) == pytest.approx(plain, rel=1e-6)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="unknown train key 'max_step'"):
        TrainConfig.from_dict({"max_step": 10})
    with pytest.raises(ConfigError, match="train.max_steps must be >= 1, got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="train.max_tokens must be an integer, got 'many'"):
        TrainConfig(max_tokens="many")


# --------------------------------------------------------------------------- a tiny copy task


def copy_examples(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(4, 40, (length,), generator=g).tolist()
        out.append((ids, ids))
    return out


def make_trainer(
    run_dir, max_steps, examples, max_tokens=64, dropout=0.1, dtype=torch.float32, **train
):
    torch.manual_seed(0)
    # With dropout, resuming must restore the RNG state too.
    cfg = TransformerConfig.from_preset("tiny", dropout=dropout)
    model = Transformer(cfg).to(dtype)
    tcfg = TrainConfig(
        max_steps=max_steps,
        max_tokens=max_tokens,
        warmup_steps=30,
        lr_scale=0.2,
        device="cpu",
        log_every=1,
        eval_every=0,
        save_every=0,
        seed=3,
        **train,
    )
    sampler = TokenBatchSampler(
        example_lengths(examples), tcfg.max_tokens, shuffle=True, seed=tcfg.seed
    )
    return Trainer(
        model,
        tcfg,
        sampler=sampler,
        make_batch=batch_maker(examples, 0, 1, 2),
        loss_fn=seq2seq_loss(0, tcfg.label_smoothing),
        run_dir=run_dir,
        run_config={"model": cfg.to_dict()},
        d_model=cfg.d_model,
    )


def losses(run_dir):
    return [
        r["loss"]
        for r in map(json.loads, (run_dir / "train.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    examples = copy_examples()
    straight = make_trainer(tmp_path / "straight", 24, examples, grad_accum=2)
    straight.fit(progress=False)

    first = make_trainer(tmp_path / "resumed", 12, examples, grad_accum=2)
    first.fit(progress=False)  # saves a checkpoint at step 12
    with open(
        tmp_path / "resumed" / "train.jsonl", "a"
    ) as log:  # steps logged after it, then a kill
        log.write('{"step": 13, "loss": 99.0}\n{"step": 14, "lo')
    torch.manual_seed(12345)  # a new process would start from other RNG states
    second = make_trainer(tmp_path / "resumed", 24, examples, grad_accum=2)
    assert second.resume() == 12
    second.fit(progress=False)

    for (name, a), b in zip(
        straight.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    # Training crossed an epoch boundary, so the data order was resumed across epochs too.
    assert second.stream.epoch >= 1


def test_a_run_resumed_between_two_log_records_logs_what_the_uninterrupted_one_does(tmp_path):
    """The record of step 8 averages the loss of steps 5-8; resumed from step 6, the loss of
    steps 5 and 6 comes from the checkpoint."""
    straight = make_trainer(tmp_path / "a", 8, copy_examples())
    straight.cfg.log_every, straight.cfg.save_every = 4, 2
    straight.fit(progress=False)
    resumed = make_trainer(tmp_path / "b", 8, copy_examples())
    resumed.cfg.log_every = 4
    resumed.resume(ckpt.checkpoint_path(straight.checkpoint_root, 6))
    resumed.fit(progress=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")[-1:]


def test_a_log_that_cannot_be_written_stops_training_in_one_line(tmp_path):
    trainer = make_trainer(tmp_path, 4, copy_examples())
    trainer.cfg.save_every = 2
    (tmp_path / "train.jsonl").mkdir()  # where the log goes: open() fails
    with pytest.raises(TrainingError) as info:
        trainer.fit(progress=False)
    assert str(info.value) == (
        f"training stopped at step 1: cannot write the log: Is a directory while writing "
        f"{tmp_path / 'train.jsonl'}; no checkpoint was saved yet: start the run again"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_under_the_log_names_the_log(tmp_path):
    """A failed write(2) names no file; the message must still say which one."""
    trainer = make_trainer(tmp_path, 4, copy_examples())
    (tmp_path / "train.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(TrainingError) as info:
        trainer.fit(progress=False)
    assert str(info.value).startswith(
        f"training stopped at step 1: cannot write the log: no space left on device while "
        f"writing {tmp_path / 'train.jsonl'}; free disk space"
    )


def test_max_epochs_stops_at_the_end_of_the_epoch(tmp_path):
    trainer = make_trainer(tmp_path, 1000, copy_examples(), max_epochs=1)
    trainer.fit(progress=False)
    assert trainer.step == len(trainer.sampler)  # one batch a step, every batch once
    assert trainer.stream.epochs_done == 1 and trainer.stream.epoch == 0


def test_resume_on_other_training_data_is_refused(tmp_path):
    """The stream's position is a batch number in one cut of the data: in other data, or with
    another max_tokens, it names other batches, or none (an IndexError once)."""
    make_trainer(tmp_path, 4, copy_examples()).fit(progress=False)
    for examples, max_tokens in ((copy_examples()[:48], 64), (copy_examples(), 128)):
        again = make_trainer(tmp_path, 8, examples, max_tokens=max_tokens)
        with pytest.raises(CheckpointError, match=r"data cut into \d+ batches an epoch, but"):
            again.resume()
    # Other examples cut into as many batches: the data's digest tells them apart.
    other = make_trainer(tmp_path, 8, copy_examples(seed=3))
    assert len(other.sampler) == len(make_trainer(tmp_path, 8, copy_examples()).sampler)
    with pytest.raises(CheckpointError, match="was trained on other training data"):
        other.resume()
    # A checkpoint of an older aiayn records neither: a position past the end is still caught.
    state_path = ckpt.latest_checkpoint(tmp_path / "checkpoints") / "trainer_state.json"
    state = json.loads(state_path.read_text())
    for key in ("batches_per_epoch", "data_digest"):
        del state["data"][key]
    state["data"]["consumed"] = 40
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="data cut into at least 40 batches an epoch"):
        make_trainer(tmp_path, 8, copy_examples()[:24]).resume()


def test_the_best_of_a_checkpoint_without_a_data_digest_is_dropped_only_where_asked(tmp_path):
    """Pre-training's validation changed when checkpoints began to record the data's digest;
    translation's did not, and its best value of an older checkpoint still counts."""
    make_trainer(tmp_path, 4, copy_examples()).fit(progress=False)
    state_path = ckpt.latest_checkpoint(tmp_path / "checkpoints") / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["best_value"] = 1.5
    for digest in (state["data"]["data_digest"], None):
        if digest is None:
            del state["data"]["data_digest"]
        state_path.write_text(json.dumps(state))
        for stale in (False, True):
            again = make_trainer(tmp_path, 8, copy_examples())
            again.stale_best_without_digest = stale
            again.resume()
            assert again.best_value == (None if stale and digest is None else 1.5)


def test_resume_with_another_grad_accum_goes_on_with_a_warning(tmp_path, caplog):
    """What keeps a step's batch when the number of processes changes (N x 1 = 1 x N)."""
    make_trainer(tmp_path, 4, copy_examples()).fit(progress=False)
    again = make_trainer(tmp_path, 6, copy_examples(), grad_accum=2)
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        assert again.resume() == 4
    assert [r.getMessage() for r in caplog.records] == [
        "resuming a run saved with 1 processes x grad_accum 1 on 1 x 2: the data order "
        "continues, but the result will not be bit-identical, and each step takes another "
        "number of batches"
    ]


def test_resume_with_another_grad_accum_of_a_checkpoint_that_does_not_record_it(tmp_path, caplog):
    """Checkpoints of an older aiayn record no grad_accum in their trainer state: the run
    config saved with them (a task's, with its train section) still has it."""
    first = make_trainer(tmp_path, 4, copy_examples(), grad_accum=2)
    first.run_config = {**first.run_config, "train": first.cfg.to_dict()}  # as a task's is
    first.fit(progress=False)
    state_path = ckpt.latest_checkpoint(tmp_path / "checkpoints") / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["grad_accum"]
    state_path.write_text(json.dumps(state))
    for grad_accum, warned in ((2, []), (1, ["1 processes x grad_accum 2 on 1 x 1"])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aiayn"):
            make_trainer(tmp_path, 8, copy_examples(), grad_accum=grad_accum).resume()
        said = [r.getMessage() for r in caplog.records]
        assert [m.split("saved with ")[1].split(":")[0] for m in said] == warned, said


def test_a_stop_after_a_skipped_step_saves_the_step_it_names(tmp_path):
    """Step 10 is validated (and saved); step 11's loss is infinite, so the update is skipped,
    and a stop signal arrives during it: the checkpoint the message names must exist."""
    trainer = make_trainer(tmp_path, 11, copy_examples())
    trainer.cfg.eval_every = 5
    loss_fn = trainer.loss_fn

    def loss(model, batch):
        if trainer.step == 10:
            trainer._stop_signal = 15  # as the SIGTERM handler does
            return loss_fn(model, batch) * float("inf")
        return loss_fn(model, batch)

    trainer.loss_fn = loss
    with pytest.raises(TrainingStopped) as info:
        trainer.fit(progress=False)
    assert info.value.checkpoint.name == "step_00000011" and info.value.checkpoint.is_dir()


def test_same_seed_same_losses(tmp_path):
    examples = copy_examples()
    make_trainer(tmp_path / "a", 8, examples).fit(progress=False)
    make_trainer(tmp_path / "b", 8, examples).fit(progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 8


def test_training_reduces_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, 150, copy_examples(), max_tokens=128)
    trainer.fit(progress=False)
    history = losses(tmp_path)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.75 * first, (
        f"mean loss {first:.2f} over the first 10 steps, {last:.2f} over the last 10"
    )


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two batches accumulated give the gradient of the two batches as one (a per-token mean)."""
    examples = copy_examples(8)
    grads = {}
    for name, split in (("accumulated", [range(0, 3), range(3, 8)]), ("one batch", [range(8)])):
        trainer = make_trainer(tmp_path / name, 1, examples, dropout=0.0)
        batches = [trainer.make_batch(list(ix)) for ix in split]
        trainer._next_batches = lambda batches=batches: batches
        # Capture the gradient the optimiser would apply (Adam's first step is ~lr * sign(g),
        # which would turn rounding differences into visible ones).
        trainer.optimizer.step = lambda t=trainer, name=name: grads.__setitem__(
            name, [p.grad.clone() for p in t.model.parameters()]
        )
        trainer.train_step()
    for g, h in zip(grads["accumulated"], grads["one batch"], strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, fused):
    """Skipped by the fused AdamW itself (the default) or, where PyTorch has no fused kernel,
    by the Trainer reading the flag."""
    trainer = make_trainer(tmp_path, 50, copy_examples(), max_bad_steps=3)
    if not fused:
        groups = [
            {k: v for k, v in g.items() if k not in ("fused", "foreach")}
            for g in trainer.optimizer.param_groups
        ]
        trainer.optimizer = torch.optim.AdamW(groups, foreach=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.loss_fn = lambda model, batch: model(batch.src, batch.tgt_in).sum() * math.inf
    with pytest.raises(
        TrainingError,
        match="not finite for 3 steps in a row .last at step 3.: lower train.lr_scale",
    ):
        trainer.fit(progress=False)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied
    skipped = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skipped if r.get("skipped_non_finite")] == [1, 2, 3]


def test_a_fused_optimiser_skips_non_finite_steps_on_the_device(tmp_path):
    """With a fused AdamW (the Trainer's choice on a GPU and a CPU) the skip needs no host
    read: the kernel itself leaves parameters, moments and step counts alone where found_inf
    is set."""
    trainer = make_trainer(tmp_path, 50, copy_examples(), max_bad_steps=3)
    assert trainer.optimizer.defaults["fused"]
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: steps.append(trainer.optimizer.found_inf.item()) or step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda model, batch: loss_fn(model, batch) * math.inf
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row .last at step 3."):
        trainer.fit(progress=False)
    assert steps == [1.0, 1.0, 1.0]  # the optimiser ran, told to skip, each time
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = next(iter(trainer.optimizer.state.values()))
    assert float(state["step"]) == 0 and not state["exp_avg"].any()
    trainer.loss_fn = loss_fn  # a finite step is applied
    loss, _, applied = trainer.train_step()
    assert bool(applied) and torch.isfinite(loss) and steps[-1] == 0.0
    assert not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_checkpoints_keep_last_k_and_best(tmp_path):
    examples = copy_examples()
    trainer = make_trainer(tmp_path, 12, examples, keep_last=2)
    trainer.cfg.save_every = 2
    trainer.cfg.eval_every = 4
    scores = iter([1.0, 3.0, 2.0])  # val_loss: the best is the first evaluation, at step 4
    trainer.evaluate_fn = lambda model: {"val_loss": next(scores)}
    trainer.fit(progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000004", "step_00000010", "step_00000012"]
    assert ckpt.read_best_pointer(tmp_path).name == "step_00000004"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [None, 1, 120])  # one block; one row each; several
def test_blockwise_loss_equals_pytorch_cross_entropy(smoothing, block_elements, monkeypatch):
    """aiayn.loss.LabelSmoothedNLL (the eager loss) against F.cross_entropy with
    label_smoothing, in float64: the same value and gradient, padding rows ignored."""
    if block_elements is not None:
        monkeypatch.setitem(aiayn.loss.BLOCK_ELEMENTS, "cpu", block_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 6, 50, dtype=torch.float64)).requires_grad_()
    target = torch.randint(1, 50, (4, 6))
    target[0, :2] = 0
    target[3, :] = 0  # a sentence of padding only
    ours = label_smoothed_nll(logits, target, 0, smoothing)
    (our_grad,) = torch.autograd.grad(3.0 * ours, logits)
    theirs = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1),
        target.flatten(),
        ignore_index=0,
        reduction="sum",
        label_smoothing=smoothing,
    )
    (their_grad,) = torch.autograd.grad(3.0 * theirs, logits)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)
    assert our_grad[3].abs().sum() == 0 and our_grad[0, :2].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_blockwise_loss_can_write_its_gradient_over_the_logits(dtype, monkeypatch):
    """inplace_backward: the same loss and the same gradients, bit for bit, with the logits'
    gradient in the logits' own memory instead of new memory."""
    monkeypatch.setitem(aiayn.loss.BLOCK_ELEMENTS, "cpu", 120)
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 8, dtype=dtype, requires_grad=True)
    output_layer = torch.randn(50, 8, dtype=dtype, requires_grad=True)
    target = torch.randint(1, 50, (4, 6))
    target[0, :2] = 0

    def run(inplace: bool):
        logits = hidden @ output_layer.T  # (4, 6, 50), as a model's output layer gives them
        where = {}

        def note(grad: torch.Tensor) -> None:
            where["grad"] = grad.data_ptr()

        logits.register_hook(note)
        loss = label_smoothed_nll(logits, target, 0, 0.1, inplace_backward=inplace)
        grads = torch.autograd.grad(3.0 * loss, (hidden, output_layer))
        return loss, grads, where["grad"] == logits.data_ptr()

    loss, grads, over_logits = run(inplace=False)
    loss_inplace, grads_inplace, over_logits_inplace = run(inplace=True)
    assert not over_logits and over_logits_inplace
    assert torch.equal(loss, loss_inplace)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_inplace, strict=True))
    # A second backward pass would read the gradient as logits: PyTorch refuses it.
    loss = label_smoothed_nll(hidden @ output_layer.T, target, 0, 0.1, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_blockwise_loss_of_bf16_logits_is_float32_with_a_bf16_gradient(monkeypatch):
    """bf16 logits (autocast): the loss in float32 from the exact bf16 values, the gradient in
    bf16, as PyTorch's loss on logits.float() gives them, and no (N, V) float32 tensor kept."""
    monkeypatch.setitem(aiayn.loss.BLOCK_ELEMENTS, "cpu", 200)
    torch.manual_seed(1)
    logits = torch.randn(5, 7, 100).bfloat16().requires_grad_()
    target = torch.randint(1, 100, (5, 7))
    target[1, 3:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = label_smoothed_nll(logits, target, 0, 0.1)
    kept = ours.grad_fn.saved_tensors  # what the backward pass holds on to
    assert not any(t.dtype == torch.float32 and t.numel() >= logits.numel() for t in kept)
    (our_grad,) = torch.autograd.grad(ours, logits)
    theirs = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(),
        target.flatten(),
        ignore_index=0,
        reduction="sum",
        label_smoothing=0.1,
    )
    (their_grad,) = torch.autograd.grad(theirs, logits)
    assert ours.dtype == torch.float32 and our_grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(our_grad, their_grad)  # bf16 tolerances


def test_the_compiled_loss_as_row_sums_is_pytorchs_loss():
    """What `fused=True` compiles, run eagerly: F.cross_entropy's value and gradient, padding
    ignored, in float64 (the smoothing weights in float64 too), float32 and from bfloat16
    logits (taken in float32 by both)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-4)):
        logits = torch.randn(3, 5, 50).to(dtype).requires_grad_()
        target = torch.randint(1, 50, (3, 5))
        target[0, :2] = 0
        theirs = aiayn.train._label_smoothed_nll(logits, target, 0, 0.1)
        (their_grad,) = torch.autograd.grad(theirs, logits)
        ours = aiayn.train._label_smoothed_nll_by_rows(logits, target, 0, 0.1)
        (our_grad,) = torch.autograd.grad(ours, logits)
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        torch.testing.assert_close(our_grad, their_grad)
        assert our_grad[0, :2].abs().sum() == 0


def _compiled_backward_ops(loss) -> list[str]:
    """The operators of `loss`'s backward graph as AOT autograd hands it to a compiler."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen: list[str] = []

    def forward(gm, _inputs):
        return make_boxed_func(gm.forward)

    def backward(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=forward, bw_compiler=backward))
    logits = torch.randn(2, 3, 40, requires_grad=True)
    target = torch.randint(1, 40, (2, 3))
    compiled(logits, target, 0, 0.1).backward()
    return seen


def test_the_compiled_losss_backward_pass_scatters_nothing():
    """The compiled loss's backward pass gets the target's share of the gradient from a
    comparison of column indices, not by scattering into a (rows, V) tensor of zeros (a
    write and a read of the logits' size in float32: 2.4 GB at the base size). The same loss
    with x_t taken by `gather` (session 11's form) has that scatter: the check can fail."""

    def gathered(logits, target, pad_id, smoothing):
        x, t = logits.flatten(0, 1).float(), target.flatten()
        x_t = x.gather(1, t.unsqueeze(1)).squeeze(1)
        rows = torch.logsumexp(x, 1) - (1 - smoothing) * x_t - smoothing / x.size(1) * x.sum(1)
        return torch.where(t != pad_id, rows, 0.0).sum()

    assert any("scatter" in op for op in _compiled_backward_ops(gathered))
    ours = _compiled_backward_ops(aiayn.train._label_smoothed_nll_by_rows)
    assert ours and not any("scatter" in op for op in ours)


def test_the_loss_is_compiled_by_default_on_a_gpu_that_triton_supports(monkeypatch):
    """fused=None compiles the loss on a CUDA GPU of compute capability 7.0 or newer with
    Triton installed (bench: 8.9-10.6 ms eager against 2.1 compiled on an H200); a CPU, or a
    GPU that Triton does not support, runs it eagerly."""
    cuda = torch.device("cuda", 0)
    assert not aiayn.train.compiles_kernels_on(torch.device("cpu"))
    monkeypatch.setattr(aiayn.train, "_triton_installed", lambda: True)
    for capability, compiled in (((9, 0), True), ((7, 0), True), ((6, 1), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert aiayn.train.compiles_kernels_on(cuda) is compiled
    # With torch.compile switched off, the eager loss (the row sums run eagerly would hold a
    # float32 weight tensor as large as the logits).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert not aiayn.train.compiles_kernels_on(cuda)
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    with torch._dynamo.config.patch(disable=True):  # TORCH_COMPILE_DISABLE=1
        assert not aiayn.train.compiles_kernels_on(cuda)
    assert aiayn.train.compiles_kernels_on(cuda)
    monkeypatch.setattr(aiayn.train, "_triton_installed", lambda: False)
    assert not aiayn.train.compiles_kernels_on(cuda)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on a CPU needs a C compiler")
def test_fused_label_smoothed_nll_equals_the_eager_loss(one_thread):
    """`fused=True` (the compiled loss of `train.compile`) is the same function: value and gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, requires_grad=True)
    target = torch.randint(1, 50, (3, 5))
    target[0, :2] = 0  # padding: ignored by both
    eager = label_smoothed_nll(logits, target, 0, 0.1)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    fused = label_smoothed_nll(logits, target, 0, 0.1, fused=True)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-6)
    assert fused_grad[0, :2].abs().sum() == 0  # no gradient through padding


def test_max_time_stops_early_with_a_checkpoint_and_carries_over_resume(tmp_path):
    """train.max_time_s ends training like max_steps does (final checkpoint), and the time
    already spent counts after --resume: a run out of time is refused, with the limit named,
    and goes on once the limit is raised."""
    examples = copy_examples()
    trainer = make_trainer(tmp_path, 10_000, examples, max_time_s=0.5)
    trainer.fit(progress=False)
    assert 0 < trainer.step < 10_000 and trainer.elapsed_s >= 0.5
    saved = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and ckpt.checkpoint_step(saved) == trainer.step
    state = ckpt.load_checkpoint(saved).trainer_state
    assert state["elapsed_s"] >= 0.5

    again = make_trainer(tmp_path, 10_000, examples, max_time_s=0.5)
    with pytest.raises(ConfigError, match=r"already reached .* train.max_time_s 0.5; raise"):
        again.resume()
    longer = make_trainer(tmp_path, 10_000, examples, max_time_s=state["elapsed_s"] + 0.5)
    assert longer.resume() == trainer.step
    longer.fit(progress=False)
    assert longer.step > trainer.step


def test_auto_precision_stays_fp32_on_a_cpu_and_says_when_bf16_would_be_faster(monkeypatch):
    cpu = torch.device("cpu")
    for amx in (False, True):
        monkeypatch.setattr(aiayn.train, "_cpu_has_amx", lambda amx=amx: amx)
        assert resolve_precision("auto", cpu) == "fp32"
        advice = precision_advice("auto", cpu)
        assert (advice is not None and "train.precision bf16" in advice) == amx
        assert precision_advice("fp32", cpu) is None  # asked for: no advice


def test_the_training_defaults_are_the_papers(tmp_path):
    """§5.2-§5.4 as TrainConfig's defaults, and the optimiser the Trainer builds from them:
    Adam's β₁ = 0.9, β₂ = 0.98, ε = 10⁻⁹, warmup 4000, 100,000 steps, ε_ls = 0.1 (the base
    model's P_drop = 0.1 is the base preset's: tests/test_config.py)."""
    defaults = TrainConfig()
    assert (defaults.adam_beta1, defaults.adam_beta2, defaults.adam_eps) == (0.9, 0.98, 1e-9)
    assert (defaults.warmup_steps, defaults.max_steps) == (4000, 100_000)
    assert defaults.label_smoothing == 0.1 and defaults.lr_scale == 1.0
    assert defaults.weight_decay == 0.0 and defaults.clip_norm == 0.0  # the paper has neither
    trainer = make_trainer(tmp_path, 1, copy_examples())  # TrainConfig's Adam settings
    for group in trainer.optimizer.param_groups:
        assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9
