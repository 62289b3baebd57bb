"""Adapters <-> ArrayRecord: exact in float32, compact in float16/bfloat16, strict on decode."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from covey.errors import ConfigError
from covey.flower.codec import (
    STYPE,
    CodecError,
    cast_like,
    decode,
    encode,
    record_bytes,
    wire_dtype,
)


def lora_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    return {
        f"{prefix}.q_proj.lora_A.weight": torch.randn(4, 32),
        f"{prefix}.q_proj.lora_B.weight": torch.randn(32, 4) * 1e-3,
        f"{prefix}.v_proj.lora_A.weight": torch.randn(4, 32),
        f"{prefix}.v_proj.lora_B.weight": torch.zeros(16, 4),
    }


def through_the_wire(record: ArrayRecord) -> ArrayRecord:
    """Serialize and rebuild a record the way Flower ships it (deflated objects by id)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    rebuilt = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(rebuilt, ArrayRecord)
    return rebuilt


def test_float32_round_trip_is_exact_through_flower_serialization() -> None:
    state = lora_state()
    decoded = decode(through_the_wire(encode(state)))
    assert decoded.keys() == state.keys()
    for key, tensor in state.items():
        assert decoded[key].dtype == torch.float32
        assert torch.equal(decoded[key], tensor)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "fp16", "bf16"])
def test_half_precision_halves_the_bytes_within_rounding(name: str) -> None:
    state = lora_state()
    wide, narrow = encode(state), encode(state, wire_dtype(name))
    payload = sum(t.numel() for t in state.values())
    keys = sum(len(k) for k in state)
    assert record_bytes(wide) == 4 * payload + keys
    assert record_bytes(narrow) == 2 * payload + keys
    decoded = decode(through_the_wire(narrow))
    tolerance = 1e-2 if "b" in name else 1e-3  # bfloat16 keeps 8 mantissa bits, float16 11
    for key, tensor in state.items():
        assert decoded[key].dtype == wire_dtype(name)
        torch.testing.assert_close(decoded[key].float(), tensor, rtol=tolerance, atol=1e-6)


def test_cast_like_restores_the_reference_dtype_only_for_the_wire_dtype() -> None:
    state = lora_state()
    decoded = decode(encode(state, torch.bfloat16))
    decoded["extra"] = torch.ones(2, dtype=torch.float64)
    cast = cast_like(decoded, state, torch.bfloat16)
    assert all(cast[k].dtype == torch.float32 for k in state)
    assert cast["extra"].dtype == torch.float64  # left for validation to reject


def test_wire_dtype_names() -> None:
    assert wire_dtype("FP32") is torch.float32
    assert wire_dtype(" bfloat16 ") is torch.bfloat16
    with pytest.raises(ConfigError, match="wire-dtype 'int8'"):
        wire_dtype("int8")


def test_only_floating_point_tensors_are_encoded() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        encode({"x": torch.arange(3)})


def test_empty_tensors_survive() -> None:
    decoded = decode(encode({"x": torch.zeros(0, 3)}))
    assert decoded["x"].shape == (0, 3)


def raw(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = STYPE) -> ArrayRecord:
    record = ArrayRecord()
    record["w"] = Array(dtype=dtype, shape=shape, stype=stype, data=data)
    return record


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (raw("float32", (2,), b"\0" * 7), "7 bytes of data for shape"),
        (raw("float32", (2,), b"\0" * 16), "16 bytes"),
        (raw("int64", (1,), b"\0" * 8), "not a wire dtype"),
        (raw("object", (1,), b"\0" * 8), "not a wire dtype"),
        (raw("float32", (-1,), b""), "invalid shape"),
        (raw("float32", (2,), b"\0" * 8, stype="numpy.ndarray"), "serialization"),
    ],
)
def test_malformed_records_raise_codec_errors(record: ArrayRecord, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(record)


def test_decode_wants_an_array_record() -> None:
    with pytest.raises(CodecError, match="expected an ArrayRecord"):
        decode({"w": torch.zeros(1)})


def test_decoded_tensors_own_writable_memory() -> None:
    decoded = decode(encode({"w": torch.ones(3)}))
    decoded["w"].add_(1)  # would fail (or warn) on a read-only buffer
    assert decoded["w"].tolist() == [2.0, 2.0, 2.0]
