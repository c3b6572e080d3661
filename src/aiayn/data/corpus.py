"""Reading parallel corpora: line-aligned text files, TSV/CSV/JSONL tables, Hugging Face
datasets, and the Multi30k recipe.

Every reader returns plain Python strings (``list[str]`` or ``list[tuple[str, str]]`` of
``(source, target)`` pairs); tokenisation happens later. Bad input raises
:class:`aiayn.errors.DataError` with a one-line message that names the file (and line, where
there is one) and says what to do.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiayn import atomic
from aiayn.errors import DataError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")
MULTI30K_LANGS = ("de", "en", "fr", "cs")
DEFAULT_MULTI30K_CACHE = Path("~/.cache/aiayn/multi30k")

_TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz")


def read_text(path: PathLike) -> str:
    """Return the whole of ``path`` decoded as strict UTF-8 (gunzipped if it ends in ``.gz``).

    A leading byte-order mark is dropped. Raises DataError for a missing, unreadable, corrupt
    (gzip) or non-UTF-8 file; the UTF-8 message carries the 1-based line number.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"{p}: {what}; check the path (relative paths start at {Path.cwd()})")
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                data = f.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # gzip raises BadGzipFile (an OSError) or EOFError for a truncated stream.
        raise DataError(
            f"{p}: cannot read ({e}); if it is gzip'd check the download is complete, "
            f"if it is plain text drop the .gz suffix"
        ) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{p}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from e
    return text.removeprefix("\ufeff")


def read_lines(path: PathLike) -> list[str]:
    """Read a text file (plain, or gzip'd when the name ends in ``.gz``) into a list of lines.

    Lines are split on ``\\n`` only -- not on the other characters ``str.splitlines`` treats
    as breaks (U+2028, form feed, ...) -- so two line-aligned files stay aligned. Each line is
    stripped of surrounding whitespace (which also drops a Windows ``\\r``); inner whitespace
    is kept, and blank lines are kept as ``""`` so alignment is preserved.

    Raises:
        DataError: the file is missing, unreadable, empty (no non-whitespace text), or not
            valid UTF-8 (the message names the line).
    """
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; point at a file with one sentence per line")
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline terminates the last line; it does not start one
        lines.pop()
    return [line.strip() for line in lines]


def read_parallel(src_path: PathLike, tgt_path: PathLike) -> list[tuple[str, str]]:
    """Read two line-aligned files into ``(source, target)`` pairs (line i pairs with line i).

    Raises:
        DataError: either file fails :func:`read_lines`, or their line counts differ.
    """
    src = read_lines(src_path)
    tgt = read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; parallel files "
            f"must be line-aligned, so check both are the same split of the same corpus"
        )
    return list(zip(src, tgt, strict=True))


def _get_field(record: Mapping[str, Any], field: str) -> Any:
    """Look ``field`` up in ``record``; a dotted name (``"translation.de"``) walks nested maps.

    A key that itself contains dots is tried as-is first. Raises KeyError when absent.
    """
    if field in record:
        return record[field]
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(field)
        value = value[part]
    return value


def _as_text(value: Any) -> str:
    # Labels in classification tables are often ints; keep the pair type uniform (str, str).
    return value if isinstance(value, str) else str(value)


def is_table(path: str | Path) -> bool:
    """Whether the file's name says it is a table (.tsv, .csv, .jsonl, or these gzip'd)."""
    return Path(path).name.lower().endswith(_TABLE_SUFFIXES)


def _table_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in _TABLE_SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]
    raise DataError(
        f"{path}: unknown table format; name the file with one of the suffixes "
        f"{', '.join(_TABLE_SUFFIXES)}"
    )


def _read_delimited(path: Path, text: str, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    """Parse a TSV/CSV text with a header row into ``(line number, row by column)`` pairs."""
    # TSV files (GLUE etc.) use no quoting: a '"' is part of the text. CSV uses RFC 4180
    # quoting, so a quoted field may span lines; csv needs newline="" to see those.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    if not header or not any(h.strip() for h in header):
        raise DataError(f"{path}:1: no header row; the first line must name the columns")
    header = [h.strip() for h in header]
    rows = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: {len(row)} fields but the header has "
                f"{len(header)}; fix the row (a stray delimiter or quote?)"
            )
        rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """Parse JSON lines into ``(line number, object)`` pairs, skipping blank lines."""
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
            ) from e
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; each line "
                f"must be one JSON object"
            )
        records.append((lineno, record))
    return records


def read_jsonl(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSON-lines file (optionally .gz, any name) as ``(line number, object)``
    pairs, blank lines skipped.

    Raises:
        DataError: a missing or unreadable file, or a line that is not one JSON object.
    """
    return _read_jsonl(Path(path), read_text(path))


def read_records(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a TSV/CSV/JSONL table (optionally .gz) as ``(line number, record)`` pairs.

    The same formats as :func:`read_table`, for callers that report errors by line (the
    classification task). TSV/CSV values are strings; JSONL values keep their JSON types.

    Raises:
        DataError: unknown suffix, unreadable or empty file, or a malformed row.
    """
    p = Path(path)
    fmt = _table_format(p)
    text = read_text(p)
    if not text.strip():
        raise DataError(f"{p}: file is empty; point at a table with a header row and data")
    if fmt == "jsonl":
        records = _read_jsonl(p, text)
    else:
        records = _read_delimited(p, text, "\t" if fmt == "tsv" else ",")
    if not records:
        raise DataError(f"{p}: no data rows; point at a table with at least one record")
    return records


def read_table(path: PathLike, src_field: str, tgt_field: str) -> list[tuple[str, str]]:
    """Read ``(record[src_field], record[tgt_field])`` pairs from a table file.

    The format follows the suffix: ``.tsv``/``.csv`` (optionally ``.gz``) need a header row
    and are addressed by column name; ``.jsonl`` (optionally ``.gz``) holds one JSON object a
    line, addressed by key, where a dotted key (``"translation.de"``) reaches into nested
    objects. Non-string values (e.g. integer labels) are converted with ``str``. Blank lines
    are skipped.

    Raises:
        DataError: unknown suffix, unreadable/empty file, malformed row or JSON line, or a
            column/key missing (the message lists the ones available).
    """
    p = Path(path)
    fmt = _table_format(p)
    pairs = []
    for lineno, record in read_records(p):
        fields = []
        for field in (src_field, tgt_field):
            try:
                fields.append(_as_text(_get_field(record, field)))
            except KeyError:
                kind, where = ("key", f":{lineno}") if fmt == "jsonl" else ("column", "")
                raise DataError(
                    f"{p}{where}: no {kind} {field!r}; available: "
                    f"{', '.join(map(repr, record))}; pick one of those"
                ) from None
        pairs.append((fields[0], fields[1]))
    return pairs


def load_hf_dataset(
    name: str,
    split: str,
    src_field: str,
    tgt_field: str,
    config: str | None = None,
) -> list[tuple[str, str]]:
    """Load ``(src, tgt)`` pairs from a Hugging Face dataset, e.g.
    ``load_hf_dataset("wmt14", "train", "translation.de", "translation.en", config="de-en")``.

    Needs the optional ``datasets`` package, imported here rather than at module import so the
    rest of aiayn works without it. Dotted field names reach into nested columns.

    Raises:
        DataError: ``datasets`` is not installed, the dataset cannot be loaded, or a field is
            missing (the message lists the columns).
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DataError(
            f"loading the Hugging Face dataset {name!r} needs the `datasets` package; run "
            f"`pip install datasets`, or export the data to a .tsv/.jsonl file for read_table"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name/config/split: all user-fixable
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; check the name, "
            f"config and split on huggingface.co/datasets"
        ) from e
    pairs = []
    for i, record in enumerate(ds):
        try:
            pairs.append(
                (_as_text(_get_field(record, src_field)), _as_text(_get_field(record, tgt_field)))
            )
        except KeyError as e:
            raise DataError(
                f"Hugging Face dataset {name!r} split {split!r}: record {i} has no field "
                f"{e.args[0]!r}; available columns: {', '.join(map(repr, record))}; use a "
                f"dotted name such as 'translation.de' for nested fields"
            ) from None
    if not pairs:
        raise DataError(f"Hugging Face dataset {name!r} split {split!r} is empty; pick a split")
    return pairs


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` atomically: a partial download never appears at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic.replacing(dest) as tmp,
        open(tmp, "wb") as out,
        urllib.request.urlopen(url, timeout=60) as resp,
    ):
        while chunk := resp.read(1 << 20):
            out.write(chunk)


def multi30k(
    split: str,
    src_lang: str,
    tgt_lang: str,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> list[tuple[str, str]]:
    """The Multi30k task-1 corpus (Elliott et al. 2016) as ``(src, tgt)`` sentence pairs.

    With ``root``, read ``{root}/{split}.{lang}.gz`` (the file names of
    github.com/multi30k/dataset ``data/task1/raw``). Without it, download any missing file
    from that repository into ``cache_dir`` (default ``~/.cache/aiayn/multi30k``) and read it
    from there.

    Args:
        split: ``train`` (29,000 pairs), ``val`` (1,014), ``test_2016_flickr`` (1,000),
            ``test_2017_flickr`` or ``test_2017_mscoco``.
        src_lang, tgt_lang: two different codes among ``de``, ``en``, ``fr``, ``cs``.

    Raises:
        DataError: unknown split/language, a file missing under ``root``, or a download that
            failed (the message says to pass a local folder as ``root``).
    """
    if split not in MULTI30K_SPLITS:
        raise DataError(
            f"unknown Multi30k split {split!r}; use one of {', '.join(MULTI30K_SPLITS)}"
        )
    for lang in (src_lang, tgt_lang):
        if lang not in MULTI30K_LANGS:
            raise DataError(
                f"unknown Multi30k language {lang!r}; use one of {', '.join(MULTI30K_LANGS)}"
            )
    if src_lang == tgt_lang:
        raise DataError(f"source and target language are both {src_lang!r}; pick two different")

    names = [f"{split}.{lang}.gz" for lang in (src_lang, tgt_lang)]
    if root is not None:
        folder = Path(root).expanduser()
        for name in names:
            if not (folder / name).is_file():
                raise DataError(
                    f"{folder / name} not found; root must be a folder holding the Multi30k "
                    f"files {names[0]} and {names[1]} (as in github.com/multi30k/dataset "
                    f"data/task1/raw)"
                )
    else:
        folder = Path(cache_dir).expanduser() if cache_dir else DEFAULT_MULTI30K_CACHE.expanduser()
        for name in names:
            dest = folder / name
            if dest.is_file():
                continue
            url = MULTI30K_URL.format(name=name)
            logger.info("downloading %s to %s", url, dest)
            try:
                _download(url, dest)
            except (urllib.error.URLError, OSError, ValueError) as e:
                # URLError/HTTPError/timeouts are OSErrors; ValueError covers a bad URL.
                raise DataError(
                    f"could not download {url} ({e}); check the network, or fetch the files "
                    f"yourself and pass the local folder holding {names[0]} and {names[1]} "
                    f"as root"
                ) from e
    return read_parallel(folder / names[0], folder / names[1])
