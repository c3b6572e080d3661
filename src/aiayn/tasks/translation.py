"""Translation end to end: corpora, a joint BPE vocabulary, training, decoding, sacreBLEU.

`train_translation(experiment)` is what `aiayn train configs/multi30k_de_en.yaml` runs;
`Translator.from_checkpoint(dir)` is what `aiayn translate` and `aiayn evaluate` use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data import corpus
from aiayn.data.batching import TokenBatchSampler, example_lengths, fit_to_max_len, pad_ids
from aiayn.data.tokenizer import Tokenizer
from aiayn.decoding import translate_ids
from aiayn.errors import CheckpointError, ConfigError, DataError
from aiayn.experiment import Experiment
from aiayn.metrics import corpus_bleu
from aiayn.model import Transformer, recording_attention
from aiayn.tasks.seq2seq import batch_maker, seq2seq_loss, validation_loss
from aiayn.train import Distributed, Trainer, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TranslationData(ConfigSection):
    """Where the parallel data comes from, and how it is tokenized.

    format "multi30k": the official Multi30k files (`root`: a local folder with
    `train.de.gz` etc.; null downloads them into ~/.cache/aiayn). "text": line-aligned files
    (`train_src`/`train_tgt`, `valid_src`/`valid_tgt`, plain or .gz). "table": TSV/CSV/JSONL
    files (`train_file`, `valid_file`) with columns `src_field`, `tgt_field`. "hf": a Hugging
    Face dataset by name (`hf_name`, `hf_config`, splits `train_split`/`valid_split`).
    """

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "format": ("multi30k", "text", "table", "hf"),
        "max_len_policy": ("truncate", "reject"),
    }

    format: str = "multi30k"
    src_lang: str = "de"
    tgt_lang: str = "en"
    root: str | None = None
    valid_split: str = "val"
    train_src: str | None = None
    train_tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    train_file: str | None = None
    valid_file: str | None = None
    src_field: str = "source"
    tgt_field: str = "target"
    hf_name: str | None = None
    hf_config: str | None = None
    train_split: str = "train"
    vocab_size: int = 8000  # joint source-target BPE vocabulary (§5.1 used 37000 for WMT)
    min_frequency: int = 2
    max_len_policy: str = "truncate"  # a training pair longer than model.max_len: cut it, or stop
    max_train_examples: int | None = None  # use only the first N pairs (quick experiments, tests)
    max_valid_examples: int | None = None  # validate BLEU on the first N pairs (speed)

    def check(self) -> None:
        needed = {
            "text": ("train_src", "train_tgt", "valid_src", "valid_tgt"),
            "table": ("train_file", "valid_file"),
            "hf": ("hf_name",),
        }.get(self.format, ())
        for name in needed:
            if getattr(self, name) is None:
                raise ConfigError(f"data.{name} is required when data.format is {self.format!r}")
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be >= 8, got {self.vocab_size}")

    def read(self, split: str) -> list[tuple[str, str]]:
        """The (source, target) string pairs of `split` ("train" or "valid")."""
        limit = self.max_train_examples if split == "train" else self.max_valid_examples
        if self.format == "multi30k":
            name = "train" if split == "train" else self.valid_split
            pairs = corpus.multi30k(name, self.src_lang, self.tgt_lang, root=self.root)
        elif self.format == "text":
            src, tgt = (
                (self.train_src, self.train_tgt)
                if split == "train"
                else (self.valid_src, self.valid_tgt)
            )
            pairs = corpus.read_parallel(src, tgt)
        elif self.format == "table":
            path = self.train_file if split == "train" else self.valid_file
            pairs = corpus.read_table(path, self.src_field, self.tgt_field)
        else:
            hf_split = self.train_split if split == "train" else self.valid_split
            pairs = corpus.load_hf_dataset(
                self.hf_name, hf_split, self.src_field, self.tgt_field, self.hf_config
            )
        return pairs[:limit] if limit is not None else pairs


@dataclass
class DecodeConfig(ConfigSection):
    """Decoding (§6.1): "beam search with a beam size of 4 and length penalty alpha = 0.6"."""

    SECTION: ClassVar[str] = "decode"

    beam_size: int = 4
    length_penalty: float = 0.6
    max_len_a: int = 1  # maximum output length = max_len_a * input length + max_len_b
    max_len_b: int = 50  # §6.1: "input length + 50"
    eval_beam_size: int = 1  # during training's validation: greedy is much cheaper
    batch_size: int = 64  # sentences decoded together

    def check(self) -> None:
        if self.beam_size < 1 or self.eval_beam_size < 1 or self.batch_size < 1:
            raise ConfigError(
                "decode.beam_size, decode.eval_beam_size and decode.batch_size must be >= 1"
            )
        if self.length_penalty < 0:
            raise ConfigError(f"decode.length_penalty must be >= 0, got {self.length_penalty}")


# --------------------------------------------------------------------------- inference


class Translator:
    """A trained model with its tokenizer: strings in, strings out."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, decode: DecodeConfig) -> None:
        self.model, self.tokenizer, self.decode = model, tokenizer, decode

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Translator:
        """Load a checkpoint directory, or a run directory (its best, else its latest checkpoint)."""
        path = resolve_checkpoint(path)
        run = ckpt.load_checkpoint(path).config
        if run.get("task") != "translation":
            raise CheckpointError(
                f"{path} holds a {run.get('task')!r} model, not a translation model"
            )
        model = Transformer(TransformerConfig.from_dict(run["model"]))
        ckpt.load_checkpoint(path, model=model)
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise CheckpointError(
                f"{path} has no {TOKENIZER_FILE}; it was not saved by `aiayn train`: copy "
                f"the {TOKENIZER_FILE} of its run directory into it"
            )
        tokenizer = Tokenizer.load(tokenizer_path)
        if tokenizer.vocab_size != model.cfg.src_vocab_size:
            raise CheckpointError(
                f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model expects "
                f"{model.cfg.src_vocab_size}: the tokenizer belongs to another run"
            )
        return cls(
            model.to(device).eval(), tokenizer, DecodeConfig.from_dict(run.get("decode", {}))
        )

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids + EOS for each sentence, cut to the model's max_len."""
        limit = self.model.cfg.max_len - 1
        return [
            ids[:limit] + [self.tokenizer.eos_id]
            for ids in self.tokenizer.encode_batch(list(sentences))
        ]

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int | None = None,
        length_penalty: float | None = None,
    ) -> list[str]:
        """Translate sentences in batches sorted by length (less padding), returned in input order."""
        beam = beam_size or self.decode.beam_size
        alpha = self.decode.length_penalty if length_penalty is None else length_penalty
        encoded = self.encode(sentences)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(encoded)
        device = next(self.model.parameters()).device
        tok = self.tokenizer
        for start in range(0, len(order), self.decode.batch_size):
            chunk = order[start : start + self.decode.batch_size]
            src = pad_ids([encoded[i] for i in chunk], tok.pad_id).to(device)
            ids = translate_ids(
                self.model,
                src,
                beam_size=beam,
                length_penalty=alpha,
                bos_id=tok.bos_id,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                max_len_a=self.decode.max_len_a,
                max_len_b=self.decode.max_len_b,
            )
            for i, out in zip(chunk, ids, strict=True):
                outputs[i] = tok.decode(out)
        return outputs

    def attention(
        self, sentence: str, *, beam_size: int | None = None
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """Encoder-decoder attention of the last decoder layer, averaged over heads, for a sentence.

        Returns (weights (T, S), source tokens, target tokens) for the model's own translation,
        each side ending in </s>.
        """
        tok = self.tokenizer
        src_ids = self.encode([sentence])[0]
        device = next(self.model.parameters()).device
        src = torch.tensor([src_ids], device=device)
        out = translate_ids(
            self.model,
            src,
            beam_size=beam_size or self.decode.beam_size,
            length_penalty=self.decode.length_penalty,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )[0]
        tgt_in = torch.tensor([[tok.bos_id, *out]], device=device)
        with torch.no_grad(), recording_attention(self.model):
            self.model(src, tgt_in)
        weights = (
            self.model.decoder.layers[-1].cross_attn.weights[0].mean(0).float().cpu()
        )  # (T, S)
        return weights, _tokens(tok, src_ids), _tokens(tok, [*out, tok.eos_id])


def _tokens(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.id_to_token(i) or "?" for i in ids]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the best (else latest) checkpoint of a run directory."""
    path = Path(path)
    if ckpt.is_checkpoint(path):
        return path
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run directory or a checkpoint directory"
        )
    found = ckpt.read_best_pointer(path) or ckpt.latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint nor a run directory with checkpoints; pass a "
            "checkpoint folder (with model.safetensors) or the run_dir of a training run"
        )
    return found


def bleu_of(
    translator: Translator, pairs: Sequence[tuple[str, str]], beam_size: int
) -> tuple[float, float]:
    """Corpus BLEU and chrF of the translator on (source, reference) pairs."""
    hyps = translator.translate([s for s, _ in pairs], beam_size=beam_size)
    result = corpus_bleu(hyps, [t for _, t in pairs])
    return result.bleu, result.chrf


# --------------------------------------------------------------------------- training


def train_translation(
    exp: Experiment, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a translation model as `exp` describes; returns the final validation metrics."""
    data = TranslationData.from_dict(exp.data)
    decode = DecodeConfig.from_dict(exp.decode)
    run_dir = exp.run_dir
    exp.check_run_dir(resume)
    # A device or precision this machine lacks is refused before any data is read or written.
    resolve_precision(exp.train.precision, resolve_device(exp.train.device, Distributed.from_env()))

    train_pairs, valid_pairs = data.read("train"), data.read("valid")
    if not train_pairs or not valid_pairs:
        raise DataError(
            "the training or validation data is empty; check the data section of the config"
        )
    tokenizer_path = run_dir / TOKENIZER_FILE
    new_tokenizer = not (resume and tokenizer_path.is_file())
    if not new_tokenizer:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        t0 = time.perf_counter()
        # One joint vocabulary for both languages (§5.1: "a shared source-target vocabulary").
        texts = [s for s, _ in train_pairs] + [t for _, t in train_pairs]
        tokenizer = Tokenizer.train(texts, data.vocab_size, data.min_frequency)
        logger.info(
            "trained a %d-token BPE vocabulary in %.1fs",
            tokenizer.vocab_size,
            time.perf_counter() - t0,
        )

    model_cfg = exp.model_config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    try:
        train_ids, n_cut = fit_to_max_len(
            _encode_pairs(tokenizer, train_pairs), model_cfg.max_len, data.max_len_policy
        )
    except DataError as exc:  # policy "reject": say which data and which settings
        raise DataError(
            f"training {exc} (examples count from 0; the settings are model.max_len and "
            "data.max_len_policy)"
        ) from None
    if n_cut:
        logger.warning(
            "%d of %d training pairs were longer than max_len %d and were truncated",
            n_cut,
            len(train_ids),
            model_cfg.max_len,
        )
    valid_ids, _ = fit_to_max_len(
        _encode_pairs(tokenizer, valid_pairs), model_cfg.max_len, "truncate"
    )

    if new_tokenizer:  # saved only now, so that a run refused for its data writes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_path)

    torch.manual_seed(exp.train.seed)
    model = Transformer(model_cfg)
    logger.info("model: %s parameters", f"{model.num_parameters():,}")
    ids = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    sampler = TokenBatchSampler(
        example_lengths(train_ids), exp.train.max_tokens, shuffle=True, seed=exp.train.seed
    )

    def evaluate(m: Transformer) -> dict[str, float]:
        metrics = {
            "val_loss": validation_loss(m, valid_ids, max_tokens=exp.train.max_tokens, **ids)
        }
        bleu, chrf = bleu_of(Translator(m, tokenizer, decode), valid_pairs, decode.eval_beam_size)
        return {**metrics, "bleu": bleu, "chrf": chrf}

    run_config = exp.resolved(model_cfg)
    trainer = Trainer(
        model,
        exp.train,
        sampler=sampler,
        make_batch=batch_maker(train_ids, **ids, pin=torch.cuda.is_available()),
        loss_fn=seq2seq_loss(tokenizer.pad_id, exp.train.label_smoothing, fused=exp.train.compile),
        run_dir=run_dir,
        run_config=run_config,
        d_model=model_cfg.d_model,
        evaluate=evaluate,
        best_metric="bleu",
        higher_is_better=True,
        extra_files={TOKENIZER_FILE: tokenizer_path},
    )
    if resume:
        trainer.resume()
    else:
        exp.write_config(run_config)
    result = trainer.fit(progress=progress)
    exp.plot_curves()
    return result.metrics


def _encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    src = tokenizer.encode_batch([s for s, _ in pairs])
    tgt = tokenizer.encode_batch([t for _, t in pairs])
    return list(zip(src, tgt, strict=True))
