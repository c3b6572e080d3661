"""The embedded demo: teach a small Transformer to say numbers in German, in minutes on a CPU.

`run_demo` is what ``aiayn demo`` runs. It needs no download and no GPU:

1. it generates English -> German number words (`aiayn.tasks.numbers`): disjoint train,
   validation and test sets of numbers below a million, one shared word-level vocabulary;
2. trains a small encoder-decoder `Transformer` with the project's `Trainer` (the paper's
   Adam schedule, token-budget batches, label smoothing 0.1), validating by exact match;
3. translates the held-out test numbers with greedy search and reports the exact-match rate;
4. draws the decoder's cross-attention for one test number, in which German's units-before-
   tens order ("forty two" -> "zwei und vierzig") shows as a crossing of the alignment,
   and the training curves.

With the defaults (see `DemoConfig`) the whole demo takes about a minute and a half on two
CPU cores and translates more than 99% of 2,000 held-out numbers exactly right.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from aiayn import checkpoint as ckpt
from aiayn import run_lock
from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data.batching import TokenBatchSampler, example_lengths, pad_ids
from aiayn.decoding import translate_ids
from aiayn.errors import ConfigError
from aiayn.model import Transformer, recording_attention
from aiayn.plots import attention_heatmap, training_curves
from aiayn.tasks import numbers
from aiayn.tasks.seq2seq import TOKENIZER_FILE, batch_maker, seq2seq_loss, validation_loss
from aiayn.train import TrainConfig, Trainer, TrainingStopped

logger = logging.getLogger(__name__)

PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)  # the order of numbers.VOCAB_SPECIALS
HEATMAP_FILE = "attention.png"
CURVES_FILE = "training_curves.png"
RUN_SUBDIR = "run"  # the Trainer's run directory inside out_dir: train.jsonl, checkpoints/
DEMO_MARK = ".aiayn-demo"  # in run/: the demo wrote this folder, and may replace it
# The demo's search, also its checkpoints' decoding settings (`aiayn translate`): greedy, and
# German never needs more than 2 tokens per English one, plus 3 (the source's </s> counted).
DEMO_DECODE = {"beam_size": 1, "max_len_a": 2, "max_len_b": 3}


@dataclass
class DemoConfig(ConfigSection):
    """Everything the demo does. The defaults train to > 99% in about 80 s on 2 CPU cores.

    The model is far smaller than the paper's base model (d_model 512, d_ff 2048, 6 + 6
    layers): numbers have a vocabulary of ~60 words and sentences of at most 11 tokens, so
    2 + 2 layers of width 128 (670K parameters) are plenty, and one step over ~70 numbers
    takes about 60 ms on two CPU cores.
    """

    SECTION: ClassVar[str] = "demo"

    seed: int = 1  # data split, initialisation, batch order and dropout
    n_train: int = 20_000  # numbers to train on (0..99 always among them): ~3.5 epochs
    n_valid: int = 500  # numbers to validate on while training (exact match, loss)
    n_test: int = 2_000  # held-out numbers the reported exact match is measured on
    # Model: TransformerConfig fields, the same for encoder and decoder.
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    dropout: float = 0.1
    # Training: TrainConfig fields.
    max_steps: int = 1_000
    max_tokens: int = 1_024  # padded tokens per batch and side: ~70 numbers
    warmup_steps: int = 200
    # At the paper's rate (lr_scale 1) a model this narrow peaks at 5e-3 (warm-up 300): its
    # validation exact match swung between 86% and 99.6% (45% without dropout). At 0.3 (peak
    # 1.9e-3) it reaches 97-99% by step 300-400 and mostly stays there; the occasional dip
    # is why the best validated weights, not the last, are tested (`_restore_best`).
    lr_scale: float = 0.3
    label_smoothing: float = 0.1  # §5.4
    eval_every: int = 100  # steps between validations (0: only at the end)
    # Report.
    n_examples: int = 6  # example translations in the report
    heatmap_number: int | None = None  # the number whose attention is drawn; None: pick one

    def check(self) -> None:
        positive = ("n_train", "n_test", "d_model", "n_heads", "d_ff", "n_layers", "max_steps")
        for name in (*positive, "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_valid", "eval_every", "warmup_steps", "n_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"demo.{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"demo.d_model ({self.d_model}) must be divisible by demo.n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"demo.dropout must be in [0, 1), got {self.dropout}")
        if self.heatmap_number is not None:
            numbers.english_words(self.heatmap_number)  # raises ConfigError when out of range

    def model_config(self, vocab_size: int) -> TransformerConfig:
        """The `TransformerConfig` of the demo model for a vocabulary of ``vocab_size``."""
        return TransformerConfig(
            src_vocab_size=vocab_size,
            tgt_vocab_size=vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=self.n_layers,
            dropout=self.dropout,
            max_len=32,  # the longest number has 9 English and 11 German tokens, plus </s>
            pad_id=PAD_ID,
        )

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` of the demo run: CPU, fp32, checkpoints only at validations."""
        return TrainConfig(
            device="cpu",
            precision="fp32",
            seed=self.seed,
            max_steps=self.max_steps,
            max_tokens=self.max_tokens,
            warmup_steps=self.warmup_steps,
            lr_scale=self.lr_scale,
            label_smoothing=self.label_smoothing,
            log_every=max(1, min(50, self.max_steps // 20)),
            eval_every=self.eval_every,
            save_every=0,
            keep_last=1,
        )


@dataclass(frozen=True)
class Translation:
    """One test number: its English words, the model's German and the correct German."""

    number: int
    english: str  # display text, "three hundred forty-two"
    predicted: str  # the model's morphemes joined: "dreihundertzweiundvierzig"
    reference: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.reference


@dataclass
class DemoResult:
    """What `run_demo` measured and wrote."""

    exact_match: float  # percent of test numbers translated exactly right
    n_test: int
    n_correct: int
    train_seconds: float  # wall time of the training loop (validations included)
    total_seconds: float  # wall time of the whole demo: data, training, test, plots
    steps: int  # steps trained
    tested_step: int  # the step whose weights were tested: the best on validation
    n_parameters: int
    heatmap_path: Path
    curves_path: Path
    heatmap_title: str
    examples: list[Translation] = field(default_factory=list)  # test numbers of each size
    mistakes: list[Translation] = field(default_factory=list)  # a few wrong ones, if any


# --------------------------------------------------------------------------- data


def _encode(tokens: Sequence[str], index: dict[str, int]) -> list[int]:
    return [index.get(token, UNK_ID) for token in tokens]


def _source_batch(sources: Sequence[Sequence[int]]) -> Tensor:
    """(B, S) source ids as training saw them: ids + </s>, right-padded with <pad>."""
    return pad_ids([[*ids, EOS_ID] for ids in sources], PAD_ID)


def translate_numbers(
    model: Transformer,
    values: Sequence[int],
    vocab: Sequence[str],
    batch_size: int = 500,
) -> list[list[str]]:
    """Greedy translations (German morphemes) of ``values``, batched by similar length."""
    index = {token: i for i, token in enumerate(vocab)}
    sources = [_encode(numbers.english_words(n), index) for n in values]
    # Sorting by length keeps padding (and the rows still decoding) to a minimum.
    order = sorted(range(len(values)), key=lambda i: len(sources[i]))
    outputs: list[list[str]] = [[] for _ in values]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids = translate_ids(
            model,
            _source_batch([sources[i] for i in chunk]),
            beam_size=DEMO_DECODE["beam_size"],
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            max_len_a=DEMO_DECODE["max_len_a"],
            max_len_b=DEMO_DECODE["max_len_b"],
        )
        for i, out in zip(chunk, ids, strict=True):
            outputs[i] = [vocab[t] for t in out]
    return outputs


def _exact_match(model: Transformer, values: Sequence[int], vocab: Sequence[str]) -> list[bool]:
    predictions = translate_numbers(model, values, vocab)
    return [
        pred == numbers.german_morphemes(n) for n, pred in zip(values, predictions, strict=True)
    ]


def _pick_examples(translations: Sequence[Translation], k: int) -> list[Translation]:
    """``k`` test translations of varied size, shortest number first.

    The test numbers are uniform below a million, so nearly all have six digits; taking
    the first of each digit count in turn shows "three hundred forty-two" as well.
    """
    by_digits: dict[int, list[Translation]] = {}
    for t in translations:
        by_digits.setdefault(len(str(t.number)), []).append(t)
    queues = [by_digits[d] for d in sorted(by_digits)]
    picked: list[Translation] = []
    while len(picked) < k and any(queues):
        for queue in queues:
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda t: t.number)


# --------------------------------------------------------------------------- the heatmap


def _pick_heatmap_number(test: Sequence[int], correct: Sequence[bool]) -> int:
    """A test number whose German reorders clearly, one the model got right if there is one.

    Preferred: two units-and-tens pairs (57_861 -> "sieben und fünfzig tausend acht hundert
    ein und sechzig": two crossings) in a sentence short enough to label legibly.
    """

    def key(i: int) -> tuple[int, int, int, int]:
        n = test[i]
        n_und = numbers.german_morphemes(n).count("und")
        length = len(numbers.english_words(n))
        return (not correct[i], -n_und, abs(length - 7), i)

    return test[min(range(len(test)), key=key)]


def draw_attention(
    model: Transformer, n: int, vocab: Sequence[str], path: Path
) -> tuple[Path, str]:
    """Draw the cross-attention with which ``model`` translates ``n``; returns (path, title).

    The model's own greedy output is fed back teacher-forced under `recording_attention`, so
    row t is the attention with which the decoder produced its t-th token (and the last row
    its </s>), right or wrong. The map is the last decoder layer's, averaged over its heads:
    in the trained demo model that layer aligns each German morpheme with its English word,
    while the first layer's attention is spread out.
    """
    index = {token: i for i, token in enumerate(vocab)}
    english = numbers.english_words(n)
    german = translate_numbers(model, [n], vocab)[0]
    src = _source_batch([_encode(english, index)])
    tgt_in = torch.tensor([[BOS_ID, *_encode(german, index)]], dtype=torch.long)
    model.eval()
    with torch.no_grad(), recording_attention(model):
        model(src, tgt_in)
    layers = model.decoder.layers
    weights = layers[-1].cross_attn.weights[0].mean(dim=0)  # (T, S)
    # The numeral, not the words: the tick labels already spell both sentences out, and a
    # six-digit number's words would be wider than the figure.
    title = (
        f"Cross-attention translating {n:,}\n"
        f"decoder layer {len(layers)} of {len(layers)}, mean of {model.cfg.n_heads} heads"
    )
    attention_heatmap(weights, [*english, "</s>"], [*german, "</s>"], path, title=title)
    return path, title


# --------------------------------------------------------------------------- the demo


def _restore_best(model: Transformer, checkpoint_root: Path) -> int | None:
    """Load the checkpoint with the best validation exact match; return its step.

    Validation exact match still dips by several points now and then late in training (one wrong token is a wrong
    number), so testing the best validated weights rather than the last ones makes the
    demo's score steady across seeds. The test numbers play no part in the choice.
    """
    best = ckpt.read_best_pointer(checkpoint_root)
    if best is None:  # no validation set, so no best: keep the last weights
        return None
    step = ckpt.load_checkpoint(best, model=model).step
    logger.info("testing the best validated checkpoint, step %d (%s)", step, best)
    return step


def run_demo(out_dir: Path, cfg: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    """Generate the data, train, test, and draw; see the module docstring.

    Writes into ``out_dir``: ``attention.png``, ``training_curves.png`` and ``run/`` (the
    training log ``train.jsonl`` and the checkpoints). A previous demo's ``run/`` there is
    replaced, so the curves show this run only. The checkpoints are a translation task's,
    with the vocabulary as a tokenizer (`numbers.tokenizer`) and the demo's greedy search
    as their decoding settings, so that ``aiayn translate --checkpoint <out_dir>/run``
    translates other numbers as the demo does.
    """
    cfg = cfg or DemoConfig()
    out_dir = Path(out_dir)
    run_dir = out_dir / RUN_SUBDIR
    _check_replaceable(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_lock.hold(run_dir, "wait for that demo to end, or pass another --out")
    try:
        return _run_demo(out_dir, run_dir, cfg, progress)
    finally:
        run_lock.release(run_dir)


def _check_replaceable(run_dir: Path) -> None:
    """Refuse to replace a `run/` that is not a demo's: it may be someone's training run."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; the demo writes its run there: pass another --out")
    if (run_dir / DEMO_MARK).is_file() or not any(run_dir.iterdir()):
        return
    for checkpoint in ckpt.list_checkpoints(run_dir / "checkpoints"):
        try:  # a demo's from before the mark: its checkpoints record the demo's settings
            if "demo" in json.loads((checkpoint / ckpt.CONFIG_FILE).read_text(encoding="utf-8")):
                return
        except (OSError, ValueError):
            continue
    raise ConfigError(
        f"{run_dir} holds files that no demo wrote (a training run?), and the demo replaces "
        f"its {RUN_SUBDIR}/ folder: pass another --out"
    )


def _run_demo(out_dir: Path, run_dir: Path, cfg: DemoConfig, progress: bool) -> DemoResult:
    # The trainer appends to train.jsonl and keeps old checkpoints: start clean. The folder
    # itself stays: this process holds it (aiayn.run_lock).
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (run_dir / DEMO_MARK).write_text("written by aiayn demo, which replaces this folder\n")
    started = time.perf_counter()

    splits = numbers.make_splits(cfg.n_train, cfg.n_valid, cfg.n_test, seed=cfg.seed)
    train_pairs = numbers.pairs(splits["train"])
    vocab = numbers.build_vocab(train_pairs)
    index = {token: i for i, token in enumerate(vocab)}
    train_ids = [(_encode(en, index), _encode(de, index)) for en, de in train_pairs]
    valid_ids = [
        (_encode(en, index), _encode(de, index)) for en, de in numbers.pairs(splits["valid"])
    ]
    logger.info(
        "numbers: %d train, %d valid, %d test; vocabulary of %d words",
        len(splits["train"]),
        len(splits["valid"]),
        len(splits["test"]),
        len(vocab),
    )

    tokenizer_path = run_dir / TOKENIZER_FILE
    numbers.tokenizer(vocab).save(tokenizer_path)

    torch.manual_seed(cfg.seed)  # the Trainer does not seed: initialisation and dropout
    model_cfg = cfg.model_config(len(vocab))
    model = Transformer(model_cfg)
    train_cfg = cfg.train_config()
    logger.info(
        "model: %d parameters (d_model %d, %d + %d layers, %d heads)",
        model.num_parameters(),
        cfg.d_model,
        cfg.n_layers,
        cfg.n_layers,
        cfg.n_heads,
    )

    def evaluate(m: Transformer) -> dict[str, float]:
        if not splits["valid"]:
            return {}
        hits = _exact_match(m, splits["valid"], vocab)
        return {
            "val_loss": validation_loss(m, valid_ids, PAD_ID, BOS_ID, EOS_ID, cfg.max_tokens),
            "exact_match": 100.0 * sum(hits) / len(hits),
        }

    trainer = Trainer(
        model,
        train_cfg,
        sampler=TokenBatchSampler(example_lengths(train_ids), cfg.max_tokens, seed=cfg.seed),
        make_batch=batch_maker(train_ids, PAD_ID, BOS_ID, EOS_ID),
        # A vocabulary of a few dozen words: compiling the loss on a GPU would cost more time
        # than it saves in a run this short.
        loss_fn=seq2seq_loss(PAD_ID, cfg.label_smoothing, fused=False),
        run_dir=run_dir,
        run_config={
            "task": "translation",
            "demo": cfg.to_dict(),
            "model": model_cfg.to_dict(),
            "decode": DEMO_DECODE,
            "vocab": list(vocab),
        },
        d_model=cfg.d_model,
        extra_files={TOKENIZER_FILE: tokenizer_path},
        evaluate=evaluate,
        best_metric="exact_match",
        higher_is_better=True,
    )
    train_start = time.perf_counter()
    try:
        trained = trainer.fit(progress=progress)
    except TrainingStopped as stop:
        # The demo has no --resume (its next run replaces run/): say what to do instead.
        raise TrainingStopped(
            f"the demo was stopped by signal {stop.signal} at step {stop.step}; run "
            "`aiayn demo` again to train it from the start (about a minute and a half)",
            signal=stop.signal,
            step=stop.step,
            checkpoint=stop.checkpoint,
        ) from None
    train_seconds = time.perf_counter() - train_start
    logger.info("trained %d steps in %.1f s", trained.step, train_seconds)
    tested_step = _restore_best(model, trainer.checkpoint_root) or trained.step

    test = splits["test"]
    predictions = translate_numbers(model, test, vocab)
    translations = [
        Translation(n, numbers.english_text(n), "".join(pred), numbers.german_text(n))
        for n, pred in zip(test, predictions, strict=True)
    ]
    n_correct = sum(t.correct for t in translations)
    exact_match = 100.0 * n_correct / max(len(test), 1)
    logger.info("test exact match: %d of %d (%.2f%%)", n_correct, len(test), exact_match)

    examples = _pick_examples(translations, cfg.n_examples)
    heatmap_n = cfg.heatmap_number
    if heatmap_n is None:
        heatmap_n = _pick_heatmap_number(test, [t.correct for t in translations])
    heatmap_path, title = draw_attention(model, heatmap_n, vocab, out_dir / HEATMAP_FILE)
    curves_path = training_curves(
        run_dir / "train.jsonl", out_dir / CURVES_FILE, title="number words, English → German"
    )
    return DemoResult(
        exact_match=exact_match,
        n_test=len(test),
        n_correct=n_correct,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        steps=trained.step,
        tested_step=tested_step,
        n_parameters=model.num_parameters(),
        heatmap_path=heatmap_path,
        curves_path=curves_path,
        heatmap_title=title,
        examples=examples,
        mistakes=[t for t in translations if not t.correct and t not in examples][:3],
    )


def format_result(result: DemoResult) -> str:
    """The report ``aiayn demo`` prints: score, timings, example translations, file paths.

    Examples read "three hundred forty-two -> dreihundertzweiundvierzig ✓"; a wrong one is
    marked ✗ and followed by the correct German.
    """

    def line(t: Translation) -> str:
        return f"  {t.english} -> {t.predicted} " + (
            "✓" if t.correct else f"✗ (correct: {t.reference})"
        )

    n_wrong = result.n_test - result.n_correct
    lines = [
        f"exact match on {result.n_test:,} held-out numbers: {result.exact_match:.2f}% "
        f"({result.n_correct:,} right, {n_wrong:,} wrong)",
        f"trained {result.steps:,} steps in {result.train_seconds:.0f} s "
        f"({result.n_parameters:,} parameters; tested the weights of step {result.tested_step:,}, "
        f"the best on validation); whole demo {result.total_seconds:.0f} s",
    ]
    if result.examples:
        lines += ["", "examples:", *map(line, result.examples)]
    if result.mistakes:
        lines += ["", "other mistakes:", *map(line, result.mistakes)]
    lines += [
        "",
        f"attention heatmap: {result.heatmap_path}",
        f"training curves:   {result.curves_path}",
        "translate others:  echo 'six hundred thousand twelve' | aiayn translate "
        f"--checkpoint {result.heatmap_path.parent / RUN_SUBDIR}",
    ]
    return "\n".join(lines)
