"""ROUGE-L, repetition and length on hand-made answers whose values are known."""

from __future__ import annotations

import math

import pytest

from covey.train.metrics import (
    answer_scores,
    distinct_2,
    paired_difference,
    repeats_heavily,
    rouge_l,
    standard_error,
    summarize,
)


def test_rouge_l_is_the_lcs_f1_over_words() -> None:
    # LCS of "the cat sat on the mat" and "the cat lay on a mat" is "the cat on mat": 4 of 6
    assert rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1.0  # case, punctuation
    assert rouge_l("", "anything at all") == 0.0


def test_rouge_l_precision_and_recall_differ_by_direction() -> None:
    # answer 2 words inside a 4-word reference: P = 1, R = 1/2, F1 = 2/3 either way round
    assert rouge_l("red apples", "two red apples please") == pytest.approx(2 / 3)
    assert rouge_l("two red apples please", "red apples") == pytest.approx(2 / 3)


def test_rouge_l_stems_words() -> None:
    assert rouge_l("running dogs", "run dog") == 1.0  # Porter stemmer, as DollyEval scores


def test_heavy_repetition_needs_one_4gram_three_times() -> None:
    loop = "1. Eat less, but more, 2. Eat less, but more, 3. Eat less, but more"
    assert repeats_heavily(loop)  # "eat less but more" three times
    twice = "Eat less, but more. Eat less, but more. Then rest."
    assert not repeats_heavily(twice)
    assert not repeats_heavily("a b c")  # shorter than one 4-gram
    assert repeats_heavily("go go go go go go")  # "go go go go" occurs 3 times


def test_distinct_2_counts_distinct_word_bigrams() -> None:
    assert distinct_2("a b a b") == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_2("one two three") == 1.0
    assert distinct_2("alone") is None


def test_summary_means_shares_and_standard_error() -> None:
    scores = [
        answer_scores("the cat sat", "the cat sat"),  # rouge 1, 3 words
        answer_scores("a b a b a b a b a b", "x"),  # rouge 0, loops, 10 words
    ]
    summary = summarize(scores)
    assert summary["rouge_l"] == pytest.approx(0.5)
    assert summary["rouge_l_stderr"] == pytest.approx(0.5)  # sd 0.7071 / sqrt(2)
    assert summary["heavy_repetition"] == 0.5
    assert summary["distinct_2"] == pytest.approx((1 + 2 / 9) / 2)
    assert summary["mean_words"] == 6.5 and summary["answers"] == 2


def test_paired_difference_and_its_noise() -> None:
    diff = paired_difference([0.5, 0.7, 0.3], [0.4, 0.4, 0.4])
    assert diff["mean"] == pytest.approx(0.1)
    assert diff["stderr"] == pytest.approx(standard_error([0.1, 0.3, -0.1]))
    assert math.isnan(standard_error([1.0]))
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])
