"""Subword BPE tokenizer (Sennrich et al. 2016) on Hugging Face ``tokenizers``.

The paper (§5.1) encodes WMT En-De with a shared source-target BPE vocabulary of about 37,000
tokens; :meth:`Tokenizer.train` builds such a joint vocabulary when given source and target
texts together.

Pipeline: NFKC normalisation, the text's leading and trailing whitespace stripped, and its
spaces made ``▁``, one more in front -> split at line breaks (each one a token) and before each
``▁`` (the space starts the following word, as in SentencePiece) -> BPE -> Metaspace decoding.
Because the space is part of the token, decoding restores the exact text ("A man, in a hat."
round-trips, line breaks too: "\r\n" becomes "\n"), with no detokeniser heuristics.
(Tokenizers trained before 2026-11-28 split at spaces only: "ROMEO:\nWhat" was one piece,
and BPE merged across the line break.)
Stripping makes " a text " and "a text" the same ids, so a line read with its trailing space
(every SST-2 sentence has one) and the same line typed in are classified alike. (Tokenizers
trained before the strip was added keep their own normalisation.) Characters never seen in training map to ``<unk>``, which decoding
drops along with the other specials.

Special tokens have fixed ids, shared by the whole project: ``<pad>``=0, ``<s>``=1,
``</s>``=2, ``<unk>``=3.

:meth:`Tokenizer.train_words` builds a word-level vocabulary instead (one id per word or
punctuation mark, the rest ``<unk>``), the unit of pre-trained word vectors such as GloVe
(:mod:`aiayn.data.embeddings`). Both kinds live in the same class and file format.
Pre-training adds its own specials (``<mask>``, the span sentinels ``<extra_id_0>``...) right
after the four, at ids 4, 5, ...: the four stay where they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from aiayn import atomic
from aiayn.errors import ConfigError, DataError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # order = ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MASK = "<mask>"  # BERT's masked-LM token (added by pre-training, after the fixed four)


def sentinel(i: int) -> str:
    """The i-th span sentinel of T5's span corruption: ``<extra_id_i>``."""
    return f"<extra_id_{i}>"


_SPACE = "\u2581"  # '▁', SentencePiece's visible space

# Word-level pre-tokenisation, applied to each whitespace-separated chunk. Close to the
# Penn Treebank / Stanford tokeniser that GloVe's corpora went through, so that the words
# match the vectors' words: clitics apart ("don't" -> "do n't", "it's" -> "it 's"),
# abbreviations ("u.s."), hyphenated words ("well-known") and numbers ("3,000", "1.5") whole,
# "..." and "--" as one token, every other punctuation mark alone.
WORD_PATTERN = (
    r"\w+(?=(?i:n't)\b)"  # "do" of "don't"
    r"|(?i:n't)\b"
    r"|'(?i:s|re|ve|m|ll|d)\b"
    r"|(?:[^\W\d_]\.){2,}"  # u.s., e.g.
    r"|\w+(?:(?:-|(?<=\d)[.,](?=\d))\w+)*"  # words, well-known, 3,000, 1.5
    r"|\.{2,}|-{2,}"
    r"|[^\w\s]"
)


def _training_texts(
    texts: Iterable[str], vocab_size: int, min_frequency: int, n_special: int
) -> list[str]:
    """The training texts as a list, after the checks both kinds of vocabulary need."""
    if vocab_size <= n_special:
        raise ConfigError(
            f"vocab_size {vocab_size} leaves no room beyond the {n_special} special tokens; "
            "use a few thousand or more"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency {min_frequency} must be >= 1")
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise DataError("cannot train a tokenizer on no text; pass the training sentences")
    return texts


class Tokenizer:
    """A BPE subword (or word-level) tokenizer with the project's fixed special-token ids.

    Build one with :meth:`train` (BPE), :meth:`train_words` (word-level) or :meth:`load`; the
    constructor wraps an existing ``tokenizers.Tokenizer`` and checks its special tokens.
    """

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            got = tok.token_to_id(token)
            if got != expected_id:
                raise DataError(
                    f"tokenizer has {token!r} at id {got}, expected {expected_id}; retrain it "
                    f"with aiayn (specials must be {', '.join(SPECIAL_TOKENS)} = ids 0-3)"
                )
        self._tok = tok

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        extra_special_tokens: Sequence[str] = (),
    ) -> Tokenizer:
        """Learn a BPE vocabulary of at most ``vocab_size`` tokens (specials included).

        ``extra_special_tokens`` (e.g. ``["<mask>"]``) get the ids right after the fixed four,
        in order (4, 5, ...); they are never split and :meth:`decode` drops them.

        For a joint source-target vocabulary (the paper's setup) pass both sides together,
        e.g. ``Tokenizer.train(src_lines + tgt_lines, 37000)``. A merge is learned only for
        pairs seen at least ``min_frequency`` times. The vocabulary can end up smaller than
        ``vocab_size`` when the corpus runs out of merges.

        Raises:
            ConfigError: ``vocab_size`` cannot hold the special tokens, or ``min_frequency``
                is below 1.
            DataError: ``texts`` holds no non-blank text.
        """
        extra = list(extra_special_tokens)
        clash = [t for t in extra if t in SPECIAL_TOKENS or not t or extra.count(t) > 1]
        if clash:
            raise ConfigError(
                f"extra special token {clash[0]!r} is empty, repeated, or one of the fixed "
                f"{', '.join(SPECIAL_TOKENS)}; give distinct new tokens such as '<mask>'"
            )
        texts = _training_texts(texts, vocab_size, min_frequency, len(SPECIAL_TOKENS) + len(extra))

        tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
        # The text gets its leading "▁" and its spaces as "▁" when it is normalised, not
        # when it is split, so that a word after a line break has none: "ROMEO:\nWhat" is
        # "▁ROMEO:", "\n", "What", the line's end the same token as the text's end, and
        # it decodes back without a space after the line break. (Metaspace's own
        # prepend_scheme "first" would do it too, but goes by offsets in the original text,
        # which the strip moves.) A text without line breaks is split as before (but for
        # one that starts with a "▁" of its own, which now gets another in front).
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.NFKC(),
                normalizers.Replace(Regex("\r\n?"), "\n"),  # Windows' and old Macs' line ends
                normalizers.Strip(),
                normalizers.Prepend(_SPACE),
                normalizers.Replace(" ", _SPACE),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex("\n"), behavior="isolated"),  # a line break alone
                pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never"),
            ]
        )
        tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # Added first, in order: ids 0..3, then the extra specials from 4 on.
            special_tokens=[*SPECIAL_TOKENS, *extra],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def train_words(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 1,
        lowercase: bool = False,
    ) -> Tokenizer:
        """Learn a word-level vocabulary: the ``vocab_size - 4`` most frequent words.

        Text is NFKC-normalised (and lowercased with ``lowercase``: GloVe 6B's words are
        lowercase), split on whitespace and then by :data:`WORD_PATTERN` into words and
        punctuation. Words outside the vocabulary, or seen fewer than ``min_frequency``
        times, become ``<unk>``. Decoding joins the words with single spaces ("do n't",
        "hat .") -- unlike BPE it does not restore the original spacing.

        Raises:
            ConfigError: ``vocab_size`` cannot hold the special tokens, or ``min_frequency``
                is below 1.
            DataError: ``texts`` holds no non-blank text, or no word ``min_frequency`` times.
        """
        texts = _training_texts(texts, vocab_size, min_frequency, len(SPECIAL_TOKENS))

        tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            ]
        )
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # added first, so they get ids 0..3
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        if tok.get_vocab_size() == len(SPECIAL_TOKENS):
            raise DataError(
                f"no word occurs {min_frequency} times in the texts, so the vocabulary would "
                "hold only the special tokens; lower the minimum frequency"
            )
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save` (a ``tokenizer.json`` file).

        Raises:
            DataError: the file is missing, is not a tokenizer file, or lacks the specials.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: tokenizer file not found; train one first or fix the path")
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON/schema
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{p}: not a valid tokenizer.json ({msg}); retrain the tokenizer or restore "
                f"the file"
            ) from e
        try:
            return cls(tok)
        except DataError as e:
            raise DataError(f"{p}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as ``tokenizer.json`` at ``path`` (parent folders created).

        Written to a temporary file then renamed, so an interrupted save never leaves a
        half-written file behind.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(p) as tmp:
            self._tok.save(str(tmp))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without ``<s>``/``</s>`` (the caller adds those)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallelised in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenised text of ``ids``; special tokens (pad, bos, eos, unk) are dropped.

        Accepts a list of ints or a 1-D tensor. Callers usually cut at the first ``</s>``
        before decoding, since tokens after it are not part of the output.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` for many sequences at once."""
        return self._tok.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=True
        )

    def tokens(self, text: str) -> list[str]:
        """The subword strings of ``text`` (for inspection and debugging)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token with id ``token_id``, or None if out of range."""
        return self._tok.id_to_token(token_id)

    @property
    def kind(self) -> str:
        """``bpe`` or ``word`` (from the wrapped model; another model type gives its name)."""
        model = self._tok.model
        if isinstance(model, models.BPE):
            return "bpe"
        if isinstance(model, models.WordLevel):
            return "word"
        return type(model).__name__.lower()

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token (the fixed four and any extra ones), ascending."""
        added = self._tok.get_added_tokens_decoder()
        return sorted(i for i, t in added.items() if t.special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included: the embedding and output-layer size."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
