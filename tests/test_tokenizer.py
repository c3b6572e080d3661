"""Tests for aiayn.data.tokenizer: BPE training, special ids, round trip, save/load."""

import gzip
import unicodedata
from pathlib import Path

import pytest
import torch

from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTI30K = DATA / "multi30k"
pytestmark = pytest.mark.skipif(
    not (MULTI30K / "train.de.gz").is_file(),
    reason=f"Multi30k not found at {MULTI30K} (the shared offline data folder)",
)


def lines(name: str, n: int | None = None) -> list[str]:
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        out = [line.strip() for line in f]
    return out[:n] if n else out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # Joint de+en vocabulary, as the paper shares one BPE vocabulary across both sides.
    return Tokenizer.train(lines("train.de.gz", 3000) + lines("train.en.gz", 3000), 2000)


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert [tok.token_to_id(t) for t in ["<pad>", "<s>", "</s>", "<unk>"]] == [0, 1, 2, 3]


def test_vocab_size(tok):
    assert 1000 < tok.vocab_size <= 2000
    assert tok.id_to_token(tok.vocab_size - 1) is not None
    assert tok.id_to_token(tok.vocab_size) is None


def test_encode_has_no_specials_and_ids_in_range(tok):
    ids = tok.encode("A man, in a hat.")
    assert ids and all(4 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(["A man, in a hat.", "Ein Hund."]) == [ids, tok.encode("Ein Hund.")]


def test_round_trip_exact(tok):
    assert tok.decode(tok.encode("A man, in a hat.")) == "A man, in a hat."
    assert tok.decode(tok.encode("Zwei Männer grüßen.")) == "Zwei Männer grüßen."


def test_surrounding_whitespace_does_not_change_the_ids(tok):
    """Every SST-2 sentence ends in a space; a sentence typed in does not: the same ids."""
    assert tok.encode("A man, in a hat. ") == tok.encode("A man, in a hat.")
    assert tok.encode(" \tA man,  in a hat.\n") == tok.encode("A man,  in a hat.")


def test_decode_drops_specials_and_takes_tensors(tok):
    ids = tok.encode("A dog runs.")
    padded = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(padded) == "A dog runs."
    assert tok.decode(torch.tensor(padded)) == "A dog runs."
    assert tok.decode_batch([padded, ids]) == ["A dog runs.", "A dog runs."]


def test_unseen_characters_map_to_unk(tok):
    ids = tok.encode("a \u4e2d b")  # a CJK character never seen in Multi30k
    assert tok.unk_id in ids
    assert tok.decode(ids) == "a  b"


def test_round_trip_on_multi30k_val(tok):
    val = lines("val.de.gz") + lines("val.en.gz")
    decoded = [tok.decode(ids) for ids in tok.encode_batch(val)]
    exact = sum(d == unicodedata.normalize("NFKC", v) for d, v in zip(decoded, val, strict=True))
    assert exact / len(val) >= 0.99


def test_a_line_break_is_a_token_of_its_own():
    """A line's last word is the token it is at the end of a text (a prompt "ROMEO:" ends as
    the training text's "ROMEO:" line does), and the next line's first word has no space."""
    speech = "ROMEO:\nWhat say you, my lord?\n\nJULIET:\n  Nothing at all."
    tok = Tokenizer.train([speech] * 20 + ["What say you"] * 5, 120)
    assert "\n" in tok.backend.get_vocab()
    assert tok.tokens("ROMEO:\nWhat say") == ["▁ROMEO:", "\n", "What", "▁say"]
    head = tok.encode("ROMEO:")
    assert tok.encode("ROMEO:\nWhat say you")[: len(head)] == head
    assert tok.decode(tok.encode(speech)) == speech  # blank lines and indents round-trip
    assert tok.decode(tok.encode(" ROMEO:\n")) == "ROMEO:"  # stripped at both ends
    assert tok.encode("ROMEO:\r\nWhat\rsay") == tok.encode("ROMEO:\nWhat\nsay")


def test_a_text_without_line_breaks_is_split_as_before():
    """The line-break split changes nothing for one-line texts: the vocabulary and the ids are
    those of the pipeline before it (Metaspace adding the "▁" itself), built here by hand."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    texts = lines("train.de.gz", 2000) + lines("train.en.gz", 2000)
    before = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    before.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
    before.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    before.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    before.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=special, show_progress=False)
    )
    now = Tokenizer.train(texts, 1500)
    assert now.backend.get_vocab() == before.get_vocab()
    val = [" " + t for t in lines("val.en.gz", 200) + lines("val.de.gz", 200)]
    assert now.encode_batch(val) == [e.ids for e in before.encode_batch(val)]
    assert now.decode_batch(now.encode_batch(val)) == before.decode_batch(now.encode_batch(val))


def test_save_load_equal(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.backend.get_vocab() == tok.backend.get_vocab()
    sample = lines("val.en.gz", 50) + lines("val.de.gz", 50)
    assert loaded.encode_batch(sample) == tok.encode_batch(sample)
    assert loaded.backend.to_str() == tok.backend.to_str()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp left


def test_load_missing(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer file not found"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_load_corrupt(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.load(path)


def test_load_wrong_special_ids(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>", "<pad>"])
    hf.train_from_iterator(["a b c", "a b"], trainer=trainer)
    path = tmp_path / "other.json"
    hf.save(str(path))
    with pytest.raises(DataError, match=r"other\.json: tokenizer has '<pad>' at id 1, expected 0"):
        Tokenizer.load(path)


def test_train_bad_arguments():
    with pytest.raises(ConfigError, match="vocab_size 4"):
        Tokenizer.train(["a b"], 4)
    with pytest.raises(ConfigError, match="min_frequency"):
        Tokenizer.train(["a b"], 100, min_frequency=0)
    with pytest.raises(DataError, match="no text"):
        Tokenizer.train(["", "  "], 100)
