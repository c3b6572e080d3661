"""Tests for aiayn.data.corpus: readers of parallel corpora and their error messages."""

import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aiayn.data import corpus
from aiayn.data.corpus import (
    load_hf_dataset,
    multi30k,
    read_lines,
    read_parallel,
    read_table,
)
from aiayn.errors import AiaynError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTI30K = DATA / "multi30k"
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "val.de.gz").is_file(),
    reason=f"Multi30k not found at {MULTI30K} (the shared offline data folder)",
)


def write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_lines_plain_and_gzip_agree(tmp_path):
    text = "A man,  in a hat.\r\nEin Mann.\n\nGrüße \n"
    plain = read_lines(write(tmp_path / "a.txt", text))
    gz = read_lines(write(tmp_path / "a.txt.gz", text))
    # Inner whitespace and blank lines kept (alignment); \r and outer spaces stripped.
    assert plain == gz == ["A man,  in a hat.", "Ein Mann.", "", "Grüße"]


def test_read_lines_no_trailing_newline_and_unicode_separators(tmp_path):
    # U+2028 is a line break for str.splitlines but must not split a corpus line.
    p = write(tmp_path / "a.txt", "one\u2028still one\ntwo")
    assert read_lines(p) == ["one\u2028still one", "two"]


def test_read_lines_strips_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello\nworld\n".encode())
    assert read_lines(p) == ["hello", "world"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt.*does not exist"):
        read_lines(tmp_path / "nope.txt")


@pytest.mark.parametrize("name", ["empty.txt", "empty.txt.gz"])
def test_empty_file(tmp_path, name):
    p = write(tmp_path / name, "")
    with pytest.raises(DataError, match=rf"{name}.*empty"):
        read_lines(p)


def test_whitespace_only_file_is_empty(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_lines(write(tmp_path / "ws.txt", "\n  \n"))


@pytest.mark.parametrize("name", ["bad.txt", "bad.txt.gz"])
def test_non_utf8_names_file_and_line(tmp_path, name):
    raw = b"fine\nalso fine\nM\xe4nner\n"  # latin-1 umlaut on line 3
    p = tmp_path / name
    p.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataError, match=rf"{name}:3: not valid UTF-8 .*0xe4 at column 2"):
        read_lines(p)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x\.gz: cannot read"):
        read_lines(p)


def test_error_is_one_line_value_error(tmp_path):
    with pytest.raises(DataError) as info:
        read_lines(tmp_path / "missing.txt")
    assert isinstance(info.value, ValueError) and isinstance(info.value, AiaynError)
    assert "\n" not in str(info.value)


def test_read_parallel(tmp_path):
    src = write(tmp_path / "x.de", "Hallo\nWelt\n")
    tgt = write(tmp_path / "x.en.gz", "Hello\nWorld\n")
    assert read_parallel(src, tgt) == [("Hallo", "Hello"), ("Welt", "World")]


def test_read_parallel_mismatched_counts(tmp_path):
    src = write(tmp_path / "x.de", "a\nb\nc\n")
    tgt = write(tmp_path / "x.en", "a\nb\n")
    with pytest.raises(DataError, match=r"x\.de has 3 lines but .*x\.en has 2"):
        read_parallel(src, tgt)


def test_read_table_tsv(tmp_path):
    p = write(tmp_path / "t.tsv", 'sentence\tlabel\nit\'s "good"\t1\nbad\t0\n\n')
    assert read_table(p, "sentence", "label") == [('it\'s "good"', "1"), ("bad", "0")]


def test_read_table_csv_gz_with_quoted_newline(tmp_path):
    p = write(tmp_path / "t.csv.gz", 'src,tgt\n"a, b","line1\nline2"\nc,d\n')
    assert read_table(p, "src", "tgt") == [("a, b", "line1\nline2"), ("c", "d")]


def test_read_table_jsonl_nested_and_non_string(tmp_path):
    rows = [
        {"translation": {"de": "Hallo", "en": "Hello"}, "n": 1},
        {"translation": {"de": "x", "en": "y"}, "n": 2},
    ]
    p = write(tmp_path / "t.jsonl.gz", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_table(p, "translation.de", "translation.en") == [("Hallo", "Hello"), ("x", "y")]
    assert read_table(p, "translation.en", "n") == [("Hello", "1"), ("y", "2")]


def test_read_table_missing_column_lists_available(tmp_path):
    p = write(tmp_path / "t.tsv", "sentence\tlabel\nhi\t1\n")
    with pytest.raises(
        DataError, match=r"t\.tsv: no column 'text'; available: 'sentence', 'label'"
    ):
        read_table(p, "text", "label")


def test_read_table_missing_key_names_line(tmp_path):
    p = write(tmp_path / "t.jsonl", '{"a": "x", "b": "y"}\n\n{"a": "z"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:3: no key 'b'; available: 'a'"):
        read_table(p, "a", "b")


def test_read_table_bad_rows(tmp_path):
    with pytest.raises(DataError, match=r"t\.tsv:3: 3 fields but the header has 2"):
        read_table(write(tmp_path / "t.tsv", "a\tb\n1\t2\n1\t2\t3\n"), "a", "b")
    with pytest.raises(DataError, match=r"t\.jsonl:2: not valid JSON"):
        read_table(write(tmp_path / "t.jsonl", '{"a": 1}\n{oops\n'), "a", "a")
    with pytest.raises(DataError, match=r"t\.jsonl:1: a JSON list"):
        read_table(write(tmp_path / "t.jsonl", "[1, 2]\n"), "a", "a")
    with pytest.raises(DataError, match="unknown table format"):
        read_table(write(tmp_path / "t.txt", "a\tb\n"), "a", "b")
    with pytest.raises(DataError, match="no data rows"):
        read_table(write(tmp_path / "h.tsv", "a\tb\n"), "a", "b")


def test_load_hf_dataset_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match=r"wmt14.*pip install datasets"):
        load_hf_dataset("wmt14", "train", "translation.de", "translation.en", config="de-en")


@needs_multi30k
def test_multi30k_local_root():
    pairs = multi30k("val", "de", "en", root=MULTI30K)
    assert len(pairs) == 1014
    assert pairs[0] == (
        "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
        "A group of men are loading cotton onto a truck",
    )
    assert len(multi30k("test_2016_flickr", "en", "fr", root=str(MULTI30K))) == 1000


def test_multi30k_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown Multi30k split 'dev'"):
        multi30k("dev", "de", "en", root=tmp_path)
    with pytest.raises(DataError, match="unknown Multi30k language 'xx'"):
        multi30k("val", "de", "xx", root=tmp_path)
    with pytest.raises(DataError, match="both 'de'"):
        multi30k("val", "de", "de", root=tmp_path)
    with pytest.raises(DataError, match=r"val\.de\.gz not found; root must be a folder"):
        multi30k("val", "de", "en", root=tmp_path)


def test_multi30k_download_failure_says_pass_root(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"could not download .*train\.de\.gz.*as root"):
        multi30k("train", "de", "en", cache_dir=tmp_path / "cache")
    # Nothing half-written is left behind in the cache.
    assert list((tmp_path / "cache").iterdir()) == []


def test_multi30k_download_writes_cache_atomically(tmp_path, monkeypatch):
    payloads = {
        "val.de.gz": gzip.compress(b"Hallo\nWelt\n"),
        "val.en.gz": gzip.compress(b"Hello\nWorld\n"),
    }
    calls = []

    class FakeResponse:
        def __init__(self, data):
            self.data, self.pos = data, 0

        def read(self, n):
            chunk = self.data[self.pos : self.pos + n]
            self.pos += n
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        calls.append(url)
        return FakeResponse(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "cache"
    assert multi30k("val", "de", "en", cache_dir=cache) == [("Hallo", "Hello"), ("Welt", "World")]
    assert calls == [corpus.MULTI30K_URL.format(name=n) for n in ("val.de.gz", "val.en.gz")]
    assert sorted(p.name for p in cache.iterdir()) == ["val.de.gz", "val.en.gz"]
    # A second call uses the cache and does not download again.
    multi30k("val", "de", "en", cache_dir=cache)
    assert len(calls) == 2
