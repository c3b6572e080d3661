"""How much an encoder-decoder's predictions rest on its input: the validation loss of a
checkpoint with each example's own source, and with another example's.

    python -m bench.source_reliance runs/bbc_headline runs/pretrain_denoise ...

For each run (its best checkpoint, else its latest): the run's validation data, read as its
config.yaml says (a translation or summarization run's held-out pairs, cut as training cut them;
a span-corruption run's held-out examples, corrupted as its validation corrupts them), scored
twice: as they are, and with the sources moved round by one (example i gets example i+1's
source, the targets stay). A model that reads its input loses much by the swap; a decoder that
has become a language model of the targets loses little. Printed, and written as JSON to
bench/results/source_reliance-cpu-<date>.json. No timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aiayn import checkpoint as ckpt
from aiayn.config import TransformerConfig
from aiayn.data.tokenizer import Tokenizer
from aiayn.experiment import Experiment
from aiayn.tasks.translation import resolve_checkpoint
from bench import common


def pair_losses(exp: Experiment, model: nn.Module, tok: Tokenizer) -> tuple[float, float]:
    """A translation or summarization run: validation loss with own and with moved sources."""
    from aiayn.tasks.seq2seq import encode_pairs, validation_loss
    from aiayn.tasks.summarization import SummarizationData
    from aiayn.tasks.translation import TranslationData

    if exp.task == "summarization":
        data = SummarizationData.from_dict(exp.data)
        limits = (data.max_src_len, data.max_tgt_len)
    else:
        data = TranslationData.from_dict(exp.data)
        limits = (model.cfg.max_len - 1,) * 2
    pairs = data.read("valid")
    moved = [(pairs[(i + 1) % len(pairs)][0], t) for i, (_, t) in enumerate(pairs)]
    ids = dict(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, max_tokens=4096)
    return tuple(  # type: ignore[return-value]
        validation_loss(model, encode_pairs(tok, p).truncated(*limits), **ids)
        for p in (pairs, moved)
    )


class MovedSources(nn.Module):
    """The model with each batch's sources moved round by one row."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src.roll(1, 0), tgt_in)


def denoising_losses(exp: Experiment, model: nn.Module, tok: Tokenizer) -> tuple[float, float]:
    """A span-corruption run: its validation loss with own and with moved corrupted inputs."""
    from aiayn.tasks.pretrain import Objective, check_experiment, read_corpus

    data = check_experiment(exp)
    _, valid_docs = read_corpus(data)
    objective = Objective(data.objective, tok, data)
    examples = objective.make_examples(tok.encode_batch(valid_docs))[: data.max_valid_examples]
    evaluate = objective.evaluator(examples, 4096)
    return evaluate(model)["val_loss"], evaluate(MovedSources(model))["val_loss"]


def measure(run: Path) -> dict[str, Any]:
    path = resolve_checkpoint(run)
    exp = Experiment.from_yaml(run / "config.yaml")
    from aiayn.model import Transformer

    model = Transformer(TransformerConfig.from_dict(ckpt.load_checkpoint(path).config["model"]))
    model.load_state_dict(ckpt.load_model_state_dict(path))
    model.eval()
    tok = Tokenizer.load(path / "tokenizer.json")
    with torch.no_grad():
        if exp.task == "pretrain":
            own, moved = denoising_losses(exp, model, tok)
        else:
            own, moved = pair_losses(exp, model, tok)
    return {
        "run": str(run),
        "checkpoint": path.name,
        "task": exp.task,
        "val_loss": round(own, 4),
        "val_loss_moved_sources": round(moved, 4),
        "difference": round(moved - own, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    rows = [measure(run) for run in args.runs]
    device = torch.device("cpu")
    path = common.results_path(args.out_dir, "source_reliance", device)
    payload = {**common.header("source_reliance", common.machine_info(device)), "results": rows}
    common.write_json(path, payload)
    keys = ("run", "checkpoint", "val_loss", "val_loss_moved_sources", "difference")
    print(common.markdown_table(keys, [[r[k] for k in keys] for r in rows]))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
