"""Pre-trained word vectors (GloVe, word2vec) for a word-level vocabulary.

The paper learns its embeddings from scratch (§3.4). With a word-level vocabulary
(:meth:`aiayn.data.tokenizer.Tokenizer.train_words`) a small task such as SST-2 can start
from vectors trained on billions of words instead: :func:`init_embeddings` copies the vectors
of the vocabulary's words into an ``nn.Embedding`` and reports how much of the vocabulary the
file covered.

Three file formats, detected from the content (or named with ``format=``):

- ``glove``: text, one ``word v1 ... vd`` a line (Pennington et al. 2014), plain or ``.gz``;
- ``word2vec``: the same with a first line ``N D`` (vector count, dimension);
- ``word2vec-bin``: the original C tool's binary format (Mikolov et al. 2013): a text header
  ``N D\\n``, then per word the UTF-8 word, a space, ``D`` little-endian float32, and an
  optional newline.

The file is streamed and only the vectors of the wanted words are kept, so a 5 GB GloVe
file costs the memory of the vocabulary, not of the file.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from aiayn.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from aiayn.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "glove", "word2vec", "word2vec-bin")
PROJECTIONS = ("pca", "random")
_HEADER = re.compile(rb"^\s*(\d+)\s+(\d+)\s*$")  # word2vec's first line: "N D"
_CHUNK = 1 << 20  # bytes read at a time from a binary file


@dataclass
class WordVectors:
    """The vectors kept from a file.

    Attributes:
        words: the kept words, in file order (the first occurrence of a repeated word wins).
        vectors: (len(words), dim) float32; row i is the vector of ``words[i]``.
        dim: the file's dimension.
        format: the format read (``glove``, ``word2vec`` or ``word2vec-bin``).
        n_file: how many vectors the file holds (all of them, kept or not).
    """

    words: list[str]
    vectors: torch.Tensor
    dim: int
    format: str
    n_file: int

    def index(self) -> dict[str, int]:
        """word -> row of :attr:`vectors`."""
        return {w: i for i, w in enumerate(self.words)}


def _open(path: Path) -> BinaryIO:
    """The file as a binary stream, gunzipped when its name ends in ``.gz``."""
    if not path.is_file():
        raise DataError(
            f"{path}: embeddings file not found; give the path of a GloVe or word2vec file"
        )
    try:
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _detect(second: bytes, header: tuple[int, int] | None) -> str:
    """Tell the three formats apart: no ``N D`` header is GloVe; with one, word2vec text when
    the second line is text, a word and numbers, else binary (``second`` may be cut short).

    The numbers are not counted against ``D`` here: a text file whose rows do not match its
    header is refused by the reader, which says so, instead of being read as binary garbage.
    """
    if header is None:
        return "glove"
    try:  # the word2vec text format's second line is "word v1 ... vD"
        fields = second.decode("utf-8").split()
        if len(fields) >= 2:
            [float(v) for v in fields[1:]]
            return "word2vec"
    except (UnicodeDecodeError, ValueError):
        pass
    return "word2vec-bin"


def read_vectors(
    path: str | os.PathLike[str],
    words: Iterable[str] | None = None,
    *,
    format: str = "auto",
) -> WordVectors:
    """Read the vectors of ``words`` (all of them when None) from a GloVe or word2vec file.

    Args:
        path: the file; ``.gz`` is gunzipped while streaming.
        words: the words to keep; the others are checked for shape but not stored.
        format: ``auto`` (detect: a first line ``N D`` means word2vec, text or binary by
            whether the next line parses as ``word`` and ``D`` numbers), ``glove``,
            ``word2vec`` or ``word2vec-bin``.

    Returns:
        The kept vectors (see :class:`WordVectors`).

    Raises:
        ConfigError: unknown ``format``.
        DataError: the file is missing, empty, not UTF-8 (file and line named), has a row
            with the wrong number of values or a value that is not a finite number (file,
            line, values seen vs expected), or is a binary file cut short.
    """
    if format not in FORMATS:
        raise ConfigError(f"embeddings format {format!r} is not one of {', '.join(FORMATS)}")
    path = Path(path)
    wanted = None if words is None else set(words)
    with _open(path) as stream:
        try:
            first = stream.readline()
            # Read ahead for detection; _Prefixed puts these bytes back in front of the stream.
            ahead = stream.read(64 * 1024) if first.strip() else b""
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: cannot read ({e}); is it a complete .gz file?") from None
        if not first.strip():
            raise DataError(f"{path}: file is empty; give a GloVe or word2vec vectors file")
        m = _HEADER.match(first)
        header = (int(m.group(1)), int(m.group(2))) if m else None
        if format == "auto":
            format = _detect(ahead.split(b"\n", 1)[0], header)
        elif format != "glove" and header is None:
            raise DataError(
                f"{path}: line 1 is not a word2vec header 'N D' (got {_show(first)}); "
                "for a GloVe file use format glove"
            )
        elif format == "glove" and header is not None:
            raise DataError(
                f"{path}: line 1 is a word2vec header {_show(first)}, not a GloVe row; "
                "use format word2vec (or auto)"
            )
        f = _Prefixed(ahead, stream)
        if format == "word2vec-bin":
            assert header is not None
            got_words, rows, n = _read_binary(path, f, header, wanted, len(first))
            dim = header[1]
        else:
            got_words, rows, n, dim = _read_text(path, f, first, header, wanted)
    vectors = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim)
    logger.info("%s: %d vectors of dimension %d, kept %d", path, n, dim, len(got_words))
    return WordVectors(got_words, vectors, dim, format, n)


class _Prefixed:
    """``prefix`` then the rest of ``stream``: puts back the bytes read ahead for detection."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self._buf, self._stream = prefix, stream

    def read(self, n: int = -1) -> bytes:
        if self._buf:
            if n < 0:
                out, self._buf = self._buf + self._stream.read(), b""
                return out
            out, self._buf = self._buf[:n], self._buf[n:]
            return out
        return self._stream.read(n)

    def __iter__(self) -> Iterator[bytes]:
        if self._buf:
            head, self._buf = self._buf, b""
            lines = head.split(b"\n")
            for line in lines[:-1]:
                yield line + b"\n"
            tail = lines[-1]
            if tail:  # an unfinished line: complete it from the stream
                yield tail + self._stream.readline()
        yield from self._stream


def _show(line: bytes, limit: int = 40) -> str:
    text = line.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_text(
    path: Path, f: Iterable[bytes], first: bytes, header: tuple[int, int] | None, wanted
) -> tuple[list[str], list[np.ndarray], int, int]:
    """GloVe / word2vec text rows -> (kept words, their vectors, rows read, dimension)."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = header[1] if header else None
    n = 0

    def lines() -> Iterator[tuple[int, bytes]]:
        if header is None:
            yield 1, first
        yield from enumerate(f, start=2)

    try:
        for lineno, raw in lines():
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}: line {lineno} is not UTF-8 text; vector files must be UTF-8"
                ) from None
            fields = line.split()
            if not fields:
                continue  # a blank line (e.g. at the end)
            if dim is None:  # GloVe has no header: the first row sets the dimension
                dim = len(fields) - 1
                if dim < 1:
                    raise DataError(f"{path}: line {lineno} holds a word but no vector values")
            if len(fields) != dim + 1:
                raise DataError(
                    f"{path}: line {lineno} has {len(fields) - 1} values after the word, "
                    f"expected {dim} ({'the header on line 1 says so' if header else 'as line 1'}); "
                    "the file is damaged or mixes dimensions"
                )
            n += 1
            word = fields[0]
            if (wanted is None or word in wanted) and word not in seen:
                try:
                    vec = np.array(fields[1:], dtype=np.float32)
                except ValueError:
                    vec = np.array([math.nan], dtype=np.float32)
                if not np.isfinite(vec).all():
                    what = (
                        "is not a vector file: give a GloVe or word2vec file"
                        if n == 1
                        else "is damaged"
                    )
                    raise DataError(
                        f"{path}: line {lineno} ({word!r}) holds a value that is not a finite "
                        f"number; the file {what}"
                    )
                seen.add(word)
                words.append(word)
                rows.append(vec)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); is it a complete .gz file?") from None
    if dim is None or n == 0:
        raise DataError(f"{path}: holds no vectors; give a GloVe or word2vec vectors file")
    if header is not None and n != header[0]:
        logger.warning("%s: header says %d vectors, the file holds %d", path, header[0], n)
    return words, rows, n, dim


def _read_binary(
    path: Path, f: _Prefixed, header: tuple[int, int], wanted, start: int
) -> tuple[list[str], list[np.ndarray], int]:
    """word2vec binary entries -> (kept words, their vectors, entries read); ``f`` is
    positioned after the header, which ends at byte ``start``."""
    count, dim = header
    if dim < 1 or count < 1:
        raise DataError(
            f"{path}: header announces {count} vectors of dimension {dim}; expected 1 or more "
            "of each"
        )
    size = 4 * dim
    buf, pos, offset = b"", 0, start  # offset: file position of buf[0], for messages
    eof = False
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()

    def fill(need: int) -> bool:
        """Make ``need`` bytes available from ``pos``; False at end of file."""
        nonlocal buf, pos, offset, eof
        while len(buf) - pos < need and not eof:
            chunk = f.read(max(_CHUNK, need))
            if not chunk:
                eof = True
                break
            offset += pos
            buf, pos = buf[pos:] + chunk, 0
        return len(buf) - pos >= need

    try:
        for i in range(count):
            # The word: bytes up to a space; the C tool writes a newline after each vector,
            # which gensim and others may leave out, so a leading newline is skipped.
            while True:
                fill(1)
                if pos < len(buf) and buf[pos : pos + 1] == b"\n":
                    pos += 1
                    continue
                break
            while (end := buf.find(b" ", pos)) < 0:
                if not fill(len(buf) - pos + 1):
                    break
            if end < 0:
                raise DataError(
                    f"{path}: ends after {i} of the {count} vectors its header announces "
                    f"(byte {offset + pos}); the file is truncated"
                )
            start_byte = offset + pos
            try:
                word = buf[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}: entry {i + 1} (byte {start_byte}) has a word that is not UTF-8"
                ) from None
            pos = end + 1
            if not fill(size):
                raise DataError(
                    f"{path}: truncated in the vector of entry {i + 1} ({word!r}): "
                    f"{len(buf) - pos} of {size} bytes ({dim} float32) present"
                )
            if (wanted is None or word in wanted) and word not in seen:
                vec = np.frombuffer(buf, dtype="<f4", count=dim, offset=pos).astype(np.float32)
                if not np.isfinite(vec).all():
                    raise DataError(
                        f"{path}: entry {i + 1} ({word!r}) holds a value that is not finite"
                    )
                seen.add(word)
                words.append(word)
                rows.append(vec)
            pos += size
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); is it a complete .gz file?") from None
    return words, rows, count


# --------------------------------------------------------------------------- into a model


@dataclass
class EmbeddingReport:
    """What :func:`init_embeddings` did.

    Attributes:
        path: the vectors file.
        format: its format (``glove``, ``word2vec``, ``word2vec-bin``).
        file_dim: the file's dimension.
        model_dim: the embedding's dimension (d_model).
        vocab_words: vocabulary size without the special tokens.
        found: words given a pre-trained vector (exact match or lowercase fallback).
        found_lowercase: of those, the ones found only through their lowercase form.
        token_coverage: share of the counted running words whose token got a vector
            (None when no counts were given).
        projection: ``none`` (same dimension), ``pca`` or ``random-orthogonal``.
        scale: the factor applied to the (centred, projected) vectors so that their root
            mean square norm is 1, the norm of a row drawn from N(0, d_model^-0.5).
    """

    path: str
    format: str
    file_dim: int
    model_dim: int
    vocab_words: int
    found: int
    found_lowercase: int
    token_coverage: float | None
    projection: str
    scale: float

    @property
    def coverage(self) -> float:
        """found / vocab_words: the share of the vocabulary (specials excluded) with a vector."""
        return self.found / self.vocab_words if self.vocab_words else 0.0

    def summary(self) -> str:
        """A few human-readable lines (the ``aiayn embeddings`` report)."""
        lines = [
            f"file: {self.path} ({self.format}, dimension {self.file_dim})",
            f"vocabulary coverage: {self.found:,} / {self.vocab_words:,} words = "
            f"{100 * self.coverage:.2f}% ({self.found_lowercase:,} through lowercasing)",
        ]
        if self.token_coverage is not None:
            lines.append(f"token coverage: {100 * self.token_coverage:.2f}% of running words")
        lines.append(
            f"model dimension {self.model_dim}: projection {self.projection}, "
            f"vectors scaled by {self.scale:.4g}"
        )
        return "\n".join(lines)


def token_counts(tokenizer: Tokenizer, texts: Iterable[str]) -> Counter[int]:
    """How often each token id occurs in ``texts`` (for the token-weighted coverage)."""
    counts: Counter[int] = Counter()
    for ids in tokenizer.encode_batch(list(texts)):
        counts.update(ids)
    return counts


def _orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), uniformly random
    (QR of a Gaussian matrix, signs fixed by R's diagonal so the draw is unbiased)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def project(
    vectors: torch.Tensor, d_model: int, *, projection: str = "pca", seed: int = 0
) -> tuple[torch.Tensor, str]:
    """Centre ``vectors`` (n, d) and map them to (n, d_model).

    - ``d == d_model``: only centred (projection ``none``).
    - ``d > d_model``, ``pca``: onto the top ``d_model`` principal directions of the found
      vectors; keeps the most variance any linear map to d_model can keep. Component signs
      are fixed (largest loading positive) so the result does not depend on the SVD's sign
      choice.
    - ``d > d_model``, ``random`` (or ``pca`` with no more than ``d_model`` vectors, too few
      to estimate ``d_model`` components): onto a random ``d_model``-dimensional subspace
      (Johnson-Lindenstrauss: distances kept approximately).
    - ``d < d_model`` (either choice): a random orthogonal expansion, X @ Q^T with Q
      (d_model, d) of orthonormal columns: an isometry, so every inner product and distance
      between the vectors is kept exactly; the extra directions hold nothing yet and are
      learned in training.

    Centring removes the direction all GloVe/word2vec vectors share (Mu & Viswanath 2018,
    "All-but-the-top"), which would otherwise make every word look alike to the model whose
    own initial embeddings have mean zero.

    Returns:
        (projected (n, d_model) float32, the projection used).
    """
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
    x = vectors.double()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    generator = torch.Generator().manual_seed(seed)
    if d == d_model:
        return x.float(), "none"
    if d < d_model:
        return (x @ _orthogonal(d_model, d, generator).T).float(), "random-orthogonal"
    if projection == "pca" and n <= d_model:
        # n centred points span at most n - 1 directions: too few for d_model components.
        logger.warning(
            "PCA to %d dimensions needs more than %d found vectors, got %d; "
            "using a random orthogonal projection instead",
            d_model,
            d_model,
            n,
        )
        projection = "random"
    if projection == "random":
        return (x @ _orthogonal(d, d_model, generator)).float(), "random-orthogonal"
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(n, d), d), rows = directions
    components = vh[:d_model]  # (d_model, d)
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    return (x @ (components * signs).T).float(), "pca"


@torch.no_grad()
def init_embeddings(
    embedding: nn.Embedding,
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    *,
    lowercase_fallback: bool = True,
    projection: str = "pca",
    seed: int = 0,
    counts: Mapping[int, int] | None = None,
    format: str = "auto",
) -> EmbeddingReport:
    """Fill the rows of ``embedding`` whose word has a vector in the file at ``path``.

    Rows of words the file lacks keep their initialisation; the special tokens' rows (pad,
    bos, eos, unk) are never written, so the pad row stays zero. The embedding is changed in
    place, so a tied output layer (same tensor) sees the vectors too.

    Steps: read the vectors of the vocabulary's words (and, with ``lowercase_fallback``, of
    their lowercase forms, for a cased vocabulary against lowercased GloVe 6B); centre them
    and bring them to the embedding's dimension with :func:`project`; then scale them by one
    factor so their root mean square norm is 1. That is the norm of the model's own
    initial rows (N(0, d_model^-0.5) per component, so the expected squared norm is
    d_model * d_model^-1 = 1), which the model multiplies by sqrt(d_model) (§3.4) to get unit
    variance per component, on the scale of the positional encodings. Raw GloVe rows have
    norms of 4-8; left unscaled they would drown the positions and the initial rows.
    A single factor keeps the vectors' relative norms (which carry word frequency).

    Why a fixed projection rather than a trainable ``nn.Linear`` from the file's dimension:
    the model stays exactly the paper's (the embedding is one matrix, tied to the output
    layer where the model ties them, saved and loaded like any other), no parameters are
    added, and nothing is learned from a random start before the pre-trained vectors become
    useful. PCA is the linear map that keeps the most of the vectors' variance.

    Args:
        embedding: (vocab_size, d_model) weights, e.g. ``model.src_embed.lut``.
        tokenizer: the vocabulary; ``len(tokenizer)`` must equal ``embedding.num_embeddings``.
            Meant for word-level tokenizers (:meth:`Tokenizer.train_words`): BPE pieces are
            not words and will mostly be missed.
        path: GloVe or word2vec file (see :func:`read_vectors`).
        lowercase_fallback: look up ``word.lower()`` when ``word`` itself is missing.
        projection: ``pca`` or ``random`` (used only when the dimensions differ).
        seed: for the random orthogonal matrices.
        counts: token id -> occurrences (:func:`token_counts`), for the token coverage.
        format: file format, ``auto`` to detect.

    Raises:
        ConfigError: unknown ``projection`` or ``format``.
        DataError: the sizes of ``embedding`` and ``tokenizer`` differ; a bad file (see
            :func:`read_vectors`).
    """
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
    vocab_size, d_model = embedding.weight.shape
    if vocab_size != len(tokenizer):
        raise DataError(
            f"the embedding has {vocab_size} rows but the tokenizer {len(tokenizer)} tokens; "
            "build the model with the tokenizer's vocab_size"
        )
    if getattr(tokenizer, "kind", "word") != "word":
        logger.warning(
            "init_embeddings: a %s tokenizer's tokens are mostly not words", tokenizer.kind
        )
    n_special = len(SPECIAL_TOKENS)
    vocab = [tokenizer.id_to_token(i) for i in range(n_special, vocab_size)]
    wanted = set(vocab)
    if lowercase_fallback:
        wanted |= {w.lower() for w in vocab}
    vectors = read_vectors(path, wanted, format=format)
    index = vectors.index()

    ids: list[int] = []
    rows: list[int] = []
    n_lower = 0
    for token_id, word in enumerate(vocab, start=n_special):
        row = index.get(word)
        if row is None and lowercase_fallback:
            row = index.get(word.lower())
            n_lower += row is not None
        if row is not None:
            ids.append(token_id)
            rows.append(row)

    projected, used, scale = None, "none", 1.0
    if ids:
        projected, used = project(vectors.vectors[rows], d_model, projection=projection, seed=seed)
        rms = projected.pow(2).sum(dim=1).mean().sqrt().item()
        scale = 1.0 / rms if rms > 0 else 1.0
        embedding.weight[torch.tensor(ids)] = (projected * scale).to(embedding.weight.dtype)

    token_coverage = None
    if counts is not None:
        total = sum(c for i, c in counts.items() if i not in (0, 1, 2))  # all but pad/bos/eos
        covered = sum(counts.get(i, 0) for i in ids)
        token_coverage = covered / total if total else 0.0
    report = EmbeddingReport(
        path=str(path),
        format=vectors.format,
        file_dim=vectors.dim,
        model_dim=d_model,
        vocab_words=vocab_size - n_special,
        found=len(ids),
        found_lowercase=n_lower,
        token_coverage=token_coverage,
        projection=used,
        scale=scale,
    )
    logger.info(
        "pre-trained embeddings: %d/%d words (%.1f%%) from %s",
        report.found,
        report.vocab_words,
        100 * report.coverage,
        path,
    )
    return report


def init_model_embeddings(
    model: nn.Module, tokenizer: Tokenizer, path: str | os.PathLike[str], **kwargs
) -> EmbeddingReport:
    """:func:`init_embeddings` for every token-embedding matrix of an aiayn ``Transformer``.

    Works for any task's model (encoder-only, decoder-only, encoder-decoder): it fills
    ``model.src_embed`` and ``model.tgt_embed`` (once when shared), assuming one word-level
    vocabulary for both. A tied output layer shares the tensor and so is filled too.
    Keyword arguments go to :func:`init_embeddings`; the report of the first matrix is
    returned (the others get the same words, so the same numbers).

    Raises:
        DataError: the model has no token embeddings, or see :func:`init_embeddings`.
    """
    luts = {}
    for name in ("src_embed", "tgt_embed"):
        embed = getattr(model, name, None)
        if embed is not None:
            luts.setdefault(id(embed.lut.weight), embed.lut)
    if not luts:
        raise DataError("the model has no token embeddings (src_embed / tgt_embed) to fill")
    reports = [init_embeddings(lut, tokenizer, path, **kwargs) for lut in luts.values()]
    return reports[0]
