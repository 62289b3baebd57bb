"""Answer quality against reference responses: ROUGE-L, repetition, length.

- ROUGE-L F1 comes from Google's `rouge-score` library (the `rougeL` scorer with its Porter
  stemmer, as Natural Instructions and MiniLLM's DollyEval score it), never a hand-written LCS,
  so figures compare with published ones.
- Heavy repetition is the loop small models fall into ("eat less, but more, eat more, but
  less, ..."): an answer counts when one word 4-gram occurs 3 or more times in it. Distinct-2
  (Li et al., 2016) is the share of an answer's word bigrams that are distinct.
- Length is in words, so models with different tokenizers compare.

Words here are lower-cased runs of letters and digits: punctuation and case do not make a
repeated phrase look new.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from typing import Any

REPEAT_NGRAM = 4
"""Word n-gram length whose repetition marks an answer as looping."""
REPEAT_TIMES = 3
"""An answer repeats heavily when one `REPEAT_NGRAM`-gram occurs at least this often."""
ROUGE_SETTINGS = "rouge-score rougeL F1, Porter stemmer"
"""How ROUGE-L is computed, recorded next to the figures."""

_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of one answer against its reference (0 when either has no word)."""
    return float(_scorer().score(reference, answer)["rougeL"].fmeasure)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeats_heavily(text: str, n: int = REPEAT_NGRAM, times: int = REPEAT_TIMES) -> bool:
    """Whether one word n-gram occurs at least `times` times in `text`."""
    tokens = words(text)
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= times for count in grams.values())


def distinct_2(text: str) -> float | None:
    """Distinct word bigrams over all word bigrams of `text`; None for fewer than two words."""
    tokens = words(text)
    bigrams = list(pairwise(tokens))
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def answer_scores(answer: str, reference: str) -> dict[str, Any]:
    """One answer's figures: ROUGE-L F1, heavy repetition, distinct-2, length in words."""
    return {
        "rouge_l": rouge_l(answer, reference),
        "heavy_repetition": repeats_heavily(answer),
        "distinct_2": distinct_2(answer),
        "words": len(words(answer)),
    }


def summarize(scores: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over answers (`answer_scores`): ROUGE-L F1 and its standard error, the share of
    heavily repeating answers, distinct-2 (over answers of two words or more), words."""
    if not scores:
        raise ValueError("no answers to summarize")
    count = len(scores)
    rouge = [s["rouge_l"] for s in scores]
    distinct = [s["distinct_2"] for s in scores if s["distinct_2"] is not None]
    return {
        "rouge_l": sum(rouge) / count,
        "rouge_l_stderr": standard_error(rouge),
        "heavy_repetition": sum(bool(s["heavy_repetition"]) for s in scores) / count,
        "distinct_2": sum(distinct) / len(distinct) if distinct else math.nan,
        "mean_words": sum(s["words"] for s in scores) / count,
        "answers": float(count),
    }


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); NaN below 2 values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(model: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Mean of `model - base` over the same records, and its standard error: whether a gain is
    larger than the noise of which records happened to be held out."""
    if len(model) != len(base):
        raise ValueError(f"paired scores differ in length: {len(model)} vs {len(base)}")
    diffs = [m - b for m, b in zip(model, base, strict=True)]
    return {"mean": sum(diffs) / len(diffs), "stderr": standard_error(diffs)}
