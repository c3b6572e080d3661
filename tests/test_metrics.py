"""Tests of aiayn.metrics: BLEU/chrF against sacrebleu, ROUGE, classification, token accuracy."""

from __future__ import annotations

import logging

import pytest
import sacrebleu
import torch

from aiayn.errors import DataError
from aiayn.metrics import (
    BleuResult,
    classification_scores,
    corpus_bleu,
    exact_match,
    rouge,
    token_accuracy,
)

# Hand-written references and system outputs with the usual kinds of errors: a changed word,
# a dropped word, reordering, a wrong case, punctuation, and one exact match.
REFERENCES = [
    "The cat sat on the mat.",
    "It is raining heavily in Berlin this morning.",
    "We will meet at the station at five o'clock.",
    "The committee approved the new budget on Tuesday.",
    "She has never been to Japan before.",
    "Please close the window when you leave.",
    "The results were published in a scientific journal.",
    "He bought three apples and a loaf of bread.",
    "The train to Munich is delayed by twenty minutes.",
    "Our team won the final match last year.",
]
HYPOTHESES = [
    "The cat sat on the mat.",
    "It is raining hard in Berlin this morning.",
    "We meet at the station at five o'clock.",
    "The new budget was approved by the committee on Tuesday.",
    "she has never been in Japan before.",
    "Please close the window when you go.",
    "The results were published in a science journal",
    "He bought 3 apples and bread.",
    "The train to Munich has a delay of twenty minutes.",
    "Our team won the last match final year.",
]


def test_bleu_and_chrf_equal_sacrebleu() -> None:
    result = corpus_bleu(HYPOTHESES, REFERENCES)
    assert isinstance(result, BleuResult)
    assert result.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert result.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score)
    assert 20.0 < result.bleu < 90.0  # a sanity range: partly right translations
    for part in ("nrefs:1", "tok:13a", "case:mixed"):
        assert part in result.signature
    assert "nrefs:1" in result.chrf_signature


def test_bleu_lowercase_and_tokenize_are_passed_on() -> None:
    result = corpus_bleu(HYPOTHESES, REFERENCES, lowercase=True, tokenize="intl")
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True, tokenize="intl")
    assert result.bleu == pytest.approx(expected.score)
    assert "case:lc" in result.signature and "tok:intl" in result.signature


def test_several_references_are_sacrebleus_multi_reference_scores() -> None:
    second = HYPOTHESES[:4] + REFERENCES[4:]  # four sentences exactly right
    result = corpus_bleu(HYPOTHESES, REFERENCES, more_references=[second])
    assert result.bleu == pytest.approx(
        sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES, second]).score
    )
    assert result.chrf == pytest.approx(
        sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES, second]).score
    )
    assert result.bleu > corpus_bleu(HYPOTHESES, REFERENCES).bleu
    assert "nrefs:2" in result.signature
    with pytest.raises(DataError, match="got 10 predictions but 5 references"):
        corpus_bleu(HYPOTHESES, REFERENCES, more_references=[second[:5]])


def test_bleu_known_values() -> None:
    assert corpus_bleu(REFERENCES, REFERENCES).bleu == pytest.approx(100.0)
    assert corpus_bleu(REFERENCES, REFERENCES).chrf == pytest.approx(100.0)
    no_overlap = corpus_bleu(["alpha beta gamma delta"], ["one two three four"])
    assert no_overlap.bleu == 0.0


@pytest.mark.parametrize(
    "fn",
    [corpus_bleu, rouge, exact_match, classification_scores],
    ids=["bleu", "rouge", "exact_match", "classification"],
)
def test_length_mismatch_and_empty_raise(fn) -> None:
    a, b = ([1, 2], [1]) if fn is classification_scores else (["a b", "c"], ["a b"])
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        fn(a, b)
    with pytest.raises(DataError, match="no predictions"):
        fn([], [])


def test_rouge_identical_is_100() -> None:
    scores = rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for value in scores.values():
        assert value == pytest.approx(100.0)


def test_rouge_hand_computed() -> None:
    # Prediction: 3 unigrams, all in the 6-unigram reference -> P = 1, R = 1/2, F = 2/3.
    # Bigrams: 2 of 2 predicted, in 5 reference bigrams -> P = 1, R = 2/5, F = 4/7.
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
    assert scores["rouge2"] == pytest.approx(100 * 4 / 7)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)
    # Averaged over examples: (100 + 0) / 2.
    assert rouge(["a b", "x y"], ["a b", "p q"])["rouge1"] == pytest.approx(50.0)


def test_rouge_warns_where_its_tokenizer_drops_the_letters(caplog) -> None:
    """rouge-score keeps a-z and 0-9: identical Japanese texts score 0."""
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        assert rouge(["日本語の文です。"], ["日本語の文です。"])["rouge1"] == 0.0
        english = "The café was fine. " + "The coffee was good. " * 10  # 1 of 184 letters
        rouge([english], [english])  # no warning
    assert [r.getMessage() for r in caplog.records] == [
        "ROUGE: 100% of the references' letters are not a-z, and rouge-score's tokenizer "
        "drops them: the scores measure the rest only (they mislead for languages other "
        "than English)"
    ]


def test_rouge_uses_stemming() -> None:
    assert rouge(["the cats were running"], ["the cat was running"])["rouge1"] > 70.0


def test_classification_hand_computed() -> None:
    # class 0: TP 1 FP 1 FN 0 -> F1 2/3; class 1: TP 2 FP 0 FN 1 -> 4/5; class 2: TP 1 -> 1.
    preds, labels = [0, 0, 1, 1, 2], [0, 1, 1, 1, 2]
    scores = classification_scores(preds, labels)
    assert scores["accuracy"] == pytest.approx(80.0)
    assert scores["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 1) / 3)
    # Classes 3 and 4 occur nowhere, so they add no term.
    assert classification_scores(preds, labels, num_classes=5) == scores


def test_classification_predicted_only_class_counts_as_zero() -> None:
    # class 0: TP 1 FN 1 -> 2/3; class 3 is only predicted: F1 0.
    scores = classification_scores([0, 3], [0, 0])
    assert scores["macro_f1"] == pytest.approx(100 * (2 / 3) / 2)


def test_classification_out_of_range_raises() -> None:
    with pytest.raises(DataError, match="outside"):
        classification_scores([0, 3], [0, 1], num_classes=3)


def test_exact_match() -> None:
    assert exact_match(["a b", " c ", "d"], ["a b", "c", "e"]) == pytest.approx(200 / 3)


def test_token_accuracy_from_ids_and_logits() -> None:
    pad = 0
    targets = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    preds = torch.tensor([[5, 1, 7, 3], [8, 9, 4, 0]])  # pads are ignored whatever they hold
    assert token_accuracy(preds, targets, pad) == pytest.approx(4 / 5)
    logits = torch.nn.functional.one_hot(preds, num_classes=10).float()
    assert token_accuracy(logits, targets, pad) == pytest.approx(4 / 5)


def test_token_accuracy_errors() -> None:
    with pytest.raises(DataError, match="shape"):
        token_accuracy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 0)
    with pytest.raises(DataError, match="padding"):
        token_accuracy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 0)
