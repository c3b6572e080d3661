"""Translation end to end: corpora, a joint BPE vocabulary, training, decoding, sacreBLEU.

`train_translation(experiment)` is what `aiayn train configs/multi30k_de_en.yaml` runs;
`Translator.from_checkpoint(dir)` is what `aiayn translate` and `aiayn evaluate` use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data import corpus
from aiayn.data.batching import fit_to_max_len, pad_ids
from aiayn.data.packed import PackedPairs
from aiayn.data.tokenizer import Tokenizer
from aiayn.decoding import translate_ids
from aiayn.errors import CheckpointError, ConfigError, DataError
from aiayn.experiment import Experiment, releases_run_dir
from aiayn.metrics import corpus_bleu
from aiayn.model import Transformer, recording_attention
from aiayn.tasks.seq2seq import TOKENIZER_FILE, check_run, drop_empty, train_seq2seq

logger = logging.getLogger(__name__)

__all__ = ["TOKENIZER_FILE", "DecodeConfig", "TranslationData", "Translator", "train_translation"]


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
        "max_len_policy": ("truncate", "drop", "reject"),
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
    # A training pair longer than model.max_len: cut it, leave it out, or stop.
    max_len_policy: str = "truncate"
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
        pairs = drop_empty(pairs, split)
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
    no_repeat_ngram_size: int = 0  # n > 0: no output repeats one of its n-grams (0: the paper)
    # Search with aiayn.static_decoding (the same results, faster): one CUDA graph launch per
    # step on a GPU, the decoder's weights laid out for the CPU on a CPU; false: the
    # reference search of aiayn.decoding.
    cuda_graphs: bool = True

    def check(self) -> None:
        if self.beam_size < 1 or self.eval_beam_size < 1 or self.batch_size < 1:
            raise ConfigError(
                "decode.beam_size, decode.eval_beam_size and decode.batch_size must be >= 1"
            )
        if self.length_penalty < 0:
            raise ConfigError(f"decode.length_penalty must be >= 0, got {self.length_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(
                f"decode.no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}"
            )


# --------------------------------------------------------------------------- inference


class Translator:
    """A trained model with its tokenizer: strings in, strings out.

    Any encoder-decoder task decodes this way; a subclass names its task in `TASK` (checked
    when a checkpoint is loaded) and may build itself from the run's config in `from_run`.
    `max_src_len` cuts longer sources to their first ids (default: what the model's positions
    allow), with a warning that counts them; with `warn_cut` False the count is logged as
    information (validation during training, whose data the run has already counted, and a
    summarizer, whose configured data.max_src_len cuts most documents by design).
    """

    TASK: ClassVar[str] = "translation"

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        decode: DecodeConfig,
        max_src_len: int | None = None,
        warn_cut: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        self.warn_cut = warn_cut
        limit = model.cfg.max_len - 1
        self.max_src_len = limit if max_src_len is None else min(max_src_len, limit)

    @classmethod
    def from_run(cls, model: Transformer, tokenizer: Tokenizer, run: dict[str, Any]) -> Translator:
        """The decoder of a loaded model, configured by its run's config (as checkpoints store it)."""
        return cls(model, tokenizer, DecodeConfig.from_dict(run.get("decode", {})))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Translator:
        """Load a checkpoint directory, or a run directory (its best, else its latest checkpoint)."""
        return load_resolved(path, lambda found: cls._load(found, device))

    @classmethod
    def _load(cls, path: Path, device: str) -> Translator:
        run = ckpt.load_checkpoint(path).config
        if run.get("task") != cls.TASK:
            raise CheckpointError(
                f"{path} holds {task_model(run)}, not a {cls.TASK} model; pass a checkpoint "
                f"of an `aiayn train` run of task {cls.TASK}"
            )
        model = Transformer(TransformerConfig.from_dict(ckpt.model_section(run, path)))
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
        return cls.from_run(model.to(device).eval(), tokenizer, run)

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids + EOS for each sentence, cut to its first `max_src_len` ids."""
        limit = self.max_src_len
        encoded = self.tokenizer.encode_batch(list(sentences))
        n_cut = sum(len(ids) > limit for ids in encoded)
        if n_cut:  # what the model could not read is not in its output
            logger.log(
                logging.WARNING if self.warn_cut else logging.INFO,
                "%d of %d inputs are longer than %d tokens and were cut to their first %d",
                n_cut,
                len(encoded),
                limit,
                limit,
            )
        return [ids[:limit] + [self.tokenizer.eos_id] for ids in encoded]

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int | None = None,
        length_penalty: float | None = None,
        max_len: int | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> list[str]:
        """Translate sentences in batches sorted by length (less padding), returned in input order.

        `max_len` caps every output at that many tokens, whatever the source length (default:
        the decode section's `max_len_a * source length + max_len_b`). `no_repeat_ngram_size`:
        n-gram blocking (default: the decode section's, 0 = off).
        """
        if no_repeat_ngram_size is None:
            no_repeat_ngram_size = self.decode.no_repeat_ngram_size
        beam = beam_size or self.decode.beam_size
        alpha = self.decode.length_penalty if length_penalty is None else length_penalty
        len_a, len_b = (
            (self.decode.max_len_a, self.decode.max_len_b) if max_len is None else (0, max_len)
        )
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
                max_len_a=len_a,
                max_len_b=len_b,
                no_repeat_ngram_size=no_repeat_ngram_size,
                static=None if self.decode.cuda_graphs else False,
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


T = TypeVar("T")


def load_resolved(path: str | Path, load: Callable[[Path], T]) -> T:
    """`load` of the checkpoint `path` names (`resolve_checkpoint`). A run still training may
    prune that checkpoint (keep_last) while it is read: then the run's checkpoint is looked
    up again, rather than failing with a message about the files that vanished."""
    for _ in range(3):
        found = resolve_checkpoint(path)
        try:
            return load(found)
        except (CheckpointError, OSError):
            if found.is_dir():  # still there: the error is the checkpoint's own
                raise
    raise CheckpointError(
        f"the checkpoints of {path} were deleted three times while being read: a training "
        "in it is pruning them; wait for it to end, or pass one checkpoint it keeps (best.json)"
    )


def task_model(run: dict[str, Any]) -> str:
    """What a checkpoint holds, as an error message names it, from its run config: "a
    'translation' model", or the model of an `aiayn demo` from before its checkpoints named
    their task (2026-11-27), which `aiayn translate` cannot load."""
    if "task" in run:
        return f"a {run['task']!r} model"
    if "demo" in run:
        return "the model of an older `aiayn demo` (run `aiayn demo` again for one `aiayn translate` loads)"
    return "a model of no known task"


def bleu_of(
    translator: Translator, pairs: Sequence[tuple[str, str]], beam_size: int
) -> tuple[float, float]:
    """Corpus BLEU and chrF of the translator on (source, reference) pairs."""
    hyps = translator.translate([s for s, _ in pairs], beam_size=beam_size)
    result = corpus_bleu(hyps, [t for _, t in pairs])
    return result.bleu, result.chrf


# --------------------------------------------------------------------------- training


@releases_run_dir
def train_translation(
    exp: Experiment, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a translation model as `exp` describes; returns the final validation metrics."""
    data = TranslationData.from_dict(exp.data)
    decode = DecodeConfig.from_dict(exp.decode)
    check_run(exp, resume, data)
    train_pairs, valid_pairs = data.read("train"), data.read("valid")

    def fit(examples: PackedPairs, model_cfg: TransformerConfig, split: str) -> PackedPairs:
        if split != "train":
            return fit_to_max_len(examples, model_cfg.max_len, "truncate")[0]
        try:
            train_ids, n_cut = fit_to_max_len(examples, model_cfg.max_len, data.max_len_policy)
        except DataError as exc:  # policy "reject": say which data and which settings
            raise DataError(
                f"training {exc} (examples count from 0; the settings are model.max_len and "
                "data.max_len_policy)"
            ) from None
        if n_cut:
            logger.warning(
                "%d of %d training pairs were longer than max_len %d and were %s",
                n_cut,
                len(examples),
                model_cfg.max_len,
                "left out" if data.max_len_policy == "drop" else "truncated",
            )
            if not train_ids:
                raise DataError(
                    f"every training pair is longer than model.max_len {model_cfg.max_len}: "
                    "raise it, or set data.max_len_policy to truncate"
                )
        return train_ids

    def score(model: Transformer, tokenizer: Tokenizer) -> dict[str, float]:
        translator = Translator(model, tokenizer, decode, warn_cut=False)
        bleu, chrf = bleu_of(translator, valid_pairs, decode.eval_beam_size)
        return {"bleu": bleu, "chrf": chrf}

    return train_seq2seq(
        exp,
        train_pairs,
        valid_pairs,
        vocab_size=data.vocab_size,
        min_frequency=data.min_frequency,
        fit=fit,
        score=score,
        best_metric="bleu",
        higher_is_better=True,
        resume=resume,
        progress=progress,
    )
