"""Summarization with the same encoder-decoder: BBC News headlines and summaries, XSum, CNN/DM.

A summarizer is a translator from a long document to a short text: the same `Transformer`,
the same joint BPE vocabulary, the same `train_seq2seq` training run and the same decoding
(`Translator`: beam search, length penalty, a cap on the output length). What is its own:

- the data: the BBC News Summary set (one file, split here with a fixed seed), tables, and
  Hugging Face presets (xsum, cnn_dailymail, samsum);
- long inputs: documents are cut to their first `max_src_len` tokens, targets to `max_tgt_len`;
- the metric: ROUGE-1/2/L F1 (`aiayn.metrics.rouge`, Google's rouge-score, Porter stemmer);
- the baseline: lead-N, the document's first N sentences (`lead_n`).

`train_summarization(experiment)` is what `aiayn train configs/bbc_headline.yaml` runs;
`Summarizer.from_checkpoint(dir)` is what `aiayn summarize` uses.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data import corpus
from aiayn.data.batching import IdPair
from aiayn.data.packed import PackedPairs
from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import ConfigError, DataError
from aiayn.experiment import Experiment, releases_run_dir
from aiayn.finetune import FinetuneConfig
from aiayn.metrics import rouge
from aiayn.model import Transformer
from aiayn.tasks.seq2seq import check_run, drop_empty, train_seq2seq
from aiayn.tasks.translation import DecodeConfig, Translator

logger = logging.getLogger(__name__)

BBC_URL = "https://www.kaggle.com/datasets/pariza/bbc-news-summary"
BBC_FIELDS = ("id", "title", "document", "summary")
SPLITS = ("train", "valid", "test")

# Hugging Face datasets: (document column, summary column, config).
HF_PRESETS: dict[str, tuple[str, str, str | None]] = {
    "xsum": ("document", "summary", None),
    "EdinburghNLP/xsum": ("document", "summary", None),
    "cnn_dailymail": ("article", "highlights", "3.0.0"),
    "abisee/cnn_dailymail": ("article", "highlights", "3.0.0"),
    "samsum": ("dialogue", "summary", None),
    "Samsung/samsum": ("dialogue", "summary", None),
}


@dataclass
class SummarizationData(ConfigSection):
    """Where the documents and their summaries come from, and how long they may be.

    format "bbc": the BBC News Summary set (Kaggle, CC0; a login is needed to download it):
    `path`, the JSON lines file with fields id, category, title, document, summary (plain or
    .gz), or `root`, the Kaggle folder holding "News Articles/" and "Summaries/". `target`
    picks the headline (`title`) or the extractive summary (`summary`). The set is one file: a
    shuffle seeded with `split_seed` cuts it into train/valid/test (`valid_fraction`,
    `test_fraction`), the same on every run and machine.

    format "table": TSV/CSV/JSONL files (`train_file`, `valid_file`, optional `test_file`)
    with columns `src_field` (default "document") and `tgt_field` (default "summary").

    format "hf": a Hugging Face dataset (`hf_name`; splits `train_split`, `valid_split`,
    `test_split`); xsum, cnn_dailymail (config 3.0.0) and samsum know their own columns.
    """

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "format": ("bbc", "table", "hf"),
        "target": ("title", "summary"),
        "best_metric": ("rougeL", "val_loss"),
    }

    format: str = "bbc"
    path: str | None = None
    root: str | None = None
    target: str = "summary"  # bbc: "title" (headline generation) or "summary"
    split_seed: int = 1
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    src_field: str | None = None
    tgt_field: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str = "test"
    max_src_len: int = 400  # documents keep their first N tokens (BBC articles: ~500 on average)
    max_tgt_len: int = 128  # targets keep their first N tokens
    vocab_size: int = 8000  # joint BPE over documents and summaries
    min_frequency: int = 2
    max_train_examples: int | None = None  # use only the first N training pairs
    max_valid_examples: int | None = None  # validation loss on the first N pairs
    rouge_examples: int = 100  # ROUGE during training on the first N validation pairs (greedy)
    best_metric: str = "rougeL"  # which validation metric picks the best checkpoint

    def check(self) -> None:
        if self.format == "bbc" and self.path is None and self.root is None:
            raise ConfigError(
                "data.path is required when data.format is 'bbc': the BBC News Summary JSONL "
                f"(or data.root, the Kaggle folder; download it from {BBC_URL}, a login is needed)"
            )
        needed = {"table": ("train_file", "valid_file"), "hf": ("hf_name",)}.get(self.format, ())
        for name in needed:
            if getattr(self, name) is None:
                raise ConfigError(f"data.{name} is required when data.format is {self.format!r}")
        for name in ("valid_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ConfigError(f"data.{name} must be in (0, 0.5), got {getattr(self, name)}")
        for name in ("max_src_len", "max_tgt_len", "rouge_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be >= 8, got {self.vocab_size}")

    def fields(self) -> tuple[str, str]:
        """The (document, summary) field names of a table or Hugging Face dataset."""
        src, tgt, _ = HF_PRESETS.get(self.hf_name or "", ("document", "summary", None))
        return self.src_field or src, self.tgt_field or tgt

    def read(self, split: str) -> list[tuple[str, str]]:
        """The (document, target) pairs of `split` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if self.format == "bbc":
            records = split_records(
                read_bbc(self.path, self.root),
                self.split_seed,
                self.valid_fraction,
                self.test_fraction,
            )[split]
            # Documents are stripped of a leading headline for both targets: for headlines it
            # would make the task copying, and for summaries it is not part of the article.
            pairs = [(strip_title(r["document"], r["title"]), r[self.target]) for r in records]
        elif self.format == "table":
            path = {"train": self.train_file, "valid": self.valid_file}.get(split, self.test_file)
            if path is None:
                raise DataError("data.test_file is not set: name the test table in the config")
            pairs = corpus.read_table(path, *self.fields())
        else:
            hf_split = {"train": self.train_split, "valid": self.valid_split}.get(
                split, self.test_split
            )
            name = self.hf_name or ""
            config = self.hf_config or (HF_PRESETS[name][2] if name in HF_PRESETS else None)
            pairs = corpus.load_hf_dataset(name, hf_split, *self.fields(), config)
        pairs = drop_empty(pairs, split, "document or summary")
        limit = {"train": self.max_train_examples, "valid": self.max_valid_examples}.get(split)
        return pairs[:limit] if limit is not None else pairs


# --------------------------------------------------------------------------- the BBC set


def read_bbc(path: str | None, root: str | None = None) -> list[dict[str, str]]:
    """The BBC News Summary records (id, category, title, document, summary), sorted by id.

    From `path`, a JSON lines file, or from `root`, the Kaggle download's folder
    ("News Articles/<category>/<nnn>.txt": the headline on the first line, then the article;
    "Summaries/<category>/<nnn>.txt": the extractive summary).
    """
    records = _read_bbc_jsonl(Path(path)) if path is not None else _read_bbc_folder(Path(root))
    if not records:
        raise DataError(f"{path or root}: no articles; point data.path at the BBC News Summary")
    return sorted(records, key=lambda r: r["id"])


def _read_bbc_jsonl(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; data.path must be the BBC News Summary JSONL (fields "
            f"{', '.join(BBC_FIELDS)}), or set data.root to the Kaggle folder from {BBC_URL}"
        )
    records = []
    for lineno, record in corpus.read_jsonl(path):
        for name in BBC_FIELDS:
            if not isinstance(record.get(name), str):
                what = "no field" if name not in record else "a non-string field"
                raise DataError(
                    f"{path}:{lineno}: {what} {name!r}; fields present: "
                    f"{', '.join(map(repr, record))}; each line needs {', '.join(BBC_FIELDS)}"
                )
        records.append(record)
    return records


def _read_bbc_folder(root: Path) -> list[dict[str, str]]:
    nested = root / "BBC News Summary"  # the Kaggle zip holds the folder twice
    if not (root / "News Articles").is_dir() and (nested / "News Articles").is_dir():
        root = nested
    articles, summaries = root / "News Articles", root / "Summaries"
    if not articles.is_dir() or not summaries.is_dir():
        raise DataError(
            f"{root} has no 'News Articles' and 'Summaries' folders; data.root must be the "
            f"unzipped Kaggle download ({BBC_URL})"
        )
    records = []
    for article in sorted(articles.glob("*/*.txt")):
        category = article.parent.name
        summary = summaries / category / article.name
        if not summary.is_file():
            raise DataError(f"{article} has no summary {summary}; is the download complete?")
        text, summary_text = _read_legacy_text(article), _read_legacy_text(summary)
        title = text.strip().split("\n", 1)[0].strip()
        records.append(
            {
                "id": f"{category}/{article.stem}",
                "category": category,
                "title": title,
                "document": text.strip(),  # still starts with the title; see strip_title
                "summary": summary_text.strip(),
            }
        )
    return records


def _read_legacy_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few of the 2005 files are Latin-1
        return data.decode("latin-1")


def strip_title(document: str, title: str) -> str:
    """The document without its headline, when it begins with it.

    The Kaggle files start each article with its headline; the JSONL copy in shared/data does
    not (checked: 0 of its 2,225 documents begin with their title), so there it changes nothing.
    """
    head = title.strip()
    body = document.lstrip()
    if head and body.startswith(head):
        return body[len(head) :].lstrip()
    return document


def split_records(
    records: Sequence[dict[str, str]], seed: int, valid_fraction: float, test_fraction: float
) -> dict[str, list[dict[str, str]]]:
    """A seeded, disjoint train/valid/test split of records sorted by id.

    The order is a `random.Random(seed)` shuffle of the id-sorted records, so the split is the
    same on every run and Python version; valid and test take round(fraction * n) records each.
    """
    order = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(order)
    n_valid, n_test = round(valid_fraction * len(order)), round(test_fraction * len(order))
    split = {
        "valid": order[:n_valid],
        "test": order[n_valid : n_valid + n_test],
        "train": order[n_valid + n_test :],
    }
    logger.info(
        "BBC split (seed %d): %d train, %d valid, %d test",
        seed,
        len(split["train"]),
        len(split["valid"]),
        len(split["test"]),
    )
    return split


# --------------------------------------------------------------------------- lead-N baseline

# A sentence ends at ., ! or ? (and any closing quotes or brackets) followed by white space and
# an upper-case letter, a digit, a currency sign or an opening quote. Newlines always end one.
# It is wrong after abbreviations such as "Mr. Smith" or "U.S. Army" (BBC style writes "Mr
# Smith", so they are rare there) and never splits "$1.13bn" or "e.g." inside a sentence.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9£$€])")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, by the simple rule above, without empty ones."""
    sentences = []
    for line in text.split("\n"):
        start = 0
        for match in _SENTENCE_END.finditer(line):
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def lead_n(document: str, n: int) -> str:
    """The lead-N baseline: the first `n` sentences of the document, joined by a space."""
    return " ".join(split_sentences(document)[:n])


# --------------------------------------------------------------------------- inference


class Summarizer(Translator):
    """A trained summarization model: documents in, summaries out (`Translator`'s decoding).

    `data` is the run's data section (so `aiayn summarize --split test` can read its test set).
    """

    TASK: ClassVar[str] = "summarization"

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        decode: DecodeConfig,
        max_src_len: int | None = None,
        data: SummarizationData | None = None,
        warn_cut: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, decode, max_src_len, warn_cut)
        self.data = data

    @classmethod
    def from_run(cls, model: Transformer, tokenizer: Tokenizer, run: dict[str, Any]) -> Summarizer:
        data = SummarizationData.from_dict(run.get("data", {}))
        decode = DecodeConfig.from_dict(run.get("decode", {}))
        # The configured data.max_src_len cuts most documents, as in training: no warning.
        return cls(model, tokenizer, decode, data.max_src_len, data, warn_cut=False)

    # One summary per document: the translator's decoding, under the task's name (the same
    # options: beam_size, length_penalty, max_len, no_repeat_ngram_size; defaults: the run's).
    summarize = Translator.translate


def rouge_f1(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 x 100 (rouge-score, Porter stemmer), mean
    over documents.

    ROUGE-L is the longest common subsequence of the two texts as one sequence; ROUGE-Lsum,
    the summary-level variant that summarization papers report for multi-sentence summaries,
    takes the union of the LCS of every reference sentence with the prediction's sentences.
    Both texts are split into sentences by `split_sentences` for it (rouge-score splits on
    newlines only). The other scores do not depend on the split.
    """
    return rouge(
        ["\n".join(split_sentences(p)) for p in predictions],
        ["\n".join(split_sentences(r)) for r in references],
    )


# --------------------------------------------------------------------------- training


def truncate_pairs(
    examples: Sequence[IdPair], max_src_len: int, max_tgt_len: int
) -> tuple[Sequence[IdPair], int, int]:
    """Keep each document's first `max_src_len` ids and target's first `max_tgt_len`.

    Returns (the cut pairs, how many documents were cut, how many targets were cut); the cut
    pairs are a `PackedPairs` where `examples` is one.
    """
    if isinstance(examples, PackedPairs):
        over = examples.lengths() > torch.tensor([max_src_len, max_tgt_len])
        n_src, n_tgt = (int(n) for n in over.sum(dim=0))
        return examples.truncated(max_src_len, max_tgt_len), n_src, n_tgt
    n_src = sum(len(src) > max_src_len for src, _ in examples)
    n_tgt = sum(len(tgt) > max_tgt_len for _, tgt in examples)
    return [(src[:max_src_len], tgt[:max_tgt_len]) for src, tgt in examples], n_src, n_tgt


@releases_run_dir
def train_summarization(
    exp: Experiment, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train a summarization model as `exp` describes; returns the final validation metrics."""
    data = SummarizationData.from_dict(exp.data)
    decode = DecodeConfig.from_dict(exp.decode)
    fine_tuning = FinetuneConfig.from_dict(exp.finetune).source is not None

    def check_lengths(max_len: int) -> None:
        for name in ("max_src_len", "max_tgt_len"):
            if getattr(data, name) > max_len - 1:
                whose, advice = (
                    ("the source model's max_len", "")
                    if fine_tuning
                    else ("model.max_len", " or raise model.max_len")
                )
                raise ConfigError(
                    f"data.{name} ({getattr(data, name)}) must be below {whose} ({max_len}): "
                    f"one position is the </s> or <s>; lower data.{name}{advice}"
                )

    if not fine_tuning:  # the architecture is known now; a source's only once it is read
        check_lengths(exp.model_before_tokenizer().max_len)
    check_run(exp, resume, data)
    train_pairs, valid_pairs = data.read("train"), data.read("valid")

    def fit(examples: PackedPairs, model_cfg: TransformerConfig, split: str) -> PackedPairs:
        check_lengths(model_cfg.max_len)
        out, n_src, n_tgt = truncate_pairs(examples, data.max_src_len, data.max_tgt_len)
        logger.info(
            "%s: %d of %d documents cut to their first %d tokens (data.max_src_len), "
            "%d targets to %d (data.max_tgt_len)",
            split,
            n_src,
            len(out),
            data.max_src_len,
            n_tgt,
            data.max_tgt_len,
        )
        return out

    rouge_pairs = valid_pairs[: data.rouge_examples]

    def score(model: Transformer, tokenizer: Tokenizer) -> dict[str, float]:
        summarizer = Summarizer(model, tokenizer, decode, data.max_src_len, data, warn_cut=False)
        hyps = summarizer.summarize([d for d, _ in rouge_pairs], beam_size=decode.eval_beam_size)
        return rouge_f1(hyps, [t for _, t in rouge_pairs])

    return train_seq2seq(
        exp,
        train_pairs,
        valid_pairs,
        vocab_size=data.vocab_size,
        min_frequency=data.min_frequency,
        fit=fit,
        score=score,
        best_metric=data.best_metric,
        higher_is_better=data.best_metric != "val_loss",
        resume=resume,
        progress=progress,
    )
