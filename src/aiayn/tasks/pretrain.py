"""Pre-training on unlabelled text: masked LM, span denoising, causal LM, on the one Trainer.

`aiayn train configs/pretrain_mlm.yaml` runs `train_pretrain`. The objective (data.objective):

    mlm      BERT: an encoder-only model (n_decoder_layers: 0) + `MaskedLMHead` tied to the
             embeddings; 15% of tokens chosen (80% <mask>, 10% random, 10% unchanged), the
             loss on the chosen positions only. Examples: per-document chunks, `ids </s>`.
             Metrics: val_loss (per chosen token) and mlm_accuracy.
    denoise  T5 span corruption: an encoder-decoder model; ~15% of tokens in spans of mean
             length 3, each replaced by a sentinel <extra_id_i> in the source, the target is
             the spans after their sentinels. Per-document chunks. Metrics: val_loss,
             val_accuracy (target tokens), span_accuracy (the spans' tokens only).
    causal   GPT: a decoder-only model (n_encoder_layers: 0), next-token prediction on the
             concatenated documents cut into blocks. Metrics: val_loss, perplexity.

Masks and spans are drawn per batch from a generator seeded by (train.seed, epoch, batch
position in the epoch), so a run is reproducible and `--resume` continues exactly; the
validation corruption is fixed, each held-out example's from its own index and a constant
seed (`Objective.fixed_batch`), so validation metrics compare across steps and across runs
(another train.seed or train.max_tokens).

Checkpoints are ordinary Trainer checkpoints of the model with `tokenizer.json` beside them:
the state dict carries the `Transformer`'s own parameter names; only the masked-LM head's
tensors are extra, under `mlm_head.`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data.batching import DeviceBatch, TokenBatchSampler, collate, pad_ids
from aiayn.data.pretraining import (
    chunk_documents,
    concat_and_chunk,
    corrupt_spans,
    mask_tokens,
    max_spans,
    read_documents,
    span_counts,
)
from aiayn.data.tokenizer import MASK, Tokenizer, sentinel
from aiayn.errors import ConfigError, DataError
from aiayn.experiment import Experiment, releases_run_dir
from aiayn.lm_heads import CausalLanguageModel, MaskedLanguageModel
from aiayn.model import Transformer
from aiayn.tasks.seq2seq import Seq2SeqBatch
from aiayn.train import Distributed, Trainer, label_smoothed_nll, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
OBJECTIVES = ("mlm", "denoise", "causal")
SOURCE_KEYS = ("path", "field", "split", "max_docs")
VALID_SPLIT_SEED = 0  # the held-out documents do not move when train.seed changes


@dataclass
class PretrainData(ConfigSection):
    """The pre-training corpus and objective (the `data` section of a `task: pretrain` config).

    sources: a list of {path, field, split, max_docs}: a table (.jsonl/.tsv/.csv[.gz]) with
    `field` the text column, or a plain text file with `split` "line" (a document a line, the
    default) or "paragraph" (blank-line separated); `max_docs` keeps the first N documents.
    Relative paths start at `root` when it is set (`--data.root` moves every source at once).
    """

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"objective": OBJECTIVES}

    objective: str = "mlm"
    sources: list[dict[str, Any]] = field(default_factory=list)
    root: str | None = None
    block_size: int = 128  # tokens per example (</s> included for mlm and denoise)
    vocab_size: int = 16000  # BPE vocabulary trained on the training documents
    min_frequency: int = 2
    tokenizer: str | None = None  # use this tokenizer.json instead of training one
    valid_fraction: float = 0.02  # documents held out for validation
    max_valid_examples: int | None = 1000  # validate on the first N held-out chunks (speed)
    mask_prob: float = 0.15  # mlm: share of tokens chosen (BERT)
    noise_density: float = 0.15  # denoise: share of tokens in noise spans (T5)
    mean_span_length: float = 3.0  # denoise: mean noise span length (T5)

    def check(self) -> None:
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError(
                "data.sources must be a non-empty list of {path: ..., field: ...} entries"
            )
        for i, source in enumerate(self.sources):
            if not isinstance(source, dict) or not isinstance(source.get("path"), str):
                raise ConfigError(f"data.sources[{i}] must be a mapping with a path: string")
            unknown = sorted(set(source) - set(SOURCE_KEYS))
            if unknown:
                raise ConfigError(
                    f"data.sources[{i}] has unknown key {unknown[0]!r}; allowed: "
                    f"{', '.join(SOURCE_KEYS)}"
                )
            if source.get("split", "line") not in ("line", "paragraph"):
                raise ConfigError(f"data.sources[{i}].split must be 'line' or 'paragraph'")
            max_docs = source.get("max_docs")
            if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
                raise ConfigError(f"data.sources[{i}].max_docs must be an integer >= 1")
        if self.block_size < 2:
            raise ConfigError(
                f"data.block_size must be >= 2 (a token and its context), got {self.block_size}"
            )
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be >= 8, got {self.vocab_size}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.max_valid_examples is not None and self.max_valid_examples < 1:
            raise ConfigError("data.max_valid_examples must be >= 1 or null")
        for name in ("mask_prob", "noise_density"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"data.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"data.mean_span_length must be >= 1, got {self.mean_span_length}")

    def source_path(self, source: dict[str, Any]) -> Path:
        path = Path(source["path"]).expanduser()
        return Path(self.root).expanduser() / path if self.root and not path.is_absolute() else path

    @property
    def n_sentinels(self) -> int:
        """Sentinels a denoising tokenizer needs for the longest chunk (block_size - 1 tokens)."""
        return max_spans(self.block_size - 1, self.noise_density, self.mean_span_length)

    def special_tokens(self) -> list[str]:
        """The objective's extra special tokens, appended after <pad> <s> </s> <unk>."""
        if self.objective == "mlm":
            return [MASK]
        if self.objective == "denoise":
            return [sentinel(i) for i in range(self.n_sentinels)]
        return []


def check_experiment(exp: Experiment) -> PretrainData:
    """The data section, and a model shaped for its objective; ConfigError otherwise."""
    data = PretrainData.from_dict(exp.data)
    if exp.decode:
        raise ConfigError("task pretrain has no decode section; remove it from the config")
    cfg = exp.model_before_tokenizer()
    enc, dec = cfg.n_encoder_layers, cfg.n_decoder_layers
    needs = {
        "mlm": (enc >= 1 and dec == 0, "an encoder-only model: set model.n_decoder_layers: 0"),
        "denoise": (enc >= 1 and dec >= 1, "an encoder and a decoder: set both layer counts >= 1"),
        "causal": (enc == 0 and dec >= 1, "a decoder-only model: set model.n_encoder_layers: 0"),
    }
    ok, what = needs[data.objective]
    if not ok:
        raise ConfigError(
            f"objective {data.objective} needs {what} (got n_encoder_layers {enc}, "
            f"n_decoder_layers {dec})"
        )
    if cfg.max_len < data.block_size:
        raise ConfigError(
            f"model.max_len ({cfg.max_len}) is shorter than data.block_size "
            f"({data.block_size}); raise max_len or lower block_size"
        )
    return data


# --------------------------------------------------------------------------- batches


class KeyedBatch(list):
    """A training batch's example indices, with the (epoch, position) that seeds its corruption."""

    def __init__(self, indices: list[int], epoch: int, position: int) -> None:
        super().__init__(indices)
        self.key = (epoch, position)


class KeyedBatchSampler(TokenBatchSampler):
    """A `TokenBatchSampler` whose batches carry their place in the data stream (`KeyedBatch`).

    The Trainer hands the batch lists to `make_batch` unchanged, so a batch's masks can be a
    function of (seed, epoch, position): the same on a resumed run as on an uninterrupted one.
    """

    def batches(self, epoch: int) -> list[list[int]]:
        return [KeyedBatch(b, epoch, i) for i, b in enumerate(super().batches(epoch))]


def batch_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *key) by a hash (no two keys share a stream by accident)."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _batch_key(indices: list[int]) -> tuple[int, int]:
    key = getattr(indices, "key", None)
    if key is None:
        raise TypeError("pre-training batches come from a KeyedBatchSampler (they seed the masks)")
    return key


@dataclass
class MaskedLMBatch(DeviceBatch):
    """input_ids (B, S) with BERT's corruption; labels (B, S): original ids where chosen, else
    pad; chosen (N,): where labels are not pad, as indices among the B S positions (row-major).

    `chosen` is found on the CPU when the batch is made, so that neither the model nor the loss
    selects by a mask on the device: a selection's size read from the device would make the
    host wait for it every step (and break a compiled model's graph).
    """

    input_ids: Tensor
    labels: Tensor
    chosen: Tensor
    n_tokens: int  # chosen positions: what the loss is summed over


@dataclass
class CausalLMBatch(DeviceBatch):
    """tgt_in (B, T) and tgt_out (B, T) = tgt_in shifted left by one."""

    tgt_in: Tensor
    tgt_out: Tensor
    n_tokens: int


@dataclass
class Objective:
    """What the task needs from an objective: examples, their lengths, batches, loss, metrics."""

    name: str
    tokenizer: Tokenizer
    data: PretrainData
    examples: list[list[int]] = field(default_factory=list)

    # ------------------------------------------------------------------ examples
    def make_examples(self, docs: list[list[int]]) -> list[list[int]]:
        """Token-id examples from tokenized documents."""
        n = self.data.block_size
        tok = self.tokenizer
        if self.name == "causal":
            return concat_and_chunk(docs, n, tok.bos_id, tok.eos_id)
        # ids + </s> <= block_size; span corruption needs >= 2 tokens to split.
        return chunk_documents(docs, n - 1, min_len=2 if self.name == "denoise" else 1)

    def lengths(self, examples: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(source, target) lengths of each example's tensors, for the token budget."""
        if self.name == "mlm":
            return [(len(x) + 1, len(x) + 1) for x in examples]
        if self.name == "causal":
            return [(len(x) - 1, len(x) - 1) for x in examples]
        out = []
        for x in examples:
            n_noise, n_spans = span_counts(
                len(x), self.data.noise_density, self.data.mean_span_length
            )
            out.append((len(x) - n_noise + n_spans + 1, n_noise + n_spans + 1))
        return out

    # ------------------------------------------------------------------ batches
    def batch(self, examples: Sequence[Sequence[int]], generator: torch.Generator):
        """A training batch of the examples, corrupted with draws from `generator`."""
        return self._corrupted(examples, [generator] * len(examples), whole_batch=True)

    def fixed_batch(self, examples: Sequence[Sequence[int]], keys: Sequence[int]):
        """A validation batch: each example corrupted from a generator of its own key (its
        index among the held-out examples) and a constant seed, so that its masks or spans
        are the same whatever the run's train.seed, batch size and batch neighbours, and
        validation metrics compare across runs as well as across steps."""
        generators = [batch_generator(VALID_SPLIT_SEED, -1, key) for key in keys]
        return self._corrupted(examples, generators, whole_batch=False)

    def _corrupted(
        self,
        examples: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator],
        whole_batch: bool,
    ):
        """The batch, example i corrupted with draws from generators[i]; `whole_batch`: the
        masked LM draws the padded batch's masks at once from generators[0] (training's
        masks, which resumed runs must draw again exactly), else row by row."""
        tok = self.tokenizer
        if self.name == "mlm":
            rows = [[*x, tok.eos_id] for x in examples]
            if whole_batch:
                inputs, labels = self._mask(pad_ids(rows, tok.pad_id), generators[0])
            else:
                masked = [
                    self._mask(torch.tensor([row]), g)
                    for row, g in zip(rows, generators, strict=True)
                ]
                inputs = pad_ids([m[0][0].tolist() for m in masked], tok.pad_id)
                labels = pad_ids([m[1][0].tolist() for m in masked], tok.pad_id)
            chosen = labels.ne(tok.pad_id).flatten().nonzero().squeeze(1)
            return MaskedLMBatch(inputs, labels, chosen, chosen.numel())
        if self.name == "causal":
            ids = pad_ids([list(x) for x in examples], tok.pad_id)
            tgt_in, tgt_out = ids[:, :-1], ids[:, 1:]
            return CausalLMBatch(tgt_in, tgt_out, int(tgt_out.ne(tok.pad_id).sum()))
        sentinels = self.sentinel_ids()
        pairs = [
            corrupt_spans(
                x,
                sentinels,
                noise_density=self.data.noise_density,
                mean_span_length=self.data.mean_span_length,
                generator=g,
            )
            for x, g in zip(examples, generators, strict=True)
        ]
        src, tgt_in, tgt_out = collate(pairs, tok.pad_id, tok.bos_id, tok.eos_id)
        return Seq2SeqBatch(src, tgt_in, tgt_out, int(tgt_out.ne(tok.pad_id).sum()))

    def _mask(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """BERT's corruption of padded ids (B, S): inputs and labels, each (B, S)."""
        tok = self.tokenizer
        return mask_tokens(
            ids,
            mask_id=tok.token_to_id(MASK),
            special_ids=tok.special_ids,
            vocab_size=tok.vocab_size,
            pad_id=tok.pad_id,
            mask_prob=self.data.mask_prob,
            generator=generator,
        )

    def sentinel_ids(self) -> list[int]:
        """The ids of <extra_id_0>, <extra_id_1>, ... (the denoising objective's)."""
        return [self.tokenizer.token_to_id(sentinel(i)) for i in range(self.data.n_sentinels)]

    def batch_maker(self, examples: list[list[int]], seed: int) -> Callable[[list[int]], Any]:
        def make(indices: list[int]):
            return self.batch(
                [examples[i] for i in indices], batch_generator(seed, *_batch_key(indices))
            )

        return make

    # ------------------------------------------------------------------ loss and metrics
    def logits_and_targets(self, model: nn.Module, batch) -> tuple[Tensor, Tensor]:
        """Logits and their targets, pad where nothing is scored: (N, V) and (N,) for the
        masked LM (only the N chosen positions), (B, T, V) and (B, T) for the others."""
        if self.name == "mlm":
            targets = batch.labels.flatten().index_select(0, batch.chosen)  # (N,)
            return model(batch.input_ids, batch.chosen), targets
        if self.name == "causal":
            return model(batch.tgt_in), batch.tgt_out
        return model(batch.src, batch.tgt_in), batch.tgt_out

    def loss_fn(self, smoothing: float) -> Callable[[nn.Module, Any], Tensor]:
        pad = self.tokenizer.pad_id

        def loss(model: nn.Module, batch) -> Tensor:
            logits, targets = self.logits_and_targets(model, batch)
            if logits.dim() == 2:  # selected positions (N, V): the shape the loss expects
                logits, targets = logits[None], targets[None]
            # Nothing reads the logits after the backward pass: their memory takes the gradient.
            return label_smoothed_nll(logits, targets, pad, smoothing, inplace_backward=True)

        return loss

    def evaluator(
        self, examples: list[list[int]], max_tokens: int
    ) -> Callable[[nn.Module], dict[str, float]]:
        """Validation on fixed batches (`fixed_batch`, corrupted once): loss and accuracy.

        The denoising objective also reports `span_accuracy`: over the spans' own tokens,
        without the sentinels and </s> that make up about a third of its targets and that
        come in a fixed order (`val_accuracy` counts them).
        """
        sampler = TokenBatchSampler(self.lengths(examples), max_tokens, shuffle=False)
        batches = [self.fixed_batch([examples[i] for i in b], b) for b in sampler.batches(0)]
        pad = self.tokenizer.pad_id
        given = (
            torch.tensor([*self.sentinel_ids(), self.tokenizer.eos_id])
            if self.name == "denoise"
            else None
        )

        def evaluate(model: nn.Module) -> dict[str, float]:
            device = next(model.parameters()).device
            total, correct, tokens, span_correct, span_tokens = 0.0, 0, 0, 0, 0
            for batch in batches:
                batch = batch.to(device)
                logits, targets = self.logits_and_targets(model, batch)
                logits = logits.reshape(-1, logits.size(-1)).float()
                targets = targets.reshape(-1)
                scored = targets.ne(pad)
                total += float(
                    label_smoothed_nll(logits[None], targets[None], pad, 0.0, fused=False)
                )
                hits = logits.argmax(-1).eq(targets) & scored
                correct += int(hits.sum())
                tokens += int(scored.sum())
                if given is not None:
                    spans = scored & ~torch.isin(targets, given.to(device))
                    span_correct += int((hits & spans).sum())
                    span_tokens += int(spans.sum())
            val_loss = total / max(tokens, 1)
            accuracy = correct / max(tokens, 1)
            if self.name == "mlm":
                return {"val_loss": val_loss, "mlm_accuracy": accuracy}
            if self.name == "causal":
                return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}
            span_accuracy = span_correct / max(span_tokens, 1)
            return {"val_loss": val_loss, "val_accuracy": accuracy, "span_accuracy": span_accuracy}

        return evaluate

    def model(self, cfg: TransformerConfig) -> Transformer:
        if self.name == "mlm":
            return MaskedLanguageModel(cfg)
        if self.name == "causal":
            return CausalLanguageModel(cfg)
        return Transformer(cfg)


# --------------------------------------------------------------------------- data preparation


def read_corpus(data: PretrainData) -> tuple[list[str], list[str]]:
    """All sources' documents, split into (train, valid) by a fixed random draw of documents."""
    docs: list[str] = []
    for source in data.sources:
        found = read_documents(
            data.source_path(source),
            source.get("field"),
            source.get("split", "line"),
            source.get("max_docs"),
        )
        logger.info("%s: %d documents", data.source_path(source), len(found))
        docs += found
    if len(docs) < 2:
        raise DataError(
            f"the sources hold {len(docs)} document(s); pre-training needs at least 2 (one "
            "is held out for validation): add text or use split: line"
        )
    order = list(range(len(docs)))
    random.Random(VALID_SPLIT_SEED).shuffle(order)
    n_valid = min(max(1, round(data.valid_fraction * len(docs))), len(docs) - 1)
    valid = sorted(order[:n_valid])
    held = set(valid)
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in valid]


def build_tokenizer(data: PretrainData, texts: list[str], run_dir: Path, resume: bool) -> Tokenizer:
    """The run's tokenizer: the run_dir's on --resume, data.tokenizer if given, else trained."""
    saved = run_dir / TOKENIZER_FILE
    if resume and saved.is_file():
        tokenizer, where = Tokenizer.load(saved), str(saved)
    elif data.tokenizer is not None:
        tokenizer, where = Tokenizer.load(Path(data.tokenizer).expanduser()), data.tokenizer
    else:
        t0 = time.perf_counter()
        tokenizer = Tokenizer.train(
            texts, data.vocab_size, data.min_frequency, extra_special_tokens=data.special_tokens()
        )
        logger.info(
            "trained a %d-token BPE vocabulary in %.1fs",
            tokenizer.vocab_size,
            time.perf_counter() - t0,
        )
        return tokenizer
    missing = [t for t in data.special_tokens() if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(
            f"{where} has no {missing[0]} token, which objective {data.objective} needs "
            f"({len(missing)} missing); leave data.tokenizer unset to train one with it"
        )
    return tokenizer


# --------------------------------------------------------------------------- training


@releases_run_dir
def train_pretrain(
    exp: Experiment, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Pre-train as `exp` describes; returns the final validation metrics."""
    data = check_experiment(exp)
    run_dir = exp.run_dir
    exp.check_run_dir(resume, {"data": data})
    resolve_precision(exp.train.precision, resolve_device(exp.train.device, Distributed.from_env()))

    train_docs, valid_docs = read_corpus(data)
    tokenizer = build_tokenizer(data, train_docs, run_dir, resume)
    objective = Objective(data.objective, tokenizer, data)
    train_examples = objective.make_examples(tokenizer.encode_batch(train_docs))
    valid_examples = objective.make_examples(tokenizer.encode_batch(valid_docs))
    valid_examples = valid_examples[: data.max_valid_examples]
    if not train_examples or not valid_examples:
        raise DataError(
            "the corpus gives no training or no validation examples; add text to the sources "
            "or raise data.valid_fraction"
        )
    logger.info(
        "%s: %d training and %d validation examples of <= %d tokens",
        data.objective,
        len(train_examples),
        len(valid_examples),
        data.block_size,
    )

    tokenizer_path = run_dir / TOKENIZER_FILE
    if not (resume and tokenizer_path.is_file()):  # saved only now: a refused run writes nothing
        exp.claim_run_dir()
        tokenizer.save(tokenizer_path)

    model_cfg = exp.model_config(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    torch.manual_seed(exp.train.seed)
    model = objective.model(model_cfg)
    logger.info("model: %s parameters", f"{model.num_parameters():,}")
    seed = exp.train.seed
    sampler = KeyedBatchSampler(
        objective.lengths(train_examples), exp.train.max_tokens, shuffle=True, seed=seed
    )
    run_config = exp.resolved(model_cfg)
    trainer = Trainer(
        model,
        exp.train,
        sampler=sampler,
        make_batch=objective.batch_maker(train_examples, seed),
        loss_fn=objective.loss_fn(exp.train.label_smoothing),
        run_dir=run_dir,
        run_config=run_config,
        d_model=model_cfg.d_model,
        evaluate=objective.evaluator(valid_examples, exp.train.max_tokens),
        best_metric="val_loss",
        higher_is_better=False,
        extra_files={TOKENIZER_FILE: tokenizer_path},
        # A checkpoint without the data's digest is older than validation masks drawn from
        # each example's index: its val_loss was measured on masks of train.seed and batching.
        stale_best_without_digest=True,
    )
    return exp.fit(trainer, run_config, resume=resume, progress=progress).metrics
