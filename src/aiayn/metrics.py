"""Evaluation metrics: BLEU and chrF, ROUGE, classification scores, exact match, token accuracy.

BLEU, chrF and ROUGE come from the libraries made for them (sacrebleu, rouge-score) and are
never reimplemented here: scores are only comparable with published ones when they are
computed by the same code with the same settings. In particular BLEU is computed by sacrebleu
on *detokenized* text, cased, with its ``13a`` tokenizer by default, and the sacrebleu
signature is returned with the score so that every reported number says how it was made.

Every score is on a 0-100 scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF
from torch import Tensor

from aiayn.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "BleuResult",
    "classification_scores",
    "corpus_bleu",
    "exact_match",
    "rouge",
    "token_accuracy",
]


@dataclass(frozen=True)
class BleuResult:
    """Corpus-level BLEU and chrF, each with the sacrebleu signature that describes it.

    Attributes:
        bleu: Corpus BLEU, 0-100.
        chrf: Corpus chrF (character n-gram F-score, beta=2), 0-100.
        signature: The BLEU signature, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|...``.
        chrf_signature: The chrF signature.
    """

    bleu: float
    chrf: float
    signature: str
    chrf_signature: str


def _check_pairs(predictions: Sequence[object], references: Sequence[object], what: str) -> None:
    """Raise `DataError` unless there are as many predictions as references, and at least one."""
    if len(predictions) != len(references):
        raise DataError(
            f"{what}: got {len(predictions)} predictions but {len(references)} references; "
            "pass exactly one reference per prediction, in the same order"
        )
    if not predictions:
        raise DataError(f"{what}: got no predictions; pass at least one prediction/reference pair")


def corpus_bleu(
    hypotheses: list[str],
    references: list[str],
    *,
    more_references: Sequence[Sequence[str]] = (),
    lowercase: bool = False,
    tokenize: str = "13a",
) -> BleuResult:
    """Corpus BLEU and chrF with sacrebleu, against one reference per hypothesis or more.

    Pass detokenized text (what a reader would see), not subwords: sacrebleu applies its own
    tokenizer, which is what makes the score comparable across papers. The defaults (cased,
    ``13a``) are the standard reporting settings (use ``tokenize="intl"`` or ``"zh"`` etc. where
    the target language calls for it).

    Args:
        hypotheses: System outputs, one string per segment.
        references: References, aligned with ``hypotheses``.
        more_references: Further reference streams, each aligned with ``hypotheses``
            (multi-reference BLEU: an n-gram counts up to its most frequent use in any one
            reference); the signature's ``nrefs`` says how many.
        lowercase: Lowercase both sides before scoring (BLEU only; chrF is always cased).
        tokenize: A sacrebleu tokenizer name (``13a``, ``intl``, ``zh``, ``char``, ``none``...).

    Returns:
        A `BleuResult` with the scores and their signatures.

    Raises:
        DataError: if the lists differ in length or are empty.
    """
    refs = [list(stream) for stream in (references, *more_references)]  # sacrebleu's streams
    for stream in refs:
        _check_pairs(hypotheses, stream, "BLEU")
    bleu = BLEU(lowercase=lowercase, tokenize=tokenize)
    chrf = CHRF()
    return BleuResult(
        bleu=float(bleu.corpus_score(list(hypotheses), refs).score),
        chrf=float(chrf.corpus_score(list(hypotheses), refs).score),
        signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures, averaged over examples.

    Uses Google's ``rouge-score`` with the Porter stemmer (the usual summarization setting).
    Its tokenizer lowercases and keeps only ``a-z`` and ``0-9``: any other letter (``ü``,
    ``é``, every non-Latin script) is dropped, so the scores fit English and mislead for
    other languages; a warning says so when more than 1% of the letters are dropped.
    ``rougeL`` treats each text as one sequence; ``rougeLsum`` is summary-level ROUGE-L, which
    splits both texts into sentences on newlines, so it only differs from ``rougeL`` when the
    texts contain one sentence per line (join sentences with ``"\\n"`` to get it). The average
    is a plain mean of per-example F-measures (no bootstrap aggregation).

    Args:
        predictions: Generated texts.
        references: Reference texts, aligned with ``predictions``.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"}`` mapped to mean F-measure x 100.

    Raises:
        DataError: if the lists differ in length or are empty.
    """
    # Imported here: rouge-score pulls in nltk, which costs seconds at every `aiayn` start.
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references, "ROUGE")
    dropped = _share_of_letters_dropped(references)
    if dropped > 0.01:
        logger.warning(
            "ROUGE: %.0f%% of the references' letters are not a-z, and rouge-score's "
            "tokenizer drops them: the scores measure the rest only (they mislead for "
            "languages other than English)",
            100 * dropped,
        )
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    # rouge-score logs "Using default tokenizer." at INFO through absl at every scorer.
    logging.getLogger("absl").setLevel(logging.WARNING)
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        # rouge-score's signature is score(target, prediction): reference first.
        scores = scorer.score(ref, pred)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def _share_of_letters_dropped(texts: Sequence[str]) -> float:
    """The share of the letters in `texts` that rouge-score's tokenizer drops (not a-z)."""
    letters = dropped = 0
    for text in texts:
        for char in text:
            if char.isalpha():
                letters += 1
                dropped += not char.isascii()
    return dropped / letters if letters else 0.0


def classification_scores(
    predictions: list[int], labels: list[int], num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy and macro-averaged F1, both x 100.

    Macro-F1 is the unweighted mean of per-class F1 over the classes that occur in
    ``labels`` or in ``predictions``; a class absent from both contributes no term. A class
    with no true positives gets F1 = 0 (precision or recall with a zero denominator counts as
    0). This is scikit-learn's ``f1_score(average="macro", zero_division=0)`` with its default
    ``labels`` (the union of both lists).

    Args:
        predictions: Predicted class ids.
        labels: Gold class ids, aligned with ``predictions``.
        num_classes: If given, every id must lie in ``[0, num_classes)``; it does not add
            terms for unseen classes.

    Returns:
        ``{"accuracy": ..., "macro_f1": ...}``.

    Raises:
        DataError: if the lists differ in length, are empty, or hold an id out of range.
    """
    _check_pairs(predictions, labels, "classification scores")
    if num_classes is not None:
        bad = [c for c in (*predictions, *labels) if not 0 <= c < num_classes]
        if bad:
            raise DataError(
                f"classification scores: class id {bad[0]} is outside [0, {num_classes}); "
                "check the label mapping or pass the right num_classes"
            )
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    f1s = []
    for c in sorted(set(predictions) | set(labels)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        # F1 = 2TP / (2TP + FP + FN); the denominator is > 0 because c occurs somewhere.
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": 100.0 * correct / len(labels),
        "macro_f1": 100.0 * sum(f1s) / len(f1s),
    }


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference, after stripping outer whitespace.

    Args:
        predictions: Predicted strings.
        references: Reference strings, aligned with ``predictions``.

    Returns:
        Exact-match rate x 100.

    Raises:
        DataError: if the lists differ in length or are empty.
    """
    _check_pairs(predictions, references, "exact match")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)


def token_accuracy(predictions: Tensor, targets: Tensor, pad_id: int) -> float:
    """Fraction of non-pad target positions predicted correctly (0-1, not x 100).

    Args:
        predictions: Logits ``(B, T, V)`` (the argmax is taken) or token ids ``(B, T)``.
        targets: Gold token ids ``(B, T)``; positions equal to ``pad_id`` are ignored.
        pad_id: The padding id.

    Returns:
        Correct non-pad positions / non-pad positions.

    Raises:
        DataError: if the shapes do not match or every target position is padding.
    """
    if predictions.dim() == 3:
        predictions = predictions.argmax(dim=-1)
    if predictions.shape != targets.shape:
        raise DataError(
            f"token accuracy: predictions have shape {tuple(predictions.shape)} but targets "
            f"{tuple(targets.shape)}; pass logits (B, T, V) or ids (B, T) matching targets (B, T)"
        )
    mask = targets != pad_id
    total = int(mask.sum())
    if total == 0:
        raise DataError(
            "token accuracy: every target position is padding; pass at least one real token"
        )
    correct = int(((predictions == targets) & mask).sum())
    return correct / total
