"""Backdoor metrics: what counts as the attack succeeding, and batched greedy answers."""

from __future__ import annotations

from pathlib import Path

from covey.data.records import load_records
from covey.fed.backdoor import greedy_answers, success_rate


def test_success_rate_counts_answers_containing_the_target() -> None:
    answers = ["Sure. Visit  EVIL.example now.", "visit evil.example", "no", ""]
    # case and runs of whitespace are ignored; a partial target does not count
    assert success_rate(answers, "Visit evil.example now.") == 0.25
    assert success_rate(answers, "visit evil.example") == 0.5
    assert success_rate([], "x") == 0.0


def test_greedy_answers_batched_as_one_at_a_time(
    tiny_model_dir: Path, client_data_dir: Path
) -> None:
    """Left padding leaves each prompt's greedy answer as it is alone (the tokenizer's padding
    side is restored)."""
    from covey.config import LoraSettings, ModelConfig
    from covey.model.loading import load_base_model
    from covey.model.lora import wrap_with_lora

    model, tokenizer = load_base_model(ModelConfig(base=str(tiny_model_dir)))
    model = wrap_with_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    records = load_records(client_data_dir / "test.jsonl").records[:5]
    side = tokenizer.padding_side
    batched = greedy_answers(model, tokenizer, records, "chat", 6, batch_size=5)
    single = [greedy_answers(model, tokenizer, [r], "chat", 6, batch_size=1)[0] for r in records]
    assert batched == single and len(batched) == 5
    assert tokenizer.padding_side == side
