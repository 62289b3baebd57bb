"""The update codec on tiny tensors: int8 error bounds by hand, top-k, error feedback, bytes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from covey.config import FedConfig, load_recipe
from covey.errors import ConfigError, DataError
from covey.fed.engine import FEEDBACK_FILE
from covey.fed.transport import (
    FLOAT_DTYPES,
    INDEX,
    SCALE,
    WIRE_DTYPES,
    Codec,
    ErrorFeedback,
    TransportError,
    decode_update,
    dtype_name,
    encode_update,
    float_dtype,
)
from covey.state import State
from covey.store.updates import serialize_update

INT8 = Codec("int8")
TOPK = Codec("int8+topk", topk_fraction=0.25)


def zeros_like(state: State) -> State:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_int8_scales_per_row_and_rounds_to_the_grid_by_hand() -> None:
    reference = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    update = {
        "a": torch.tensor([[1.27, -0.5, 0.004], [0.0, 0.0, 0.0]]),
        "b": torch.tensor([-2.54, 1.0, 0.0, 0.011]),
    }
    wire = encode_update(update, reference, INT8)
    # row scales: max |row| / 127, so 1.27 -> 0.01 and the zero row -> 0; b: one scale, 0.02
    torch.testing.assert_close(wire["a" + SCALE], torch.tensor([0.01, 0.0]))
    torch.testing.assert_close(wire["b" + SCALE], torch.tensor([0.02]))
    assert wire["a"].dtype == torch.int8
    assert wire["a"].tolist() == [[127, -50, 0], [0, 0, 0]]
    assert wire["b"].tolist() == [-127, 50, 0, 1]  # 0.011 / 0.02 = 0.55 -> 1
    decoded = decode_update(wire, reference, INT8)
    torch.testing.assert_close(decoded["a"], torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(decoded["b"], torch.tensor([-2.54, 1.0, 0.0, 0.02]))


def test_int8_error_is_at_most_half_a_row_scale_on_the_delta() -> None:
    torch.manual_seed(0)
    reference = {"w": torch.randn(16, 24) * 3}  # large weights: only the delta is quantized
    delta = torch.randn(16, 24) * torch.logspace(-4, 0, 16).unsqueeze(1)
    wire = encode_update({"w": reference["w"] + delta}, reference, INT8)
    error = (decode_update(wire, reference, INT8)["w"] - reference["w"] - delta).abs()
    half_scale = delta.abs().amax(dim=1, keepdim=True) / 127 / 2
    assert bool((error <= half_scale + 1e-6 * reference["w"].abs()).all())
    assert float(error.max()) > 0  # the bound is reached, not trivially zero


@pytest.mark.parametrize(("transport", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
def test_float_transports_carry_the_weights_cast(transport: str, dtype: torch.dtype) -> None:
    codec = Codec(transport)  # type: ignore[arg-type]
    reference = {"w": torch.zeros(2, 2)}
    update = {"w": torch.tensor([[1.0, 1 / 3], [2.0, -1e-3]])}
    wire = encode_update(update, reference, codec)
    assert wire["w"].dtype == dtype and set(wire) == {"w"}
    decoded = decode_update(wire, reference, codec)
    assert decoded["w"].dtype == torch.float32
    torch.testing.assert_close(decoded["w"], update["w"].to(dtype).float(), rtol=0, atol=0)


def test_one_dtype_table_under_both_spellings() -> None:
    """`fed.transport`'s names and torch's name the same dtypes (Flower's `wire-dtype` takes
    either); nothing else is a float transport, and every dtype an encoding makes may travel."""
    for short, long in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")):
        assert float_dtype(short, "x") is float_dtype(long.upper(), "x") is FLOAT_DTYPES[short]
        assert dtype_name(FLOAT_DTYPES[short]) == long
    assert float_dtype(" Bf16 ", "x") is torch.bfloat16
    for bad in ("int8", "int8+topk", "fp8", "float64", ""):
        expected = re.escape(f"wire-dtype {bad!r}: expected one of fp32, fp16, bf16")
        with pytest.raises(ConfigError, match=expected):
            float_dtype(bad, "wire-dtype")
    made = {
        t.dtype
        for transport in ("fp32", "fp16", "bf16", "int8", "int8+topk")
        for t in encode_update({"w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)},
                               Codec(transport)).values()  # type: ignore[arg-type]
    } | {Codec.index_dtype(2**15 + 1)}  # fmt: skip
    assert made == set(WIRE_DTYPES)
    assert [dtype_name(d) for d in WIRE_DTYPES[3:]] == ["int8", "int16", "int32"]
    with pytest.raises(ValueError, match="cannot travel"):
        dtype_name(torch.float64)


def test_topk_keeps_exactly_k_of_the_largest_with_ties_to_the_lower_index() -> None:
    reference = {"w": torch.zeros(2, 4)}
    values = torch.tensor([[0.1, -0.9, 0.3, 0.3], [0.0, 0.5, -0.3, 0.2]])
    wire = encode_update({"w": values}, reference, TOPK)  # 25% of 8 entries: k = 2
    assert wire["w" + INDEX].tolist() == [1, 5] and wire["w" + INDEX].dtype == torch.int16
    decoded = decode_update(wire, reference, TOPK)["w"]
    assert int((decoded != 0).sum()) == 2
    torch.testing.assert_close(decoded[0, 1], torch.tensor(-0.9))
    # three equal magnitudes compete for k = 3 of 12: the lowest indices win
    ties = Codec("int8+topk", topk_fraction=0.25)
    wire = encode_update({"v": torch.tensor([0.0, 0.3, -0.3] * 4)}, {"v": torch.zeros(12)}, ties)
    assert wire["v" + INDEX].tolist() == [1, 2, 4]


def test_topk_indices_widen_to_int32_past_int16() -> None:
    codec = Codec("int8+topk", topk_fraction=1e-5)  # k = 1
    reference = {"w": torch.zeros(2**15 + 1)}
    update = {"w": torch.zeros(2**15 + 1)}
    update["w"][-1] = 1.0
    wire = encode_update(update, reference, codec)
    assert wire["w" + INDEX].dtype == torch.int32 and wire["w" + INDEX].tolist() == [2**15]
    assert float(decode_update(wire, reference, codec)["w"][-1]) == 1.0


def test_topk_keeps_at_least_one_entry_and_at_most_all() -> None:
    assert Codec("int8+topk", topk_fraction=0.01).kept(10) == 1
    assert Codec("int8+topk", topk_fraction=1.0).kept(10) == 10
    assert Codec("int8+topk", topk_fraction=0.1).kept(0) == 0


def test_error_feedback_sends_the_residual_later() -> None:
    """The sum of what is sent converges to the sum of the true deltas: the gap is the residual,
    which stays bounded, so the average gap per round falls as 1/rounds."""
    torch.manual_seed(1)
    reference = {"a": torch.randn(8, 6), "b": torch.randn(5)}
    codec = Codec("int8+topk", topk_fraction=0.1)
    feedback = ErrorFeedback()
    true_sum, sent_sum = zeros_like(reference), zeros_like(reference)
    gaps = []
    for _ in range(60):
        delta = {k: torch.randn_like(v) * 0.01 for k, v in reference.items()}
        update = {k: reference[k] + delta[k] for k in reference}
        sent = decode_update(encode_update(update, reference, codec, feedback), reference, codec)
        for k in reference:
            true_sum[k] += delta[k]
            sent_sum[k] += sent[k] - reference[k]
        gap = {k: true_sum[k] - sent_sum[k] for k in reference}
        for k in reference:  # exactly what the client still holds back
            torch.testing.assert_close(gap[k], feedback.residual[k], atol=1e-5, rtol=0)
        gaps.append(max(float(g.abs().max()) for g in gap.values()))
    # the held-back part stays bounded (no drift), while the true sum keeps growing
    assert max(gaps[40:]) < 2 * max(gaps[10:30])
    # without feedback the dropped entries are lost: the gap grows like the sum itself
    lossy_true, lossy_sum = zeros_like(reference), zeros_like(reference)
    for _ in range(60):
        delta = {k: torch.randn_like(v) * 0.01 for k, v in reference.items()}
        update = {k: reference[k] + delta[k] for k in reference}
        sent = decode_update(encode_update(update, reference, codec), reference, codec)
        for k in reference:
            lossy_true[k] += delta[k]
            lossy_sum[k] += sent[k] - reference[k]
    lossy_gap = max(float((lossy_true[k] - lossy_sum[k]).abs().max()) for k in reference)
    assert gaps[-1] < lossy_gap / 2


def test_error_feedback_residual_round_trips_through_safetensors() -> None:
    feedback = ErrorFeedback({"w": torch.tensor([[0.5, -1e-7]]), "b": torch.tensor([3.0])})
    data = feedback.to_bytes()
    assert data[:1] != b"\x80"  # not a pickle
    restored = ErrorFeedback.from_bytes(data, "client_0.safetensors")
    assert restored.residual.keys() == feedback.residual.keys()
    for k, v in feedback.residual.items():
        torch.testing.assert_close(restored.residual[k], v, rtol=0, atol=0)
    with pytest.raises(DataError, match=r"client_0\.safetensors: unreadable error-feedback"):
        ErrorFeedback.from_bytes(b"garbage", "client_0.safetensors")


@pytest.mark.parametrize("transport", ["fp32", "fp16", "bf16", "int8", "int8+topk"])
def test_the_same_update_gives_the_same_bytes(transport: str) -> None:
    torch.manual_seed(2)
    reference = {"x.lora_A.weight": torch.randn(4, 8), "x.lora_B.weight": torch.randn(8, 4)}
    update = {k: v + torch.randn_like(v) * 0.01 for k, v in reference.items()}
    codec = Codec(transport)  # type: ignore[arg-type]
    first = serialize_update(encode_update(update, reference, codec))
    shuffled = dict(reversed(list(update.items())))  # built in another order
    copy = {k: v.clone() for k, v in reference.items()}
    again = serialize_update(encode_update(shuffled, copy, codec))
    assert first == again


def wire_of(codec: Codec) -> tuple[State, State]:
    reference = {"w": torch.zeros(4, 4)}
    update = {"w": torch.arange(16.0).reshape(4, 4) / 100}
    return encode_update(update, reference, codec), reference


@pytest.mark.parametrize(
    ("codec", "corrupt", "message"),
    [
        (INT8, lambda w: w.pop("w" + SCALE), r"w:scale: missing from the update"),
        (INT8, lambda w: w.update(w=w["w"].float()), r"w: dtype torch.float32, expected .*int8"),
        (INT8, lambda w: w.update(w=w["w"][:2]), r"w: shape \(2, 4\), expected \(4, 4\)"),
        (INT8, lambda w: w.update({"w:scale": w["w:scale"][:1]}), r"w:scale: shape \(1,\)"),
        (INT8, lambda w: w.update({"w:scale": -w["w:scale"]}), "finite and >= 0"),
        (INT8, lambda w: w.update(extra=torch.zeros(1)), "extra: not a tensor of the adapter"),
        (TOPK, lambda w: w.pop("w" + INDEX), r"w:index: missing"),
        (TOPK, lambda w: w.update({"w:index": w["w:index"].flip(0)}), "indices must rise"),
        (TOPK, lambda w: w.update({"w:index": w["w:index"] + 100}), r"within 0\.\.15"),
        (TOPK, lambda w: w.update({"w:index": w["w:index"].long()}), "expected torch.int16"),
        (Codec("fp16"), lambda w: w.update(w=w["w"].float()), "expected torch.float16"),
    ],
)
def test_a_malformed_wire_state_gets_a_clear_error(codec: Codec, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    wire, reference = wire_of(codec)
    corrupt(wire)
    with pytest.raises(TransportError, match=message):
        decode_update(wire, reference, codec)


def test_transport_settings_are_checked_at_load() -> None:
    cfg = load_recipe(None, ["fed.transport='int8+topk'", "fed.topk_fraction=0.05"])
    assert Codec.of(cfg.fed) == Codec("int8+topk", 0.05)
    with pytest.raises(ConfigError, match=r"fed\.transport = 'int4' is not one of"):
        load_recipe(None, ["fed.transport='int4'"])
    with pytest.raises(ConfigError, match=r"--set fed\.topk_fraction=0: fed\.topk_fraction must"):
        load_recipe(None, ["fed.topk_fraction=0"])
    assert FedConfig().transport == "fp32"


def test_a_flock_blob_names_its_transport_and_the_adapter_it_was_made_from() -> None:
    from covey.flock.ledger import read_update, update_bytes

    reference = {"w": torch.zeros(4, 4)}
    task = "0x00000000000000000000000000000000000000aa"
    update = {"w": torch.arange(16.0).reshape(4, 4) / 100}
    blob = update_bytes(update, reference, "bafkreiglobal", INT8, task=task, round_=0)
    assert blob == update_bytes(dict(update), reference, "bafkreiglobal", INT8, task=task, round_=0)
    decoded = read_update(blob, reference, "bafkreiglobal", INT8, task=task, round_=0)
    torch.testing.assert_close(decoded["w"], update["w"], atol=0.15 / 127 / 2, rtol=0)
    with pytest.raises(DataError, match="made from global adapter bafkreiglobal, not the round"):
        read_update(blob, reference, "bafkreiother", INT8, task=task, round_=0)
    with pytest.raises(DataError, match=r"encoded as 'int8', the task's fed\.transport is 'fp32'"):
        read_update(blob, reference, "bafkreiglobal", Codec("fp32"), task=task, round_=0)
    with pytest.raises(DataError, match="format None"):
        read_update(serialize_update(update), reference, "bafkreiglobal", INT8, task=task, round_=0)
    with pytest.raises(DataError, match="not a valid safetensors"):
        read_update(b"\xff" * 16, reference, "bafkreiglobal", INT8, task=task, round_=0)


def test_a_resumed_engine_run_keeps_each_clients_residual(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """Round 1's residuals are saved with it, so stopping after round 1 and resuming gives the
    uninterrupted run's adapter (a residual lost on resume would change round 2's updates)."""
    from tests.fed.test_engine import run, tiny_config

    sets = ("fed.transport='int8+topk'", "fed.topk_fraction=0.2")
    whole = run(tiny_config(tiny_model_dir, client_data_dir, tmp_path / "a", "fed.rounds=2", *sets))
    run(tiny_config(tiny_model_dir, client_data_dir, tmp_path / "b", "fed.rounds=1", *sets))
    resumed = run(
        tiny_config(tiny_model_dir, client_data_dir, tmp_path / "b", "fed.rounds=2", *sets),
        resume=True,
    )
    assert resumed.records[2]["adapter_sha256"] == whole.records[2]["adapter_sha256"]
    saved = load_file(tmp_path / "b" / "round_001" / FEEDBACK_FILE)
    assert {name.split("/")[0] for name in saved} == {"client_0", "client_1", "client_2"}
    assert any(bool(t.abs().sum() > 0) for t in saved.values())
    assert whole.records[2]["traffic"]["transport"] == "int8+topk"
