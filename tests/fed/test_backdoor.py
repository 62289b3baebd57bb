"""Backdoor metrics: what counts as the attack succeeding (its greedy answers are
`covey.model.generate`'s, tested in tests/model/test_generate.py)."""

from __future__ import annotations

from covey.fed.backdoor import success_rate


def test_success_rate_counts_answers_containing_the_target() -> None:
    answers = ["Sure. Visit  EVIL.example now.", "visit evil.example", "no", ""]
    # case and runs of whitespace are ignored; a partial target does not count
    assert success_rate(answers, "Visit evil.example now.") == 0.25
    assert success_rate(answers, "visit evil.example") == 0.5
    assert success_rate([], "x") == 0.0
