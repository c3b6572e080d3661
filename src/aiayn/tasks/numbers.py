"""Numbers as words, English to German: a small offline translation task.

The task maps the English words of an integer ``0 <= n <= 999_999`` to its German words:

    three hundred forty-two thousand seventeen  ->  dreihundertzweiundvierzigtausendsiebzehn

It is generated on the fly, needs no download, and is small enough for a Transformer of a few
hundred thousand parameters to learn in minutes on a CPU; yet it exercises what attention is
for (Vaswani et al., 2017, Section 4):

* **Reordering.** German says the units before the tens: 42 is *zwei-und-vierzig*
  ("two-and-forty"). Translating ``forty two`` to ``zwei und vierzig`` needs the decoder to
  look *past* the source token it would copy next, so the cross-attention map shows a
  crossing alignment, not a diagonal.
* **Variable length.** Source and target lengths differ and are not in a fixed ratio:
  ``fifteen`` is one English token and two German ones (``fünf zehn``); ``forty`` is one
  token each; ``twenty-one`` is two English tokens and three German ones.
* **Long-range dependency.** ``thousand`` scales everything before it. Whether the first
  German tokens are ``drei hundert`` (300) or ``drei hundert ... tausend`` (300 000) is
  decided by a source token that may be five positions further on.
* **Context-dependent spelling.** One is ``eins`` at the end of a number but ``ein`` before
  ``hundert``, ``tausend`` and ``und`` (``einhunderteins``, ``einundzwanzig``).

Tokens
------
English tokens are the words of the American spelling without "and", with hyphenated
compounds split at the hyphen: 342 -> ``three hundred forty two`` (displayed by
`english_text` as "three hundred forty-two").

German numbers are written as one word, so `german_morphemes` cuts the word into
morphemes a reader recognises; joining them without spaces gives the correct spelling
(`german_text`). The segmentation is:

* units: ``eins`` (a final one), ``ein`` (one before ``hundert``/``tausend``/``und``),
  ``zwei drei vier fünf sechs sieben acht neun``; and ``null`` for 0 alone;
* ``zehn``, ``elf``, ``zwölf``;
* regular teens split into unit + ``zehn``: 13 -> ``drei zehn``, 14 -> ``vier zehn``,
  15 -> ``fünf zehn``, 18 -> ``acht zehn``, 19 -> ``neun zehn``;
* the two irregular teens stay whole, because their first part is not a unit word:
  16 -> ``sechzehn``, 17 -> ``siebzehn`` (never *sechszehn*, *siebenzehn*);
* tens are one token each: ``zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig
  neunzig`` (so ``forty`` aligns to exactly one German token);
* unit + tens: unit, ``und``, tens: 42 -> ``zwei und vierzig``, 21 -> ``ein und zwanzig``;
* the scale words ``hundert`` and ``tausend``, always with an explicit multiplier:
  100 -> ``ein hundert`` (*einhundert*, not the equally correct *hundert*), 1000 ->
  ``ein tausend`` (*eintausend*). Saying the one every time keeps the mapping regular:
  English always says "one hundred" too.

The German word uses ``ß`` (``dreißig``) and umlauts (``fünf``, ``zwölf``) as in standard
spelling; tokens are plain Python ``str`` and are never normalised.

Vocabulary
----------
`build_vocab` makes one vocabulary shared by source and target, with the project-wide
special tokens first: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3. `tokenizer`
wraps it as the project's `Tokenizer` (what `aiayn translate` loads with a checkpoint):
English text in, German words out.
"""

import random
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import ConfigError

MAX_NUMBER = 999_999
"""The largest number the task covers (it has no word for a million)."""

VOCAB_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
"""Special tokens, in id order: pad = 0, bos = 1, eos = 2, unk = 3."""

_EN_SMALL = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]  # fmt: skip
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# Units 1..9 as said before "hundert", "tausend" and "und": "ein", not "eins".
_DE_UNITS = ["", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"]
_DE_TENS = [
    "", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig",
    "neunzig",
]  # fmt: skip
_DE_SMALL: dict[int, list[str]] = {
    1: ["eins"],
    10: ["zehn"],
    11: ["elf"],
    12: ["zwölf"],
    16: ["sechzehn"],
    17: ["siebzehn"],
}


def _check_number(n: int, name: str = "n") -> None:
    """Raise `ConfigError` (a `ValueError`) unless ``n`` is an int in [0, MAX_NUMBER]."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ConfigError(f"{name} must be an integer in [0, {MAX_NUMBER}], got {n!r}")


def _english_below_1000(n: int) -> list[str]:
    """English display words of 1 <= n <= 999, hyphenating tens and units ("forty-two")."""
    hundreds, rest = divmod(n, 100)
    words = [_EN_SMALL[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_EN_TENS[tens] + (f"-{_EN_SMALL[units]}" if units else ""))
    elif rest:
        words.append(_EN_SMALL[rest])
    return words


def _english_display_words(n: int) -> list[str]:
    """English display words of n, e.g. ["three", "hundred", "forty-two"]."""
    if n == 0:
        return ["zero"]
    thousands, rest = divmod(n, 1000)
    words = [*_english_below_1000(thousands), "thousand"] if thousands else []
    if rest:
        words += _english_below_1000(rest)
    return words


def english_text(n: int) -> str:
    """The English words of n as text: 342 -> "three hundred forty-two".

    American style: no "and", tens and units joined by a hyphen.
    Raises `ValueError` (`ConfigError`) unless 0 <= n <= 999_999.
    """
    _check_number(n)
    return " ".join(_english_display_words(n))


def english_words(n: int) -> list[str]:
    """The English tokens of n: `english_text` split at spaces and hyphens.

    342 -> ["three", "hundred", "forty", "two"]; 7_005 -> ["seven", "thousand", "five"].
    Raises `ValueError` (`ConfigError`) unless 0 <= n <= 999_999.
    """
    return english_text(n).replace("-", " ").split()


def _german_below_1000(n: int, final: bool) -> list[str]:
    """German morphemes of 1 <= n <= 999; ``final`` says whether a lone one is "eins".

    A trailing one is "eins" only at the very end of the number: 101 -> einhunderteins,
    but 101_000 -> einhundertein-tausend.
    """
    hundreds, rest = divmod(n, 100)
    morphemes = [_DE_UNITS[hundreds], "hundert"] if hundreds else []
    if rest == 1 and not final:
        morphemes.append("ein")
    elif rest in _DE_SMALL:
        morphemes += _DE_SMALL[rest]
    elif rest >= 20:
        tens, units = divmod(rest, 10)
        if units:
            morphemes += [_DE_UNITS[units], "und"]
        morphemes.append(_DE_TENS[tens])
    elif rest >= 13:
        morphemes += [_DE_UNITS[rest - 10], "zehn"]
    elif rest:
        morphemes.append(_DE_UNITS[rest])
    return morphemes


def german_morphemes(n: int) -> list[str]:
    """The German number word of n, cut into morphemes (segmentation: see the module doc).

    342 -> ["drei", "hundert", "zwei", "und", "vierzig"]; 16 -> ["sechzehn"];
    1_001 -> ["ein", "tausend", "eins"]. Joined without spaces they spell the German word.
    Raises `ValueError` (`ConfigError`) unless 0 <= n <= 999_999.
    """
    _check_number(n)
    if n == 0:
        return ["null"]
    thousands, rest = divmod(n, 1000)
    morphemes = [*_german_below_1000(thousands, final=False), "tausend"] if thousands else []
    if rest:
        morphemes += _german_below_1000(rest, final=True)
    return morphemes


def german_text(n: int) -> str:
    """The German number word of n: 342_017 -> "dreihundertzweiundvierzigtausendsiebzehn".

    Always ``"".join(german_morphemes(n))``.
    Raises `ValueError` (`ConfigError`) unless 0 <= n <= 999_999.
    """
    return "".join(german_morphemes(n))


def make_splits(
    n_train: int, n_valid: int, n_test: int, seed: int, max_value: int = MAX_NUMBER
) -> dict[str, list[int]]:
    """Draw disjoint train/valid/test sets of distinct integers from [0, max_value].

    The 100 *basic* numbers 0..99 hold every unit, teen and tens word in both languages
    and every German ``und`` form, so they go to train first: train holds all of them
    (when ``n_train >= 100``; a random subset of them otherwise) and is topped up with
    random larger numbers. Valid and test are drawn from the numbers train left out,
    larger numbers first, so they measure whether the model composes words it has seen
    rather than whether it remembers 42; they fall back on leftover basic numbers only
    when the range has too few others (e.g. ``max_value < 99``).

    Returns ``{"train": [...], "valid": [...], "test": [...]}`` with exactly the requested
    sizes, each list in random order. The result depends only on the arguments: the same
    seed gives the same splits (one `random.Random(seed)` draws everything).

    Raises `ValueError` (`ConfigError`) for a negative size, a ``max_value`` outside
    [0, 999_999], or more numbers asked for than the range holds.
    """
    for name, size in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {size!r}")
    _check_number(max_value, "max_value")
    population = max_value + 1
    total = n_train + n_valid + n_test
    if total > population:
        raise ConfigError(
            f"n_train + n_valid + n_test = {total} exceeds the {population} distinct numbers "
            f"in [0, {max_value}]; ask for fewer or raise max_value"
        )

    rng = random.Random(seed)
    n_basic = min(100, population)
    basics = list(range(n_basic))
    rng.shuffle(basics)
    train_basics, spare_basics = basics[:n_train], basics[n_train:]
    n_train_large = n_train - len(train_basics)
    n_large = min(n_train_large + n_valid + n_test, population - n_basic)
    large = rng.sample(range(n_basic, population), n_large)

    train = train_basics + large[:n_train_large]
    rng.shuffle(train)
    held_out = large[n_train_large:] + spare_basics
    return {
        "train": train,
        "valid": held_out[:n_valid],
        "test": held_out[n_valid : n_valid + n_test],
    }


def pairs(numbers: Iterable[int]) -> list[tuple[list[str], list[str]]]:
    """(English tokens, German morphemes) for each number, in the given order.

    pairs([42]) -> [(["forty", "two"], ["zwei", "und", "vierzig"])].
    """
    return [(english_words(n), german_morphemes(n)) for n in numbers]


def build_vocab(pairs: Iterable[tuple[Sequence[str], Sequence[str]]]) -> list[str]:
    """One vocabulary for both sides: `VOCAB_SPECIALS`, then every token seen, sorted.

    A token's id is its index in the returned list, so ``<pad>`` = 0, ``<s>`` = 1,
    ``</s>`` = 2, ``<unk>`` = 3 always. Tokens equal to a special are not repeated.
    """
    tokens: set[str] = set()
    for source, target in pairs:
        tokens.update(source)
        tokens.update(target)
    return VOCAB_SPECIALS + sorted(tokens - set(VOCAB_SPECIALS))


def tokenizer(vocab: Sequence[str]) -> Tokenizer:
    """The vocabulary ``vocab`` (from `build_vocab`) as a `Tokenizer`: English text in, in
    any case, split at spaces and hyphens ("Three hundred forty-two" -> the ids of ``three
    hundred forty two``, as `english_words`); ids out as German text, the morphemes joined
    without spaces (``drei hundert zwei und vierzig`` -> "dreihundertzweiundvierzig", as
    `german_text`)."""
    tok = tokenizers.Tokenizer(
        models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=VOCAB_SPECIALS[3])
    )
    tok.add_special_tokens(VOCAB_SPECIALS)  # their ids 0-3 in `vocab`; dropped by decoding
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s-]+"), behavior="removed")
    tok.decoder = decoders.Fuse()
    return Tokenizer(tok)
