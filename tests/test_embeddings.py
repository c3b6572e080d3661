"""Tests for aiayn.data.embeddings (GloVe / word2vec readers, init_embeddings), the word-level
tokenizer, and the `aiayn embeddings` command."""

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aiayn.cli import main
from aiayn.config import TransformerConfig
from aiayn.data.embeddings import (
    init_embeddings,
    init_model_embeddings,
    project,
    read_vectors,
    token_counts,
)
from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import ConfigError, DataError
from aiayn.model import Transformer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLOVE = DATA / "glove" / "glove.6B.100d.top50k.txt.gz"
needs_glove = pytest.mark.skipif(not GLOVE.is_file(), reason=f"needs {GLOVE}")

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["the", "cat", "sat", "on", "mat", "Paris", "naïve"]


def toy_vectors(dim: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {w: rng.normal(size=dim).astype(np.float32) for w in WORDS}


def write_glove(path: Path, vecs: dict[str, np.ndarray]) -> Path:
    lines = [w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in vecs.items()]
    data = "".join(lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_word2vec_text(path: Path, vecs: dict[str, np.ndarray]) -> Path:
    dim = len(next(iter(vecs.values())))
    # The C tool writes "%lf " per value: a trailing space before the newline.
    body = "".join(w + " " + "".join(f"{x!r} " for x in v.tolist()) + "\n" for w, v in vecs.items())
    path.write_text(f"{len(vecs)} {dim}\n" + body, encoding="utf-8")
    return path


def write_word2vec_bin(path: Path, vecs: dict, *, newline: bool = True, count=None) -> Path:
    dim = len(next(iter(vecs.values())))
    out = bytearray(f"{count or len(vecs)} {dim}\n".encode())
    for w, v in vecs.items():
        word = w if isinstance(w, bytes) else w.encode("utf-8")
        out += word + b" " + struct.pack(f"<{dim}f", *v) + (b"\n" if newline else b"")
    path.write_bytes(bytes(out))
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", ["v.txt", "v.txt.gz"])
def test_glove_text_reads_back(tmp_path, name):
    vecs = toy_vectors()
    got = read_vectors(write_glove(tmp_path / name, vecs))
    assert (got.format, got.dim, got.n_file) == ("glove", 3, len(WORDS))
    assert got.words == WORDS
    for i, w in enumerate(WORDS):
        assert torch.equal(got.vectors[i], torch.from_numpy(vecs[w]))  # repr round-trips float32


def test_only_the_wanted_words_are_kept(tmp_path):
    vecs = toy_vectors()
    got = read_vectors(write_glove(tmp_path / "v.txt", vecs), ["cat", "mat", "dog"])
    assert got.words == ["cat", "mat"] and got.vectors.shape == (2, 3)
    assert got.n_file == len(WORDS)
    assert torch.equal(got.vectors[1], torch.from_numpy(vecs["mat"]))


def test_word2vec_text_reads_back(tmp_path):
    vecs = toy_vectors(dim=4)
    got = read_vectors(write_word2vec_text(tmp_path / "v.txt", vecs))
    assert (got.format, got.dim, got.words) == ("word2vec", 4, WORDS)
    assert torch.equal(got.vectors, torch.from_numpy(np.stack([vecs[w] for w in WORDS])))


@pytest.mark.parametrize("newline", [True, False])
def test_word2vec_binary_reads_back_exactly(tmp_path, newline):
    vecs = toy_vectors(dim=5)
    path = write_word2vec_bin(tmp_path / "v.bin", vecs, newline=newline)
    for fmt in ("auto", "word2vec-bin"):
        got = read_vectors(path, format=fmt)
        assert (got.format, got.dim, got.n_file, got.words) == ("word2vec-bin", 5, 7, WORDS)
        assert torch.equal(got.vectors, torch.from_numpy(np.stack([vecs[w] for w in WORDS])))


def test_word2vec_binary_larger_than_a_read_chunk(tmp_path, monkeypatch):
    import aiayn.data.embeddings as emb

    monkeypatch.setattr(emb, "_CHUNK", 7)  # words and vectors straddle every chunk boundary
    vecs = toy_vectors(dim=6)
    got = read_vectors(write_word2vec_bin(tmp_path / "v.bin", vecs), ["naïve", "the"])
    assert got.words == ["the", "naïve"]
    assert torch.equal(got.vectors[1], torch.from_numpy(vecs["naïve"]))


def test_first_occurrence_of_a_repeated_word_wins(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("cat 1 2\ndog 3 4\ncat 5 6\n", encoding="utf-8")
    got = read_vectors(path)
    assert got.words == ["cat", "dog"] and got.vectors[0].tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------- bad files


def test_row_with_the_wrong_dimension_names_file_and_line(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("cat 1 2 3\ndog 4 5 6\nmat 7 8\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_vectors(path, ["cat"])  # checked even for rows that are not kept
    msg = one_line(exc)
    assert str(path) in msg and "line 3" in msg and "has 2 values" in msg and "expected 3" in msg


def test_word2vec_text_row_against_the_header(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("2 3\ncat 1 2 3\ndog 4 5 6 7\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3 has 4 values after the word, expected 3 \(the h"):
        read_vectors(path)
    # Every row against its header: text still, not binary (it read garbage vectors as binary).
    path.write_text("2 5\ncat 1 2 3 4\ndog 4 5 6 7\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 has 4 values after the word, expected 5 \(the h"):
        read_vectors(path)


def test_non_utf8_word_names_the_line(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes(b"cat 1 2\nd\xffg 3 4\n")
    with pytest.raises(DataError) as exc:
        read_vectors(path)
    assert f"{path}: line 2 is not UTF-8" in one_line(exc)


def test_non_number_value(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("cat 1 2\ndog 3 x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 \('dog'\) holds a value that is not a finite"):
        read_vectors(path)
    # Words on the first line (a table's header, say): not a vector file at all.
    path.write_text("sentence label\nfine 1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1 .* the file is not a vector file: give a GloVe"):
        read_vectors(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "v.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="file is empty"):
        read_vectors(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="embeddings file not found"):
        read_vectors(tmp_path / "nope.txt")


def test_binary_truncated_mid_vector(tmp_path):
    path = write_word2vec_bin(tmp_path / "v.bin", toy_vectors(dim=5))
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # the last newline and 2 of the last vector's floats
    with pytest.raises(DataError) as exc:
        read_vectors(path)
    msg = one_line(exc)
    assert str(path) in msg and "entry 7 ('naïve')" in msg and "12 of 20 bytes" in msg


def test_binary_with_fewer_entries_than_its_header(tmp_path):
    path = write_word2vec_bin(tmp_path / "v.bin", toy_vectors(dim=5), count=9)
    with pytest.raises(DataError, match=r"ends after 7 of the 9 vectors .* truncated"):
        read_vectors(path)


def test_binary_non_utf8_word(tmp_path):
    vecs = {b"cat": np.ones(2, np.float32), b"d\xffg": np.zeros(2, np.float32)}
    path = write_word2vec_bin(tmp_path / "v.bin", vecs)
    with pytest.raises(DataError, match=r"entry 2 \(byte 17\) has a word that is not UTF-8"):
        read_vectors(path)


def test_explicit_format_that_does_not_match(tmp_path):
    glove = write_glove(tmp_path / "g.txt", toy_vectors())
    w2v = write_word2vec_text(tmp_path / "w.txt", toy_vectors())
    with pytest.raises(DataError, match="not a word2vec header"):
        read_vectors(glove, format="word2vec")
    with pytest.raises(DataError, match="use format word2vec"):
        read_vectors(w2v, format="glove")
    with pytest.raises(ConfigError, match="format 'fasttext' is not one of"):
        read_vectors(glove, format="fasttext")


# --------------------------------------------------------------------------- the GloVe file


@needs_glove
def test_glove_6b_top50k_reads_fast():
    start = time.perf_counter()
    got = read_vectors(GLOVE, ["the", "movie", "good", "notaword123"])
    elapsed = time.perf_counter() - start
    assert (got.format, got.dim, got.n_file) == ("glove", 100, 50000)
    assert got.words == ["the", "good", "movie"]  # file order (by frequency)
    # The first row of the file: "the -0.038194 -0.24487 0.72812 ..."
    assert got.vectors[0, :3].tolist() == pytest.approx([-0.038194, -0.24487, 0.72812])
    assert elapsed < 10, f"reading 50k GloVe rows took {elapsed:.1f}s"


# --------------------------------------------------------------------------- word tokenizer


def test_word_tokenizer_ids_and_pretokenisation():
    texts = ["Don't stop. It's 3,000 well-known U.S. men (ok)...", "the cat sat on the mat"]
    tok = Tokenizer.train_words(texts, 1000, lowercase=True)
    assert tok.kind == "word"
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok.tokens("Don't stop. It's 3,000 well-known U.S. men (ok)...") == [
        "do", "n't", "stop", ".", "it", "'s", "3,000", "well-known", "u.s.", "men", "(", "ok",
        ")", "...",
    ]  # fmt: skip
    assert tok.id_to_token(4) == "the"  # most frequent first
    assert tok.encode("the dog") == [4, tok.unk_id]
    assert tok.decode(tok.encode("The cat sat.")) == "the cat sat ."


def test_word_tokenizer_vocab_size_min_frequency_and_case():
    texts = ["a a a b b c", "A B"]
    cased = Tokenizer.train_words(texts, 100)
    assert cased.token_to_id("A") is not None and cased.token_to_id("c") is not None
    frequent = Tokenizer.train_words(texts, 100, min_frequency=2, lowercase=True)
    assert frequent.vocab_size == 6 and frequent.token_to_id("c") is None  # 4 specials + a, b
    small = Tokenizer.train_words(texts, 5, lowercase=True)
    assert small.vocab_size == 5 and small.id_to_token(4) == "a"
    with pytest.raises(ConfigError):
        Tokenizer.train_words(texts, 4)
    with pytest.raises(DataError):
        Tokenizer.train_words(["  "], 100)
    with pytest.raises(DataError, match="no word occurs 5 times"):
        Tokenizer.train_words(texts, 100, min_frequency=5, lowercase=True)  # a: 4, b: 3, c: 1


def test_save_load_round_trips_both_kinds(tmp_path):
    texts = ["the cat sat on the mat", "a dog, a cat."] * 5
    for tok in (Tokenizer.train_words(texts, 100), Tokenizer.train(texts, 60)):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        loaded = Tokenizer.load(path)
        assert loaded.kind == tok.kind
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode("the dog sat, a cat!") == tok.encode("the dog sat, a cat!")
    assert {Tokenizer.load(tmp_path / "word.json").kind, Tokenizer.load(tmp_path / "bpe.json").kind} == {"word", "bpe"}  # fmt: skip


# --------------------------------------------------------------------------- init_embeddings


@pytest.fixture
def toy(tmp_path):
    """Vocabulary of 9 words, 5 of them in the file ('paris' only through lowercasing)."""
    texts = ["the cat sat on the mat", "the dog met paris", "zzz"]
    tok = Tokenizer.train_words(texts, 100, lowercase=True)
    vecs = toy_vectors(dim=3)
    vecs["paris"] = vecs.pop("Paris")
    path = write_glove(tmp_path / "v.txt", vecs)
    return tok, texts, path, vecs


def embedding_like_the_model(tok, d_model, seed=0):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(len(tok), d_model, padding_idx=0)
    torch.nn.init.normal_(emb.weight, std=d_model**-0.5)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


def test_coverage_on_a_toy_vocabulary(toy):
    tok, texts, path, vecs = toy
    assert tok.vocab_size - 4 == 9  # the cat sat on mat dog met paris zzz
    emb = embedding_like_the_model(tok, 3)
    before = emb.weight.detach().clone()
    report = init_embeddings(emb, tok, path, counts=token_counts(tok, texts))
    assert (report.vocab_words, report.found, report.found_lowercase) == (9, 6, 0)
    assert report.coverage == pytest.approx(6 / 9)
    # running words: 6 + 4 + 1 = 11; covered: the x3, cat, sat, on, mat, paris = 8
    assert report.token_coverage == pytest.approx(8 / 11)
    assert (report.file_dim, report.model_dim, report.projection) == (3, 3, "none")
    found = {tok.token_to_id(w) for w in ["the", "cat", "sat", "on", "mat", "paris"]}
    for i in range(len(tok)):
        changed = not torch.equal(emb.weight[i], before[i])
        assert changed == (i in found), tok.id_to_token(i)
    assert torch.equal(emb.weight[0], torch.zeros(3))  # pad row


def test_found_rows_are_the_centred_vectors_scaled_to_unit_rms_norm(toy):
    tok, _, path, vecs = toy
    emb = embedding_like_the_model(tok, 3)
    report = init_embeddings(emb, tok, path)
    words = ["the", "cat", "sat", "on", "mat", "paris"]
    raw = torch.from_numpy(np.stack([vecs[w] for w in words])).double()
    expected = (raw - raw.mean(0)) * report.scale
    got = emb.weight[[tok.token_to_id(w) for w in words]].detach().double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert got.pow(2).sum(1).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)


def test_lowercase_fallback_for_a_cased_vocabulary(tmp_path):
    tok = Tokenizer.train_words(["The cat met Paris", "the"], 100)  # cased
    path = write_glove(tmp_path / "v.txt", {w.lower(): v for w, v in toy_vectors().items()})
    on = init_embeddings(embedding_like_the_model(tok, 3), tok, path)
    off = init_embeddings(embedding_like_the_model(tok, 3), tok, path, lowercase_fallback=False)
    # vocabulary: The cat met Paris the -> the, cat exact; The, Paris through lowercase
    assert (on.vocab_words, on.found, on.found_lowercase) == (5, 4, 2)
    assert (off.found, off.found_lowercase) == (2, 0)


def test_projection_shapes_and_determinism():
    vectors = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    for d_model, projection, used in [
        (4, "pca", "pca"),
        (4, "random", "random-orthogonal"),
        (16, "pca", "random-orthogonal"),
        (10, "pca", "none"),
    ]:
        a, got_used = project(vectors, d_model, projection=projection, seed=1)
        b, _ = project(vectors, d_model, projection=projection, seed=1)
        assert a.shape == (50, d_model) and got_used == used
        assert torch.equal(a, b)
    r1, _ = project(vectors, 4, projection="random", seed=1)
    r2, _ = project(vectors, 4, projection="random", seed=2)
    assert not torch.allclose(r1, r2)


def test_expansion_keeps_every_inner_product_and_pca_keeps_the_top_variance():
    vectors = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)).double()
    centred = vectors - vectors.mean(0)
    up, _ = project(vectors, 16, seed=3)
    torch.testing.assert_close(up.double() @ up.double().T, centred @ centred.T, atol=1e-5, rtol=0)
    down, _ = project(vectors, 2)
    # PCA components are uncorrelated, in decreasing variance, and hold the top eigenvalues.
    cov = down.double().T @ down.double()
    assert abs(cov[0, 1].item()) < 1e-4 * cov[0, 0].item()
    top = torch.linalg.eigvalsh(centred.T @ centred).flip(0)[:2]
    torch.testing.assert_close(torch.diagonal(cov), top, rtol=1e-4, atol=1e-6)


def test_init_with_another_dimension_and_pad_stays_zero(toy):
    tok, _, path, _ = toy
    for d_model, used in [(8, "random-orthogonal"), (2, "pca")]:
        emb = embedding_like_the_model(tok, d_model)
        report = init_embeddings(emb, tok, path, seed=5)
        assert report.projection == used and emb.weight.shape == (len(tok), d_model)
        assert torch.equal(emb.weight[0], torch.zeros(d_model))
        again = embedding_like_the_model(tok, d_model)
        init_embeddings(again, tok, path, seed=5)
        assert torch.equal(emb.weight, again.weight)


def test_init_refuses_a_size_mismatch_and_unknown_projection(toy):
    tok, _, path, _ = toy
    with pytest.raises(DataError, match="embedding has 5 rows but the tokenizer 13"):
        init_embeddings(torch.nn.Embedding(5, 3), tok, path)
    with pytest.raises(ConfigError, match="projection 'svd'"):
        init_embeddings(embedding_like_the_model(tok, 3), tok, path, projection="svd")


def test_init_model_embeddings_fills_the_tied_output_layer(toy):
    tok, _, path, _ = toy
    cfg = TransformerConfig.from_preset("tiny", vocab_size=len(tok))
    model = Transformer(cfg)
    report = init_model_embeddings(model, tok, path)
    assert report.found == 6 and report.model_dim == cfg.d_model
    cat = tok.token_to_id("cat")
    assert model.generator.weight is model.src_embed.lut.weight
    assert model.generator.weight[cat].norm().item() > 0
    assert torch.equal(model.src_embed.lut.weight[0], torch.zeros(cfg.d_model))


@needs_glove
def test_glove_on_a_known_vocabulary():
    texts = ["the movie was good , but the plot was thin .", "a notawordqq film"]
    tok = Tokenizer.train_words(texts, 100, lowercase=True)
    emb = embedding_like_the_model(tok, 64)
    report = init_embeddings(emb, tok, GLOVE, counts=token_counts(tok, texts))
    # 12 distinct words; the shared top-50k file lacks "a" and "notawordqq".
    assert (report.vocab_words, report.found) == (12, 10)
    assert report.token_coverage == pytest.approx(12 / 14)
    # 10 found vectors are too few for 64 principal components: random projection instead.
    assert (report.file_dim, report.projection) == (100, "random-orthogonal")
    assert init_embeddings(embedding_like_the_model(tok, 8), tok, GLOVE).projection == "pca"


# --------------------------------------------------------------------------- CLI


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_embeddings_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embeddings", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: aiayn embeddings" in out and "--vocab-from" in out and "--lowercase" in out


def test_cli_embeddings_report(toy, tmp_path, capsys):
    _, texts, path, _ = toy
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = ["embeddings", "--quiet", "--file", path, "--vocab-from", corpus, "--lowercase"]
    code, out, err = run([*argv, "--d-model", "3"], capsys)
    assert code == 0, err
    assert "vocabulary coverage: 6 / 9 words = 66.67%" in out
    assert "token coverage: 72.73% of running words" in out
    assert "(glove, dimension 3)" in out and "projection none" in out


def test_cli_embeddings_tsv_column(toy, tmp_path, capsys):
    _, _, path, _ = toy
    table = tmp_path / "train.tsv"
    table.write_text("sentence\tlabel\nthe cat\t1\nzzz dog\t0\n", encoding="utf-8")
    code, out, _ = run(
        ["embeddings", "--quiet", "--file", path, "--vocab-from", table, "--column", "sentence"],
        capsys,
    )
    assert code == 0 and "vocabulary coverage: 2 / 4 words = 50.00%" in out
    # Without --column the table would be read as plain text, header and labels included.
    code, out, err = run(["embeddings", "--file", path, "--vocab-from", table], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: --vocab-from {table} is a table: name its text column with")


def test_cli_embeddings_bad_file_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "texts.txt"
    corpus.write_text("the cat\n", encoding="utf-8")
    bad = tmp_path / "v.txt"
    bad.write_text("the 1 2 3\ncat 1 2\n", encoding="utf-8")
    for file, expected in [(bad, "line 2 has 2 values"), (tmp_path / "none.txt", "not found")]:
        code, out, err = run(["embeddings", "--file", file, "--vocab-from", corpus], capsys)
        assert code == 1 and out == ""
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1


@needs_glove
def test_cli_embeddings_on_glove(tmp_path, capsys):
    corpus = tmp_path / "texts.txt"
    corpus.write_text("The movie was good.\nA bad film!\n", encoding="utf-8")
    code, out, _ = run(
        ["embeddings", "--quiet", "--file", GLOVE, "--vocab-from", corpus, "--lowercase"], capsys
    )
    # the movie was good . bad film ! are in the file; "a" is not (see the test above)
    assert code == 0 and "vocabulary coverage: 8 / 9 words = 88.89%" in out
    assert "dimension 100" in out and "model dimension 512: projection random-orthogonal" in out


def test_truncated_gzip_file(tmp_path):
    path = write_glove(tmp_path / "v.txt.gz", toy_vectors(dim=50))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"cannot read .* is it a complete \.gz file"):
        read_vectors(path)
