"""Text classification end to end: labelled texts, an encoder with a head, accuracy and macro-F1.

`train_classification(experiment)` is what `aiayn train configs/sst2.yaml` runs (and
`aiayn finetune --from SOURCE configs/sst2_minilm.yaml`, which starts the encoder from
pre-trained weights, see `aiayn.finetune`); `Classifier.from_checkpoint(dir)` is what
`aiayn classify` uses.

Data formats (the `data:` section, `ClassificationData`):

    glue   GLUE TSV files with a header, `sentence<TAB>label` (SST-2)
    table  TSV / CSV / JSONL files with columns `text_field` and `label_field`
    imdb   the Large Movie Review Dataset (Maas et al. 2011): the aclImdb release, downloaded
           into ~/.cache/aiayn/imdb, or `root` = a folder with aclImdb/train/{pos,neg} or a
           JSONL copy train.jsonl.gz ({"text", "label"})
    hf     a Hugging Face dataset by name (`hf_name`, `hf_config`, splits), e.g. glue/sst2

Validation data is a file (`valid_file`), a seeded held-out part of the training data
(`valid_fraction`; IMDB's accuracy is reported on such a part), or, for phrase-level data such
as SST's, seeded held-out whole sentences with the phrases only they contain (`valid_sentences`,
`hold_out_sentences`). An optional `test_file` is scored with the best checkpoint once training
ends.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tarfile
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tokenizers
import torch
import torch.nn.functional as F
from torch import Tensor

from aiayn import atomic
from aiayn import checkpoint as ckpt
from aiayn.config import ConfigSection, TransformerConfig
from aiayn.data import corpus
from aiayn.data.batching import DeviceBatch, TokenBatchSampler, pad_ids
from aiayn.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from aiayn.errors import CheckpointError, ConfigError, DataError
from aiayn.experiment import Experiment, releases_run_dir
from aiayn.finetune import (
    FinetuneConfig,
    encoder_config,
    freeze,
    load_source,
    prepare,
    resumed_run,
)
from aiayn.finetune import lr_scales as finetune_lr_scales
from aiayn.heads import POOLINGS, SequenceClassifier
from aiayn.metrics import classification_scores
from aiayn.model import Transformer
from aiayn.tasks.translation import load_resolved, task_model
from aiayn.train import Distributed, Trainer, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
DEFAULT_IMDB_CACHE = Path("~/.cache/aiayn/imdb")
IMDB_LABELS = ("negative", "positive")  # aclImdb's neg/ and pos/; the JSONL copy's 0 and 1


# --------------------------------------------------------------------------- configuration


@dataclass
class ClassificationData(ConfigSection):
    """Where the labelled texts come from, their classes, and how they are tokenized."""

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "format": ("glue", "table", "imdb", "hf"),
        "tokenizer": ("bpe", "word"),
    }

    format: str = "glue"
    root: str | None = None  # folder the file names are relative to (imdb: the data folder)
    train_file: str | list | None = "train.tsv"  # or a list of files, read one after another
    valid_file: str | None = None  # null: hold out valid_fraction of the training data
    test_file: str | None = None  # scored with the best checkpoint after training
    valid_fraction: float | None = None  # e.g. 0.1: a seeded random 10% of train validates
    # Phrase-level data (GLUE's SST-2 train: every phrase of each parsed sentence, labelled):
    # hold out N whole sentences of the training data (phrases no other phrase contains, of 5+
    # words) and the phrases found only inside them, for validation like an unseen test set.
    valid_sentences: int | None = None
    split_seed: int = 1  # the held-out part's random choice
    text_field: str = "sentence"
    label_field: str = "label"
    # Class names, in class-id order. A label in the data is a name from this list or an
    # integer index into it (GLUE's 0/1). null: the sorted distinct labels of the training data.
    labels: list | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str | None = None
    max_len: int | None = None  # tokens kept per text (specials included); null: model.max_len
    vocab_size: int = 8000  # vocabulary trained on the training texts (from scratch only)
    min_frequency: int = 2
    tokenizer: str = "bpe"  # bpe: subwords; word: one id per word (for pre-trained word vectors)
    lowercase: bool = False  # word tokenizer only: lowercase first (GloVe 6B is lowercase)
    # GloVe / word2vec file (text, .gz or word2vec binary) that initialises the embeddings of
    # the words it has (word tokenizer only); the others keep their random initialisation.
    embeddings_file: str | None = None
    embeddings_freeze: bool = False  # keep the embedding matrix fixed (static word vectors)
    # Word dropout (Iyyer et al. 2015), training only: each token of a training text becomes
    # <unk> with this probability, afresh at every step; validation and test texts are whole.
    token_dropout: float = 0.0
    max_train_examples: int | None = None  # only the first N training texts (tests, quick runs)
    max_valid_examples: int | None = None

    def check(self) -> None:
        held_out = self.valid_fraction is not None or self.valid_sentences is not None
        if self.valid_file is None and not held_out and self.format != "hf":
            raise ConfigError(
                "data needs validation data: set data.valid_file, or data.valid_fraction "
                "(e.g. 0.1) to hold out part of the training data"
            )
        if self.valid_fraction is not None and not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.valid_sentences is not None:
            if self.valid_fraction is not None:
                raise ConfigError("set one of data.valid_fraction and data.valid_sentences")
            if self.valid_sentences < 1:
                raise ConfigError(f"data.valid_sentences must be >= 1, got {self.valid_sentences}")
        if self.format in ("glue", "table") and self.train_file is None:
            raise ConfigError(f"data.train_file is required when data.format is {self.format!r}")
        if isinstance(self.train_file, list) and not (
            self.train_file and all(isinstance(x, str) for x in self.train_file)
        ):
            raise ConfigError(
                f"data.train_file must be a file name or a list of them, got {self.train_file!r}"
            )
        if self.format == "hf" and self.hf_name is None:
            raise ConfigError("data.hf_name is required when data.format is 'hf'")
        if self.labels is not None:
            if not isinstance(self.labels, list) or not all(
                isinstance(x, str | int) and not isinstance(x, bool) for x in self.labels
            ):
                raise ConfigError("data.labels must be a list of class names, e.g. [neg, pos]")
            names = [str(x) for x in self.labels]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(
                    f"data.labels must name at least 2 distinct classes, got {self.labels}"
                )
            self.labels = names
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"data.max_len must be >= 2, got {self.max_len}")
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be >= 8, got {self.vocab_size}")
        if self.embeddings_file is not None and self.tokenizer != "word":
            raise ConfigError(
                "data.embeddings_file holds word vectors: set data.tokenizer: word with it"
            )
        if self.embeddings_freeze and self.embeddings_file is None:
            raise ConfigError("data.embeddings_freeze needs data.embeddings_file")
        if self.lowercase and self.tokenizer != "word":
            raise ConfigError("data.lowercase applies to data.tokenizer: word only")
        if not 0.0 <= self.token_dropout < 1.0:
            raise ConfigError(f"data.token_dropout must be in [0, 1), got {self.token_dropout}")

    def path(self, name: str) -> Path:
        """A data file name, under `root` when one is given."""
        p = Path(name).expanduser()
        return Path(self.root).expanduser() / p if self.root is not None else p


@dataclass
class HeadConfig(ConfigSection):
    """The `head:` section: how the encoder output becomes class logits."""

    SECTION: ClassVar[str] = "head"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"pooling": POOLINGS}

    pooling: str = "mean"  # mean / max over non-padding positions, or "cls": the first position
    dropout: float = 0.1  # on the pooled vector

    def check(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")


# --------------------------------------------------------------------------- reading data


@dataclass
class Example:
    text: str
    label: str  # as written in the data; mapped to a class id by `label_ids`
    where: str  # "file:line" (or "dataset split record i") for error messages


def read_split(data: ClassificationData, split: str) -> list[Example]:
    """The examples of "train", "valid" or "test" as the config describes (before any hold-out)."""
    if data.format == "imdb":
        return read_imdb(data.root, split)
    if data.format == "hf":
        hf_split = {"train": data.train_split, "valid": data.valid_split, "test": data.test_split}
        name = f"{data.hf_name}" + (f"/{data.hf_config}" if data.hf_config else "")
        pairs = corpus.load_hf_dataset(
            data.hf_name, hf_split[split], data.text_field, data.label_field, data.hf_config
        )
        return [
            Example(
                text, label, f"Hugging Face dataset {name} split {hf_split[split]!r} record {i}"
            )
            for i, (text, label) in enumerate(pairs)
        ]
    name = {"train": data.train_file, "valid": data.valid_file, "test": data.test_file}[split]
    return [
        ex
        for one in (name if isinstance(name, list) else [name])
        for ex in read_table_examples(data.path(one), data.text_field, data.label_field)
    ]


def read_table_examples(path: Path, text_field: str, label_field: str) -> list[Example]:
    """(text, label) examples of a TSV/CSV/JSONL table; a missing column names those present."""
    examples = []
    for lineno, record in corpus.read_records(path):
        for name in (text_field, label_field):
            if name not in record:
                raise DataError(
                    f"{path}:{lineno}: no column {name!r}; the columns are "
                    f"{', '.join(map(repr, record))}: set data.text_field / data.label_field "
                    "(or --text-field / --label-field)"
                )
        text, label = record[text_field], record[label_field]
        # Not stripped here: runs resume on the ids they were trained on. A tokenizer that
        # aiayn trains strips a text's ends itself, as `classify --input` strips its lines.
        text = text if isinstance(text, str) else str(text)
        examples.append(Example(text, str(label), f"{path}:{lineno}"))
    return examples


def read_imdb(root: str | None, split: str) -> list[Example]:
    """IMDB reviews of "train" (or "test", only from the aclImdb release), labels negative/positive.

    `root` holds aclImdb/{split}/{pos,neg}/*.txt (or {split}/{pos,neg} directly), or the JSONL
    copy {split}.jsonl.gz; None downloads and extracts the release into ~/.cache/aiayn/imdb.
    """
    if split == "valid":
        raise ConfigError("IMDB has no validation split: set data.valid_fraction (e.g. 0.1)")
    folder = Path(root).expanduser() if root is not None else _download_imdb()
    jsonl = folder / f"{split}.jsonl.gz"
    if jsonl.is_file():
        return [
            Example(
                _review_text(str(r.get("text", ""))), str(r.get("label", "")), f"{jsonl}:{lineno}"
            )
            for lineno, r in corpus.read_records(jsonl)
        ]
    for base in (folder / "aclImdb" / split, folder / split):
        if (base / "pos").is_dir() and (base / "neg").is_dir():
            examples = []
            for sub, label in (("neg", IMDB_LABELS[0]), ("pos", IMDB_LABELS[1])):
                for path in sorted((base / sub).glob("*.txt")):
                    text = _review_text(corpus.read_text(path))
                    examples.append(Example(text, label, str(path)))
            return examples
    raise DataError(
        f"{folder} holds no IMDB {split} data: expected aclImdb/{split}/pos and .../neg (the "
        f"extracted {IMDB_URL}) or {split}.jsonl.gz; set data.root, or null to download"
    )


def _review_text(text: str) -> str:
    """An IMDB review as text: the release marks its line breaks with HTML ``<br />``."""
    return text.replace("<br />", " ").strip()


def _download_imdb(cache_dir: Path | None = None) -> Path:
    """Download and extract aclImdb_v1.tar.gz (84 MB) once; returns the folder holding aclImdb/."""
    folder = (cache_dir or DEFAULT_IMDB_CACHE).expanduser()
    if (folder / "aclImdb" / "train" / "pos").is_dir():
        return folder
    archive = folder / "aclImdb_v1.tar.gz"
    if not archive.is_file():
        logger.info("downloading %s to %s", IMDB_URL, archive)
        try:
            corpus._download(IMDB_URL, archive)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(
                f"could not download {IMDB_URL} ({e}); check the network, or fetch and extract "
                "it yourself and set data.root to the folder holding aclImdb/"
            ) from e
    tmp = folder / ".extract"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out, devices
    except (tarfile.TarError, OSError, EOFError) as e:
        archive.unlink(missing_ok=True)  # a damaged download is fetched again next time
        raise DataError(f"{archive} is damaged ({e}); run again to download it anew") from e
    (tmp / "aclImdb").rename(folder / "aclImdb")  # appears only once complete
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_texts(examples: Sequence[Example]) -> None:
    """An empty text is an error naming where it is."""
    for ex in examples:
        if not ex.text.strip():
            raise DataError(f"{ex.where}: the text is empty; remove the row or give it a text")


def label_ids(examples: Sequence[Example], labels: Sequence[str]) -> list[int]:
    """Class ids of the examples: a label is a declared name, or an integer index into `labels`."""
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for ex in examples:
        label = ex.label.strip()
        if label in index:
            ids.append(index[label])
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(labels):
            ids.append(int(label))
        else:
            raise DataError(
                f"{ex.where}: label {ex.label!r} is not one of the classes "
                f"{', '.join(labels)} (or their index 0..{len(labels) - 1}); fix the row or "
                "declare the class in data.labels"
            )
    return ids


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of the examples for validation; (train, valid)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(fraction * len(examples)))
    if n_valid >= len(examples):
        raise DataError(
            f"data.valid_fraction {fraction} leaves no training data out of {len(examples)} "
            "examples"
        )
    # Both parts in the shuffled order: a file sorted by label (IMDB's is) gives balanced
    # first-N subsets (data.max_train_examples / max_valid_examples) too.
    return [examples[i] for i in order[n_valid:]], [examples[i] for i in order[:n_valid]]


SENTENCE_MIN_WORDS = 5  # hold_out_sentences holds out sentences of at least this many words


def hold_out_sentences(examples: list[Example], n: int, seed: int) -> tuple[list, list]:
    """(train, valid) for phrase-level data: `n` seeded random whole sentences validate.

    A sentence is a text (of SENTENCE_MIN_WORDS+ whitespace words) that is no contiguous part of
    another; SST's phrases are the nodes of parse trees, so these are its roots. Training keeps
    every other text except those that occur only inside held-out sentences: a held-out
    sentence's phrases are no more in training than a test sentence's, beyond the ones that
    other sentences share (a validation set like GLUE's, which gives whole unseen sentences).
    """
    words = [tuple(ex.text.split()) for ex in examples]
    texts = set(words)

    def texts_within(w: tuple[str, ...]) -> set[tuple[str, ...]]:
        """The texts of the data that are contiguous word spans of w (w itself included).
        Only spans that are texts are kept: a set of every span of every phrase of SST-2
        would take gigabytes."""
        spans = (w[a:b] for a in range(len(w)) for b in range(a + 1, len(w) + 1))
        return {span for span in spans if span in texts}

    inside = {part for w in texts for part in texts_within(w) if part != w}
    roots = [i for i, w in enumerate(words) if w not in inside]
    candidates = [i for i in roots if len(words[i]) >= SENTENCE_MIN_WORDS]
    if n >= len(candidates):
        raise DataError(
            f"data.valid_sentences {n} leaves no training sentence: the training data has "
            f"{len(candidates)} sentences of {SENTENCE_MIN_WORDS}+ words"
        )
    held = set(random.Random(seed).sample(candidates, n))
    kept_parts = set().union(*(texts_within(words[i]) for i in roots if i not in held))
    held_parts = set().union(*(texts_within(words[i]) for i in held))
    train = [
        ex
        for i, ex in enumerate(examples)
        if i not in held and (words[i] in kept_parts or words[i] not in held_parts)
    ]
    return train, [examples[i] for i in sorted(held)]


# --------------------------------------------------------------------------- tokenizers


class TextEncoder:
    """Texts -> token ids for a classifier, with the project's BPE or a Hugging Face tokenizer.

    aiayn's BPE: ids + </s>. A BERT tokenizer.json: [CLS] ids [SEP] (its own post-processor).
    Either way a text longer than `max_len` keeps its first max_len - 1 tokens and the final
    special token. Saved and loaded as the checkpoint's tokenizer.json; which kind it is follows
    from the file (aiayn's always has <pad>, <s>, </s>, <unk> at ids 0-3).
    """

    def __init__(self, tok: Tokenizer | tokenizers.Tokenizer) -> None:
        self.tok = tok
        if isinstance(tok, Tokenizer):
            self.pad_id, self.vocab_size = tok.pad_id, tok.vocab_size
            self.unk_id: int | None = tok.unk_id
            self.special_ids = list(range(len(SPECIAL_TOKENS)))
        else:
            tok.no_padding()
            tok.no_truncation()
            padding_token = "[PAD]" if tok.token_to_id("[PAD]") is not None else "<pad>"
            pad = tok.token_to_id(padding_token)
            if pad is None:
                raise CheckpointError("the tokenizer has no [PAD] or <pad> token")
            self.pad_id, self.vocab_size = pad, tok.get_vocab_size(with_added_tokens=True)
            self.unk_id = next(
                (i for i in map(tok.token_to_id, ("[UNK]", "<unk>")) if i is not None), None
            )
            added = tok.get_added_tokens_decoder()
            self.special_ids = sorted(i for i, t in added.items() if t.special)

    @classmethod
    def load(cls, path: Path) -> TextEncoder:
        try:
            raw = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for bad files
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from None
        ours = all(raw.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
        return cls(Tokenizer(raw) if ours else raw)

    def save(self, path: Path) -> None:
        if isinstance(self.tok, Tokenizer):
            self.tok.save(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tok.save(str(path))

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[list[list[int]], int]:
        """Token ids of each text, at most max_len long; and how many texts were truncated."""
        if isinstance(self.tok, Tokenizer):
            rows = [ids + [self.tok.eos_id] for ids in self.tok.encode_batch(list(texts))]
        else:
            rows = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=True)]
        n_cut = 0
        for i, ids in enumerate(rows):
            if len(ids) > max_len:
                rows[i] = ids[: max_len - 1] + ids[-1:]  # keep the closing </s> or [SEP]
                n_cut += 1
        return rows, n_cut


# --------------------------------------------------------------------------- batches and loss


@dataclass
class ClassBatch(DeviceBatch):
    """ids (B, S) right-padded, labels (B,); n_tokens = B: the loss is summed over examples."""

    ids: Tensor
    labels: Tensor
    n_tokens: int


def make_sampler(rows: Sequence[Sequence[int]], max_tokens: int, shuffle: bool, seed: int = 0):
    """Batches by padded tokens (one side: the text; the label costs no tokens)."""
    return TokenBatchSampler([(len(r), 1) for r in rows], max_tokens, shuffle=shuffle, seed=seed)


def batch_maker(rows: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int, pin=False):
    def make(indices: list[int]) -> ClassBatch:
        batch = ClassBatch(
            pad_ids([rows[i] for i in indices], pad_id),
            torch.tensor([labels[i] for i in indices], dtype=torch.long),
            len(indices),
        )
        return batch.pin_memory() if pin else batch

    return make


def drop_tokens(ids: Tensor, p: float, unk_id: int, keep_ids: Sequence[int]) -> Tensor:
    """`ids` with each token replaced by `unk_id` with probability p, except padding and the
    special tokens in `keep_ids`; from torch's global generator, like dropout (checkpointed)."""
    chosen = torch.rand(ids.shape, device=ids.device) < p
    chosen &= ~torch.isin(ids, torch.tensor(list(keep_ids), dtype=ids.dtype, device=ids.device))
    return ids.masked_fill(chosen, unk_id)


def classification_loss(
    smoothing: float,
    token_dropout: float = 0.0,
    unk_id: int | None = None,
    keep_ids: Sequence[int] = (),
):
    """Cross-entropy summed over the batch's examples (the trainer divides by their number).

    With token_dropout > 0, training batches (the model in train mode) first have their tokens
    replaced by `unk_id` at that rate (`drop_tokens`; padding and `keep_ids` are kept).
    """
    if token_dropout > 0 and unk_id is None:
        raise ConfigError("data.token_dropout needs a tokenizer with an unknown token")

    def loss(model: SequenceClassifier, batch: ClassBatch) -> Tensor:
        ids = batch.ids
        if token_dropout > 0 and model.training:
            ids = drop_tokens(ids, token_dropout, unk_id, [model.pad_id, *keep_ids])
        logits = model(ids).float()  # (B, C), float32 under autocast too
        return F.cross_entropy(logits, batch.labels, reduction="sum", label_smoothing=smoothing)

    return loss


@torch.no_grad()
def predict_ids(
    model: SequenceClassifier, rows: Sequence[Sequence[int]], max_tokens: int
) -> Tensor:
    """Class probabilities (N, C) for token-id rows, batched by length, in input order."""
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.n_classes)
    for indices in make_sampler(rows, max_tokens, shuffle=False).batches(0):
        ids = pad_ids([rows[i] for i in indices], model.pad_id).to(device)
        out[indices] = model.probabilities(ids).cpu()
    return out


def scores(
    model: SequenceClassifier, rows: Sequence[Sequence[int]], labels: Sequence[int], max_tokens: int
) -> dict[str, float]:
    """Loss per example ("loss"), accuracy and macro-F1 (x 100) of the model on labelled rows."""
    probs = predict_ids(model, rows, max_tokens)
    target = torch.tensor(list(labels))
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), target).item()
    metrics = classification_scores(probs.argmax(-1).tolist(), list(labels), model.n_classes)
    return {"loss": loss, **metrics}


# --------------------------------------------------------------------------- inference


class ProbabilityClassifier:
    """Texts in, (label, probability) out, from a subclass's ``probabilities`` and ``labels``."""

    labels: list[str]

    def probabilities(self, texts: Sequence[str]) -> Tensor:
        """(N, C) class probabilities."""
        raise NotImplementedError

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """The most probable class of each text and its probability, in input order."""
        probs = self.probabilities(texts)
        best, idx = probs.max(dim=-1)
        return [
            (self.labels[i], float(p)) for p, i in zip(best.tolist(), idx.tolist(), strict=True)
        ]

    def evaluate(self, examples: Sequence[Example]) -> dict[str, float]:
        """Accuracy and macro-F1 (x 100) on labelled examples, and their number."""
        check_texts(examples)
        gold = label_ids(examples, self.labels)
        probs = self.probabilities([ex.text for ex in examples])
        metrics = classification_scores(probs.argmax(-1).tolist(), gold, len(self.labels))
        return {**metrics, "examples": len(examples)}


class Classifier(ProbabilityClassifier):
    """A trained classifier with its tokenizer and class names: texts in, (label, probability) out."""

    def __init__(
        self,
        model: SequenceClassifier,
        encoder: TextEncoder,
        labels: Sequence[str],
        max_len: int,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.encoder, self.labels, self.max_len = model, encoder, list(labels), max_len
        self.data = data or {}  # the run's data section (default field names for --eval)
        self.max_tokens = 8192

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Classifier:
        """Load a checkpoint directory, or a run directory (its best, else latest, checkpoint)."""
        return load_resolved(path, lambda found: cls._load(found, device))

    @classmethod
    def _load(cls, path: Path, device: str) -> Classifier:
        run = ckpt.load_checkpoint(path).config
        if run.get("task") != "classification":
            raise CheckpointError(
                f"{path} holds {task_model(run)}, not a classifier; pass the "
                "checkpoint of a classification run"
            )
        data, head = run.get("data", {}), HeadConfig.from_dict(run.get("head", {}))
        body = Transformer(TransformerConfig.from_dict(ckpt.model_section(run, path)))
        model = SequenceClassifier(
            body, n_classes=len(data["labels"]), pooling=head.pooling, dropout=head.dropout
        )
        ckpt.load_checkpoint(path, model=model)
        tokenizer_path = path / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise CheckpointError(
                f"{path} has no {TOKENIZER_FILE}; copy the {TOKENIZER_FILE} of its run folder"
            )
        encoder = TextEncoder.load(tokenizer_path)
        if encoder.vocab_size != body.cfg.src_vocab_size:
            raise CheckpointError(
                f"{tokenizer_path} has {encoder.vocab_size} tokens but the model expects "
                f"{body.cfg.src_vocab_size}: the tokenizer belongs to another run"
            )
        max_len = min(data.get("max_len") or body.cfg.max_len, body.cfg.max_len)
        return cls(model.to(device).eval(), encoder, data["labels"], max_len, data)

    def probabilities(self, texts: Sequence[str]) -> Tensor:
        """(N, C) class probabilities."""
        rows, n_cut = self.encoder.encode(texts, self.max_len)
        if n_cut:  # the model never saw more than this: say that it did not read it all
            logger.warning(
                "%d of %d texts are longer than the run's max_len %d tokens: each is "
                "classified from its first %d",
                n_cut,
                len(texts),
                self.max_len,
                self.max_len - 1,
            )
        return predict_ids(self.model, rows, self.max_tokens)


class Ensemble(ProbabilityClassifier):
    """Several classifiers of the same classes (e.g. runs with different seeds): the mean of
    their class probabilities. Each member keeps its own tokenizer and model."""

    def __init__(self, members: Sequence[Classifier]) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one classifier")
        for member in members[1:]:
            if member.labels != members[0].labels:
                raise CheckpointError(
                    f"the classifiers have different classes ({members[0].labels} vs "
                    f"{member.labels}): an ensemble needs the same classes in the same order"
                )
        self.members, self.labels, self.data = list(members), members[0].labels, members[0].data

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], device: str = "cpu") -> Ensemble:
        return cls([Classifier.from_checkpoint(path, device=device) for path in paths])

    def probabilities(self, texts: Sequence[str]) -> Tensor:
        """(N, C): the members' probabilities, averaged."""
        return torch.stack([member.probabilities(texts) for member in self.members]).mean(dim=0)


# --------------------------------------------------------------------------- training


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example] = field(default_factory=list)


def read_splits(data: ClassificationData) -> Splits:
    train = read_split(data, "train")
    if data.valid_fraction is not None:
        train, valid = hold_out(train, data.valid_fraction, data.split_seed)
    elif data.valid_sentences is not None:
        train, valid = hold_out_sentences(train, data.valid_sentences, data.split_seed)
    else:
        valid = read_split(data, "valid")
    has_test = data.test_split if data.format == "hf" else data.test_file
    test = read_split(data, "test") if has_test else []
    if data.max_train_examples is not None:
        train = train[: data.max_train_examples]
    if data.max_valid_examples is not None:
        valid = valid[: data.max_valid_examples]
    for split, examples in (("training", train), ("validation", valid)):
        if not examples:
            raise DataError(f"the {split} data is empty; check the data section of the config")
    for examples in (train, valid, test):
        check_texts(examples)
    return Splits(train, valid, test)


def _resumed_finetune(exp: Experiment) -> tuple[TextEncoder, TransformerConfig] | None:
    """The tokenizer and model config of the fine-tuning run in exp.run_dir (those of its
    folder, else of its latest checkpoint: `finetune.resumed_run`), or None where the run has
    neither."""
    resumed = resumed_run(exp.run_dir, exp.model)
    if resumed is None:
        return None
    model_cfg, tokenizer_path = resumed
    return TextEncoder.load(tokenizer_path), model_cfg


@releases_run_dir
def train_classification(
    exp: Experiment, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train (or fine-tune) a classifier as `exp` describes; returns the final metrics.

    With a `test_file` (or hf `test_split`), the best checkpoint's test accuracy and macro-F1
    are added as test_accuracy and test_macro_f1.
    """
    data = ClassificationData.from_dict(exp.data)
    head = HeadConfig.from_dict(exp.head)
    tune = FinetuneConfig.from_dict(exp.finetune)
    run_dir = exp.run_dir
    exp.check_run_dir(
        resume, {"data": data, "head": head, "finetune": tune}, derived=("labels", "max_len")
    )
    resolve_precision(exp.train.precision, resolve_device(exp.train.device, Distributed.from_env()))
    reads_vectors = data.embeddings_file is not None and tune.source is None and not resume
    if reads_vectors and not Path(data.embeddings_file).is_file():
        # Checked before the data is read and a vocabulary trained (a minute on IMDB).
        raise DataError(
            f"data.embeddings_file {data.embeddings_file} does not exist (a relative path is "
            f"read from the current folder, {Path.cwd()}); give the path of a GloVe or "
            "word2vec file with --data.embeddings_file"
        )

    # A fine-tuning run resumed takes its tokenizer and architecture from its own run
    # directory (the weights are in its checkpoint): the source may have moved since.
    resumed = _resumed_finetune(exp) if resume and tune.source is not None else None
    source = load_source(tune.source) if tune.source is not None and resumed is None else None
    splits = read_splits(data)
    labels = data.labels or sorted({ex.label.strip() for ex in splits.train})
    if data.labels is None:
        logger.info("classes (from the training labels): %s", ", ".join(labels))
    if len(labels) < 2:
        raise DataError(f"the training data has only the label {labels}: a classifier needs 2+")
    y_train, y_valid = label_ids(splits.train, labels), label_ids(splits.valid, labels)
    y_test = label_ids(splits.test, labels) if splits.test else []

    tokenizer_path = run_dir / TOKENIZER_FILE
    if resumed is not None:
        encoder, model_cfg = resumed
    elif source is not None:
        encoder = TextEncoder.load(source.tokenizer_path)
        model_cfg = encoder_config(source, exp.model)
        if encoder.vocab_size != model_cfg.src_vocab_size:
            raise CheckpointError(
                f"{source.tokenizer_path} has {encoder.vocab_size} tokens but the source model "
                f"has {model_cfg.src_vocab_size}"
            )
    else:
        if resume and tokenizer_path.is_file():
            encoder = TextEncoder.load(tokenizer_path)
        else:
            t0 = time.perf_counter()
            texts = [ex.text for ex in splits.train]
            if data.tokenizer == "word":
                tok = Tokenizer.train_words(
                    texts, data.vocab_size, data.min_frequency, lowercase=data.lowercase
                )
            else:
                tok = Tokenizer.train(texts, data.vocab_size, data.min_frequency)
            encoder = TextEncoder(tok)
            logger.info(
                "trained a %d-token %s vocabulary in %.1fs",
                encoder.vocab_size,
                "word" if data.tokenizer == "word" else "BPE",
                time.perf_counter() - t0,
            )
        model_cfg = exp.model_config(vocab_size=encoder.vocab_size, pad_id=encoder.pad_id)
    max_len = data.max_len or model_cfg.max_len
    if max_len > model_cfg.max_len:
        raise ConfigError(
            f"data.max_len {max_len} is longer than the model's max_len {model_cfg.max_len}"
        )
    rows = {}
    for split, examples in (
        ("train", splits.train),
        ("valid", splits.valid),
        ("test", splits.test),
    ):
        rows[split], n_cut = encoder.encode([ex.text for ex in examples], max_len)
        if n_cut:
            logger.info(
                "%d of %d %s texts were longer than %d tokens and keep their first %d",
                n_cut,
                len(examples),
                split,
                max_len,
                max_len,
            )

    torch.manual_seed(exp.train.seed)
    model = SequenceClassifier(
        Transformer(model_cfg), n_classes=len(labels), pooling=head.pooling, dropout=head.dropout
    )
    if source is not None:
        lr_scales = prepare(model, source, tune)
    elif resumed is not None:  # prepare's freezing and rates, without its weights
        freeze(model, tune)
        lr_scales = finetune_lr_scales(tune)
    else:
        lr_scales = {}
    if reads_vectors:
        from aiayn.data.embeddings import init_model_embeddings, token_counts

        report = init_model_embeddings(
            model.body,
            encoder.tok,
            data.embeddings_file,
            counts=token_counts(encoder.tok, [ex.text for ex in splits.train]),
            seed=exp.train.seed,
        )
        tokens = "" if report.token_coverage is None else f", {report.token_coverage:.1%} of tokens"
        logger.info(
            "embeddings from %s: %d of %d words (%.1f%%%s), dimension %d -> %d (%s)",
            data.embeddings_file,
            report.found,
            report.vocab_words,
            100 * report.coverage,
            tokens,
            report.file_dim,
            report.model_dim,
            report.projection,
        )
    if data.embeddings_file is not None and data.embeddings_freeze:
        # Static vectors (Kim 2014's "static"): the words the training set lacks keep the
        # meaning the vectors give them instead of drifting with the ones it has.
        model.body.src_embed.lut.weight.requires_grad_(False)
    # Saved only now, once the model is built and its weights are in (fine-tuning settings
    # and word vectors checked): a refused run writes nothing.
    if source is not None or not (resume and tokenizer_path.is_file()):
        exp.claim_run_dir()
        encoder.save(tokenizer_path)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "model: %s parameters (%s trainable), %d classes",
        f"{sum(p.numel() for p in model.parameters()):,}",
        f"{n_trainable:,}",
        len(labels),
    )
    max_tokens = exp.train.max_tokens

    def evaluate(m: SequenceClassifier) -> dict[str, float]:
        valid = scores(m, rows["valid"], y_valid, max_tokens)
        return {"val_loss": valid.pop("loss"), **valid}

    run_config = exp.resolved(model_cfg)
    run_config["data"] = {**data.to_dict(), "labels": labels, "max_len": max_len}
    run_config["head"] = head.to_dict()
    run_config["finetune"] = tune.to_dict()
    trainer = Trainer(
        model,
        exp.train,
        sampler=make_sampler(rows["train"], max_tokens, shuffle=True, seed=exp.train.seed),
        make_batch=batch_maker(
            rows["train"], y_train, encoder.pad_id, pin=torch.cuda.is_available()
        ),
        loss_fn=classification_loss(
            exp.train.label_smoothing, data.token_dropout, encoder.unk_id, encoder.special_ids
        ),
        run_dir=run_dir,
        run_config=run_config,
        d_model=model_cfg.d_model,
        evaluate=evaluate,
        best_metric="accuracy",
        higher_is_better=True,
        extra_files={TOKENIZER_FILE: tokenizer_path},
        lr_scales=lr_scales,
    )
    result = exp.fit(trainer, run_config, resume=resume, progress=progress)
    metrics: dict[str, Any] = dict(result.metrics)
    is_main = Distributed.from_env().is_main
    # A sharded (FSDP) model runs only with every process: then all of them score the test set.
    if splits.test and (is_main or trainer.fsdp):
        best = ckpt.read_best_pointer(run_dir / "checkpoints") or ckpt.latest_checkpoint(
            run_dir / "checkpoints"
        )
        trainer.load_weights(best)
        model.eval()
        test = scores(model, rows["test"], y_test, max_tokens)
    if splits.test and is_main:
        metrics["test_accuracy"], metrics["test_macro_f1"] = test["accuracy"], test["macro_f1"]
        logger.info(
            "test (%s, %s): accuracy %.2f, macro-F1 %.2f",
            best.name,
            data.test_file or data.test_split,
            test["accuracy"],
            test["macro_f1"],
        )
        atomic.write_text(
            run_dir / "test_scores.json",
            json.dumps({"checkpoint": str(best), "examples": len(y_test), **test}) + "\n",
        )
    return metrics


__all__ = [
    "ClassificationData",
    "Classifier",
    "Ensemble",
    "HeadConfig",
    "SequenceClassifier",
    "TextEncoder",
    "read_table_examples",
    "train_classification",
]
