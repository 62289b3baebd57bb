"""`covey.fed.client.client_update`, the client half of a round every engine calls, on the
tiny model: it is exactly train → attack → encode, with the error feedback carried over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from covey.data.prompts import Example, tokenize_records
from covey.data.records import load_records
from covey.fed.attacks import attack_update
from covey.fed.client import UpdateAttack, client_update
from covey.fed.transport import Codec, ErrorFeedback, decode_update, encode_update
from covey.state import State


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, client_data_dir: Path, tmp_path_factory: Any) -> dict[str, Any]:
    from covey.model.loading import load_base_model
    from covey.model.lora import adapter_state, wrap_with_lora
    from tests.fed.test_engine import tiny_config

    cfg = tiny_config(tiny_model_dir, client_data_dir, tmp_path_factory.mktemp("client"))
    model, tokenizer = load_base_model(cfg.model)
    torch.manual_seed(0)
    peft = wrap_with_lora(model, cfg.lora)
    records = load_records(client_data_dir / "client_0.jsonl").records
    examples: list[Example] = tokenize_records(records, tokenizer, cfg.prompt)
    return {"cfg": cfg, "model": peft, "pad": tokenizer.pad_token_id,
            "start": adapter_state(peft), "examples": examples}  # fmt: skip


def update(tiny: dict[str, Any], codec: Codec, **kwargs: Any) -> Any:
    return client_update(
        tiny["model"], tiny["pad"], tiny["examples"], tiny["start"], tiny["cfg"].train, 7,
        codec, **kwargs,
    )  # fmt: skip


def same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_honest_update_is_local_training_encoded(tiny: dict[str, Any]) -> None:
    from covey.train.local import train_local

    codec = Codec("int8")
    got = update(tiny, codec)
    trained = train_local(
        tiny["model"], tiny["examples"], tiny["start"], tiny["cfg"].train, 7, tiny["pad"]
    )
    assert same(got.wire, encode_update(trained.state, tiny["start"], codec))
    assert got.num_samples == trained.num_samples == len(tiny["examples"])
    assert got.metrics["train_loss"] == trained.metrics["train_loss"]
    assert not same(decode_update(got.wire, tiny["start"], codec), tiny["start"])


def test_an_attacker_sends_the_attack_of_what_it_trained(tiny: dict[str, Any]) -> None:
    from covey.train.local import train_local

    codec = Codec("fp32")
    got = update(tiny, codec, attack=UpdateAttack("sign_flip", 2.0, 4))
    trained = train_local(
        tiny["model"], tiny["examples"], tiny["start"], tiny["cfg"].train, 7, tiny["pad"]
    ).state
    flipped = attack_update("sign_flip", tiny["start"], trained, 2.0, 7)
    assert same(got.wire, encode_update(flipped, tiny["start"], codec))
    assert "train_loss" in got.metrics  # it trained, as the simulations record


def test_a_free_rider_may_skip_training_and_sends_the_global_adapter(
    tiny: dict[str, Any],
) -> None:
    codec = Codec("fp32")
    free_rider = UpdateAttack("free_rider", 1.0, 4)
    trained = update(tiny, codec, attack=free_rider)
    idle = update(tiny, codec, attack=free_rider, free_rider_trains=False)
    assert same(idle.wire, trained.wire)
    assert same(idle.wire, encode_update(tiny["start"], tiny["start"], codec))
    assert "train_loss" in trained.metrics and idle.metrics == {}
    assert idle.num_samples == len(tiny["examples"])


def test_error_feedback_carries_what_top_k_left_out(tiny: dict[str, Any]) -> None:
    codec = Codec("int8+topk", topk_fraction=0.1)
    feedback = ErrorFeedback()
    first = update(tiny, codec, feedback=feedback)
    assert feedback.residual and any(bool(v.abs().sum() > 0) for v in feedback.residual.values())
    carried = ErrorFeedback(dict(feedback.residual))
    second = update(tiny, codec, feedback=feedback)
    plain = update(tiny, codec)  # same training, nothing carried over
    assert same(first.wire, plain.wire)
    assert not same(second.wire, plain.wire)
    # the second update is the same training plus the first one's residual, encoded
    from covey.train.local import train_local

    trained = train_local(
        tiny["model"], tiny["examples"], tiny["start"], tiny["cfg"].train, 7, tiny["pad"]
    ).state
    assert same(second.wire, encode_update(trained, tiny["start"], codec, carried))
