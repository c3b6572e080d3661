"""Unlabelled text for pre-training: documents, chunks, and the three corruptions.

    read_documents        plain text (a document a line, or blank-line separated paragraphs)
                          or a table (JSONL/TSV/CSV) with a text field
    chunk_documents       per-document chunks of at most n tokens (masked LM, denoising)
    concat_and_chunk      one stream of all documents cut into (n + 1)-token windows (causal LM)
    mask_tokens           BERT's masking: 15% of tokens chosen; of those 80% <mask>,
                          10% a random token, 10% unchanged; labels only at chosen positions
    corrupt_spans         T5's span corruption: ~15% of tokens in spans of mean length 3, each
                          span replaced by a sentinel in the source; the target lists the spans,
                          each after its sentinel
    restore_spans         the inverse of corrupt_spans (tests, inspection)

Every random draw takes an explicit `torch.Generator`, so the caller decides what seeds it
(the pre-training task seeds one per batch from (seed, epoch, batch position)).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from aiayn.data import corpus
from aiayn.errors import ConfigError, DataError

TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz")

# BERT (Devlin et al. 2019, §3.1): of the chosen tokens, 80% become <mask>, 10% a random token,
# 10% stay as they are (so the model cannot rely on <mask> marking the positions it is scored on).
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1


# --------------------------------------------------------------------------- documents


def read_documents(
    path: str | Path,
    field: str | None = None,
    split: str = "line",
    max_docs: int | None = None,
) -> list[str]:
    """The non-blank documents of one source.

    A table (.jsonl/.tsv/.csv, optionally .gz) needs `field`, the column or key holding the
    text (IMDB's "text", BBC's "document"). A plain text file (optionally .gz) holds a document
    a line (`split="line"`) or paragraphs separated by blank lines (`split="paragraph"`, their
    lines joined with newlines). `max_docs` keeps the first N documents.

    Raises:
        DataError: the file is missing/unreadable/empty, the field is missing or not given
            for a table, or the source holds no text.
    """
    p = Path(path)
    is_table = p.name.lower().endswith(TABLE_SUFFIXES)
    if is_table:
        if field is None:
            raise DataError(
                f"{p} is a table: give the field that holds the text, e.g. "
                "{path: ..., field: text}"
            )
        docs = [text for text, _ in corpus.read_table(p, field, field)]
    else:
        if field is not None:
            raise DataError(
                f"{p} is plain text but a field ({field!r}) was given; name tables "
                f"{', '.join(TABLE_SUFFIXES)}, or drop the field"
            )
        lines = corpus.read_lines(p)
        if split == "line":
            docs = lines
        elif split == "paragraph":
            docs, paragraph = [], []
            for line in [*lines, ""]:
                if line:
                    paragraph.append(line)
                elif paragraph:
                    docs.append("\n".join(paragraph))
                    paragraph = []
        else:
            raise ConfigError(f"split must be 'line' or 'paragraph', got {split!r}")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{p}: no text in it; point the source at a file with documents")
    return docs[:max_docs] if max_docs is not None else docs


# --------------------------------------------------------------------------- chunks


def chunk_documents(docs: Sequence[Sequence[int]], n: int, min_len: int = 1) -> list[list[int]]:
    """Each document cut into consecutive chunks of at most `n` tokens; chunks < min_len dropped."""
    if n < 1:
        raise ConfigError(f"chunk size must be >= 1, got {n}")
    return [
        list(doc[i : i + n])
        for doc in docs
        for i in range(0, len(doc), n)
        if len(doc[i : i + n]) >= min_len
    ]


def concat_and_chunk(
    docs: Sequence[Sequence[int]], n: int, bos_id: int, eos_id: int
) -> list[list[int]]:
    """GPT-style: `<s> doc </s>` for every document, concatenated, cut into windows of n + 1.

    Window i is stream[i*n : i*n + n + 1]: its first n tokens are the input and its last n the
    targets, so every token of the stream is predicted once. A last window shorter than 2 is
    dropped.
    """
    if n < 1:
        raise ConfigError(f"chunk size must be >= 1, got {n}")
    stream: list[int] = []
    for doc in docs:
        stream += [bos_id, *doc, eos_id]
    return [stream[i : i + n + 1] for i in range(0, len(stream) - 1, n)]


# --------------------------------------------------------------------------- BERT masking


def mask_tokens(
    ids: Tensor,
    *,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    pad_id: int,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption of a padded batch.

    In each row, round(mask_prob * n) of its n ordinary tokens (at least one) are chosen at
    random; special tokens (pad, <s>, </s>, <mask>, ...) are never chosen. A chosen token
    becomes <mask> with probability 0.8, a random ordinary token with 0.1, and stays with 0.1.

    Args:
        ids: (B, S) token ids, padded with pad_id (on the CPU, where `generator` lives).
    Returns:
        inputs (B, S): the corrupted ids; labels (B, S): the original id at chosen positions
        and pad_id everywhere else (the loss's ignore index).
    """
    special = torch.tensor(sorted(set(special_ids) | {pad_id}), dtype=ids.dtype)
    candidate = ~torch.isin(ids, special)  # (B, S)
    n_candidates = candidate.sum(dim=1)  # (B,)
    n_chosen = torch.where(
        n_candidates > 0,
        (n_candidates.double() * mask_prob).round().long().clamp(min=1),
        torch.zeros_like(n_candidates),
    )
    # A random order of each row's candidates (non-candidates sort last): the first n_chosen.
    scores = torch.rand(ids.shape, generator=generator).masked_fill(~candidate, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, S): position of each token in the order
    chosen = candidate & (rank < n_chosen[:, None])

    u = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (u < MASK_FRACTION)
    to_random = chosen & (u >= MASK_FRACTION) & (u < MASK_FRACTION + RANDOM_FRACTION)
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special[special < vocab_size]] = False
    ordinary_ids = ordinary.nonzero().squeeze(1).to(ids.dtype)  # (V_ordinary,)
    random_ids = ordinary_ids[torch.randint(len(ordinary_ids), ids.shape, generator=generator)].to(
        ids.dtype
    )

    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, pad_id))
    return inputs, labels


# --------------------------------------------------------------------------- T5 span corruption


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, spans) for a sequence of `length` tokens (length >= 2).

    As T5's `random_spans_noise_mask`: round(length * density) noise tokens (at least 1, at
    most length - 1) in round(noise / mean span length) spans (at least 1).
    """
    if length < 2:
        raise DataError(f"span corruption needs sequences of >= 2 tokens, got {length}")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    return n_noise, min(n_spans, n_noise, length - n_noise)


def max_spans(max_length: int, noise_density: float, mean_span_length: float) -> int:
    """The most spans any sequence of 2..max_length tokens gets: the sentinels needed."""
    return max(
        span_counts(n, noise_density, mean_span_length)[1] for n in range(2, max(max_length, 2) + 1)
    )


def _random_partition(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """`total` split into `parts` positive integers, uniformly over all such compositions."""
    cuts = (torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def corrupt_spans(
    ids: Sequence[int],
    sentinel_ids: Sequence[int],
    *,
    noise_density: float,
    mean_span_length: float,
    generator: torch.Generator,
) -> tuple[list[int], list[int]]:
    """T5's span corruption of one sequence: (source, target).

    The sequence alternates kept and noise spans, starting with a kept span (T5's layout); the
    span lengths are random compositions of the kept and noise totals of `span_counts`.

        ids    = a b c d e f g h        noise spans (c d) and (g h)
        source = a b <x0> e f <x1>
        target = <x0> c d <x1> g h
    """
    n_noise, n_spans = span_counts(len(ids), noise_density, mean_span_length)
    if n_spans > len(sentinel_ids):
        raise DataError(
            f"a {len(ids)}-token sequence needs {n_spans} sentinels but only "
            f"{len(sentinel_ids)} were given; retrain the tokenizer with more sentinels"
        )
    noise_lens = _random_partition(n_noise, n_spans, generator)
    keep_lens = _random_partition(len(ids) - n_noise, n_spans, generator)
    source: list[int] = []
    target: list[int] = []
    i = 0
    for span, (keep, noise) in enumerate(zip(keep_lens, noise_lens, strict=True)):
        source += ids[i : i + keep]
        i += keep
        source.append(sentinel_ids[span])
        target += [sentinel_ids[span], *ids[i : i + noise]]
        i += noise
    return source, target


def restore_spans(
    source: Sequence[int], target: Sequence[int], sentinel_ids: Sequence[int]
) -> list[int]:
    """Undo `corrupt_spans`: each sentinel of the source replaced by its span from the target."""
    position = {s: i for i, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for token in target:
        if token in position:
            current = spans.setdefault(position[token], [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in source:
        out += spans.get(position[token], []) if token in position else [token]
    return out
