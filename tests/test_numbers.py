"""Tests of the English -> German number-words task (aiayn.tasks.numbers)."""

import pytest

from aiayn.tasks.numbers import (
    MAX_NUMBER,
    VOCAB_SPECIALS,
    build_vocab,
    english_text,
    english_words,
    german_morphemes,
    german_text,
    make_splits,
    pairs,
)

# Hand-verified: (n, English text, German word).
TABLE = [
    (0, "zero", "null"),
    (1, "one", "eins"),
    (7, "seven", "sieben"),
    (10, "ten", "zehn"),
    (11, "eleven", "elf"),
    (12, "twelve", "zwölf"),
    (13, "thirteen", "dreizehn"),
    (15, "fifteen", "fünfzehn"),
    (16, "sixteen", "sechzehn"),
    (17, "seventeen", "siebzehn"),
    (19, "nineteen", "neunzehn"),
    (20, "twenty", "zwanzig"),
    (21, "twenty-one", "einundzwanzig"),
    (30, "thirty", "dreißig"),
    (31, "thirty-one", "einunddreißig"),
    (40, "forty", "vierzig"),
    (42, "forty-two", "zweiundvierzig"),
    (50, "fifty", "fünfzig"),
    (60, "sixty", "sechzig"),
    (66, "sixty-six", "sechsundsechzig"),
    (70, "seventy", "siebzig"),
    (77, "seventy-seven", "siebenundsiebzig"),
    (80, "eighty", "achtzig"),
    (99, "ninety-nine", "neunundneunzig"),
    (100, "one hundred", "einhundert"),
    (101, "one hundred one", "einhunderteins"),
    (111, "one hundred eleven", "einhundertelf"),
    (116, "one hundred sixteen", "einhundertsechzehn"),
    (200, "two hundred", "zweihundert"),
    (342, "three hundred forty-two", "dreihundertzweiundvierzig"),
    (999, "nine hundred ninety-nine", "neunhundertneunundneunzig"),
    (1000, "one thousand", "eintausend"),
    (1001, "one thousand one", "eintausendeins"),
    (1100, "one thousand one hundred", "eintausendeinhundert"),
    (2024, "two thousand twenty-four", "zweitausendvierundzwanzig"),
    (7005, "seven thousand five", "siebentausendfünf"),
    (10_000, "ten thousand", "zehntausend"),
    (16_017, "sixteen thousand seventeen", "sechzehntausendsiebzehn"),
    (21_021, "twenty-one thousand twenty-one", "einundzwanzigtausendeinundzwanzig"),
    (60_070, "sixty thousand seventy", "sechzigtausendsiebzig"),
    (100_000, "one hundred thousand", "einhunderttausend"),
    (101_001, "one hundred one thousand one", "einhunderteintausendeins"),
    (120_019, "one hundred twenty thousand nineteen", "einhundertzwanzigtausendneunzehn"),
    (
        342_017,
        "three hundred forty-two thousand seventeen",
        "dreihundertzweiundvierzigtausendsiebzehn",
    ),
    (
        999_999,
        "nine hundred ninety-nine thousand nine hundred ninety-nine",
        "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
    ),
]


@pytest.mark.parametrize(("n", "english", "german"), TABLE)
def test_table(n: int, english: str, german: str) -> None:
    assert english_text(n) == english
    assert english_words(n) == english.replace("-", " ").split()
    assert german_text(n) == german
    assert "".join(german_morphemes(n)) == german


@pytest.mark.parametrize(
    ("n", "tokens"),
    [
        (342, ["three", "hundred", "forty", "two"]),
        (15, ["fifteen"]),
        (7_005, ["seven", "thousand", "five"]),
        (0, ["zero"]),
        (120_019, ["one", "hundred", "twenty", "thousand", "nineteen"]),
    ],
)
def test_english_tokens(n: int, tokens: list[str]) -> None:
    assert english_words(n) == tokens


@pytest.mark.parametrize(
    ("n", "morphemes"),
    [
        (0, ["null"]),
        (1, ["eins"]),
        (13, ["drei", "zehn"]),
        (16, ["sechzehn"]),
        (17, ["siebzehn"]),
        (21, ["ein", "und", "zwanzig"]),
        (30, ["dreißig"]),
        (42, ["zwei", "und", "vierzig"]),
        (101, ["ein", "hundert", "eins"]),
        (342, ["drei", "hundert", "zwei", "und", "vierzig"]),
        (1000, ["ein", "tausend"]),
        (101_000, ["ein", "hundert", "ein", "tausend"]),
        (
            342_017,
            ["drei", "hundert", "zwei", "und", "vierzig", "tausend", "siebzehn"],
        ),
    ],
)
def test_german_segmentation(n: int, morphemes: list[str]) -> None:
    assert german_morphemes(n) == morphemes


def test_tens_and_units_cross() -> None:
    """The reordering the attention map should show: forty two -> zwei und vierzig."""
    english, german = pairs([42])[0]
    assert english == ["forty", "two"]
    assert german.index("zwei") < german.index("vierzig")


# Independent oracles: read the tokens back to a number.
_EN_VALUES = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
} | {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
}
_DE_VALUES = {
    w: i for i, w in enumerate("null eins zwei drei vier fünf sechs sieben acht neun".split())
} | {"ein": 1, "zehn": 10, "elf": 11, "zwölf": 12, "sechzehn": 16, "siebzehn": 17}
_DE_VALUES |= {
    w: 10 * i
    for i, w in enumerate(
        "zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split(), 2
    )
}


def _read(tokens: list[str], values: dict[str, int], hundred: str, thousand: str) -> int:
    total, group = 0, 0
    for token in tokens:
        if token == hundred:
            group *= 100
        elif token == thousand:
            total, group = group * 1000, 0
        elif token != "und":
            group += values[token]
    return total + group


_SAMPLE = [*range(2500), *range(2500, MAX_NUMBER + 1, 997), MAX_NUMBER]


def test_round_trip_and_spelling_rules() -> None:
    german_words = set()
    for n in _SAMPLE:
        english, german = english_words(n), german_morphemes(n)
        assert _read(english, _EN_VALUES, "hundred", "thousand") == n
        assert _read(german, _DE_VALUES, "hundert", "tausend") == n
        text = german_text(n)
        assert text == "".join(german)
        german_words.add(text)
        assert english_text(n).replace("-", " ").split() == english
        # "eins" only ends a number; "ein" never does.
        assert "eins" not in german[:-1] and german[-1] != "ein"
        for wrong in ("sechszehn", "siebenzehn", "sechszig", "siebenzig", "dreissig"):
            assert wrong not in text
    assert len(german_words) == len(_SAMPLE)


@pytest.mark.parametrize("bad", [-1, MAX_NUMBER + 1, 1_000_000])
@pytest.mark.parametrize("fn", [english_words, english_text, german_morphemes, german_text])
def test_out_of_range(fn, bad: int) -> None:
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, 999999\]"):
        fn(bad)


def test_non_integer_rejected() -> None:
    with pytest.raises(ValueError, match="n must be"):
        german_text(3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_splits_sizes_disjoint_and_in_range(seed: int) -> None:
    splits = make_splits(1000, 200, 300, seed)
    assert set(splits) == {"train", "valid", "test"}
    sizes = {name: len(numbers) for name, numbers in splits.items()}
    assert sizes == {"train": 1000, "valid": 200, "test": 300}
    train, valid, test = (set(splits[k]) for k in ("train", "valid", "test"))
    assert len(train) == 1000 and len(valid) == 200 and len(test) == 300
    assert not (train & valid or train & test or valid & test)
    assert all(0 <= n <= MAX_NUMBER for n in train | valid | test)
    assert set(range(100)) <= train  # every basic word is seen in training
    assert min(valid | test) >= 100


def test_splits_deterministic_per_seed() -> None:
    assert make_splits(500, 50, 50, seed=7) == make_splits(500, 50, 50, seed=7)
    assert make_splits(500, 50, 50, seed=7) != make_splits(500, 50, 50, seed=8)


def test_splits_small_range_and_small_train() -> None:
    splits = make_splits(30, 10, 10, seed=3, max_value=49)
    every = splits["train"] + splits["valid"] + splits["test"]
    assert sorted(every) == list(range(50))  # the whole range, no repeats
    small = make_splits(20, 5, 5, seed=3, max_value=999)
    assert set(small["train"]) <= set(range(100))
    assert min(small["valid"] + small["test"]) >= 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_train": -1, "n_valid": 1, "n_test": 1}, "n_train"),
        ({"n_train": 1, "n_valid": -1, "n_test": 1}, "n_valid"),
        ({"n_train": 1, "n_valid": 1, "n_test": -2}, "n_test"),
        ({"n_train": 40, "n_valid": 10, "n_test": 1, "max_value": 49}, "exceeds the 50"),
        ({"n_train": 1, "n_valid": 1, "n_test": 1, "max_value": 1_000_000}, "max_value"),
    ],
)
def test_splits_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(seed=0, **kwargs)


def test_vocab_covers_every_pair() -> None:
    splits = make_splits(2000, 300, 300, seed=0)
    all_pairs = pairs(splits["train"] + splits["valid"] + splits["test"])
    vocab = build_vocab(all_pairs)
    assert vocab[:4] == VOCAB_SPECIALS == ["<pad>", "<s>", "</s>", "<unk>"]
    assert vocab[4:] == sorted(vocab[4:])
    assert len(vocab) == len(set(vocab))
    index = set(vocab)
    for english, german in all_pairs:
        assert set(english) <= index and set(german) <= index


def test_vocab_from_train_covers_held_out() -> None:
    """0..99 plus a few larger numbers in train carry every word: valid/test need no <unk>."""
    splits = make_splits(200, 500, 500, seed=5)
    index = set(build_vocab(pairs(splits["train"])))
    for english, german in pairs(splits["valid"] + splits["test"]):
        assert set(english) <= index and set(german) <= index


def test_pairs_and_small_vocab() -> None:
    assert pairs([342, 16]) == [
        (["three", "hundred", "forty", "two"], ["drei", "hundert", "zwei", "und", "vierzig"]),
        (["sixteen"], ["sechzehn"]),
    ]
    assert build_vocab(pairs([21])) == [*VOCAB_SPECIALS, "ein", "one", "twenty", "und", "zwanzig"]
