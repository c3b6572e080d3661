"""`torch.compile` sees every model the Trainer trains as one graph, called as its task calls it,
and compiles it at most twice however many batch shapes bucketing makes (its loss once).

A graph break splits a compiled step in two, and where the break is a value read from a tensor
(a shape that depends on values, `.item()`, `bool()`) it also makes the host wait for a GPU at
every step. A shape that the code turns into a Python decision would instead recompile at
every new batch shape, and past dynamo's limit (8) run uncompiled. `torch._dynamo.explain` and
a backend that only counts the graphs it is given trace without compiling (a second or two for
these tiny models), so the checks run on a CPU. What the model does on a CPU only (the token-id
range check, aiayn's own dropout masks) steps aside while it is compiled, so in float32 the
traced code is what a GPU compiles.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_pretrain import mlm_batch, mlm_objective, mlm_tokenizer
from torch import nn

from aiayn import train
from aiayn.config import TransformerConfig
from aiayn.heads import POOLINGS, SequenceClassifier
from aiayn.lm_heads import CausalLanguageModel, MaskedLanguageModel
from aiayn.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", dropout=0.1, **changes)  # dropout traced too


def padded_ids(rows: int = 3, length: int = 9) -> torch.Tensor:
    """(rows, length) ids in the tiny vocabulary, the second row padded after 5 tokens."""
    ids = torch.randint(4, 64, (rows, length), generator=torch.Generator().manual_seed(0))
    ids[1, 5:] = 0
    return ids


def graphs_and_breaks(fn, *args) -> tuple[int, list[str]]:
    """How many graphs dynamo makes of fn(*args), and the first line of each break's reason."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


def test_encoder_decoder_is_one_graph() -> None:
    """Translation, summarization and the denoising objective: model(src, tgt_in)."""
    model = Transformer(tiny()).train()
    assert graphs_and_breaks(model, padded_ids(), padded_ids(length=7)) == (1, [])


def test_causal_language_model_is_one_graph() -> None:
    model = CausalLanguageModel(tiny(n_encoder_layers=0)).train()
    assert graphs_and_breaks(model, padded_ids()) == (1, [])


@pytest.mark.parametrize("pooling", POOLINGS)
def test_classifier_is_one_graph(pooling: str) -> None:
    model = SequenceClassifier(Transformer(tiny(n_decoder_layers=0)), n_classes=2, pooling=pooling)
    assert graphs_and_breaks(model.train(), padded_ids()) == (1, [])


def test_masked_language_model_and_its_targets_are_one_graph() -> None:
    """The masked-LM objective selects its chosen positions by the batch's indices: one graph.
    Selecting by a mask, as the objective did before, breaks it (a shape that depends on
    values), which the check sees."""
    tok = mlm_tokenizer()
    objective = mlm_objective(tok)
    batch = mlm_batch(objective)
    model = MaskedLanguageModel(tiny(vocab_size=tok.vocab_size, n_decoder_layers=0)).train()

    assert graphs_and_breaks(objective.logits_and_targets, model, batch) == (1, [])

    def by_mask(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
        chosen = labels.ne(tok.pad_id)
        return model(ids, chosen), labels[chosen]

    graphs, breaks = graphs_and_breaks(by_mask, model, batch.input_ids, batch.labels)
    assert graphs > 1 and any("Dynamic shape operator" in reason for reason in breaks), breaks


def test_bucketed_batch_shapes_compile_the_model_twice_and_the_loss_once(monkeypatch) -> None:
    """Ten (batch, source length, target length) shapes, as bucketing gives them: dynamo traces
    the model once for the first shape and once more, with the sizes symbolic, for the second;
    every later shape runs that second graph. The compiled loss (`label_smoothed_nll(...,
    fused=True)`) marks its batch dimensions dynamic, so it is traced once."""
    graphs: list[str] = []

    def counting(name: str):
        def backend(gm: torch.fx.GraphModule, example_inputs):
            graphs.append(name)
            return gm.forward

        return backend

    torch._dynamo.reset()
    model = torch.compile(Transformer(tiny()).train(), backend=counting("model"))
    loss = torch.compile(train._label_smoothed_nll_by_rows, backend=counting("loss"))
    monkeypatch.setattr(train, "_compiled_label_smoothed_nll", lambda: loss)
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 10, 12), (6, 14, 11), (10, 7, 9), (5, 20, 18), (12, 5, 6), (7, 13, 13)]
    shapes += [(9, 9, 15), (4, 30, 25), (16, 4, 4), (3, 40, 38)]
    for batch, src_len, tgt_len in shapes:
        src = torch.randint(4, 64, (batch, src_len), generator=generator)
        tgt = torch.randint(4, 64, (batch, tgt_len), generator=generator)
        src[0, src_len // 2 :] = 0  # a padded source, as in a bucketed batch
        train.label_smoothed_nll(model(src, tgt), tgt, 0, 0.1, fused=True).backward()
    assert sorted(graphs) == ["loss", "model", "model"]
