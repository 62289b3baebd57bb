"""The limits on a peer's safetensors bytes (`covey.store.updates.read_header`): each one refuses
with a DataError that names the problem, and honest adapters, even large ones, stay far inside
them. (Every hostile blob through every read path, in a process with web3's recursion limit:
tests/test_hostile_bytes.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch

from covey.errors import DataError
from covey.fed.transport import INDEX, SCALE
from covey.store.updates import (
    DTYPES,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    deserialize_update,
    read_header,
    serialize_update,
    update_metadata,
)
from tests.hostile_bytes import entry, safetensors_bytes

STATE = {"a.lora_A.weight": torch.randn(4, 2), "a.lora_B.weight": torch.zeros(2, 4)}


def test_an_honest_update_reads_back_with_its_header() -> None:
    data = serialize_update(STATE, {"round": "3"})
    header = read_header(data)
    assert header.metadata == {"round": "3"} == update_metadata(data)
    assert {k: e.shape for k, e in header.tensors.items()} == {
        k: (4, 2) if "A" in k else (2, 4) for k in STATE
    }
    back = deserialize_update(data)
    assert all(torch.equal(back[k], STATE[k]) for k in STATE)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.float64, torch.uint8, torch.bool],
)  # fmt: skip
def test_every_dtype_covey_exchanges_reads(dtype: torch.dtype) -> None:
    data = serialize_update({"t": torch.ones(3, 2).to(dtype)})
    assert deserialize_update(data)["t"].dtype == dtype


MODULES = [("self_attn", m) for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", m) for m in ("gate_proj", "up_proj", "down_proj")
]


def lora_header(layers: int, rank: int, hidden: int, sparse: bool) -> bytes:
    """The header of a LoRA adapter on all seven linear modules of a Llama-shaped model, with
    PEFT's tensor names, sent as fp32 weights or int8+topk (values, indices, one scale per
    matrix): its size is what MAX_HEADER_BYTES must allow."""
    metadata = {"format": "covey-flock-update/2", "transport": "int8+topk", "reference": "b" * 59}
    header: dict[str, object] = {"__metadata__": metadata}
    at = 0
    for layer in range(layers):
        for block, module in MODULES:
            for matrix in "AB":
                key = f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{matrix}.weight"
                kept = rank * hidden // 10
                parts = [(key, "F32", [rank, hidden] if matrix == "A" else [hidden, rank])]
                if sparse:
                    parts = [(key, "I8", [kept]), (key + INDEX, "I32", [kept]),
                             (key + SCALE, "F32", [1])]  # fmt: skip
                for name, dtype, dims in parts:
                    size = DTYPES[dtype] * dims[0] * (dims[1] if len(dims) > 1 else 1)
                    header[name] = entry(dtype, dims, at, at + size)
                    at += size
    return json.dumps(header, separators=(",", ":")).encode()


def test_the_header_limits_leave_room_for_the_largest_honest_adapters() -> None:
    seven_b = lora_header(layers=32, rank=16, hidden=4096, sparse=False)
    seventy_b = lora_header(layers=80, rank=16, hidden=8192, sparse=True)
    assert len(seven_b) < 100_000  # the figure for a 7B all-linear LoRA
    assert len(seventy_b) < MAX_HEADER_BYTES / 2  # 70B, int8+topk: 3,360 tensors
    assert len(json.loads(seventy_b)) - 1 < MAX_TENSORS / 4


def padded(header: dict[str, object], size: int, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return safetensors_bytes(text + b" " * (size - len(text)), body)


def test_the_header_size_limit_is_exact() -> None:
    header = {"__metadata__": {"k": "v"}, "t": entry("F32", [1], 0, 4)}
    assert update_metadata(padded(header, MAX_HEADER_BYTES, b"\0" * 4)) == {"k": "v"}
    assert deserialize_update(padded(header, MAX_HEADER_BYTES, b"\0" * 4))["t"].shape == (1,)
    with pytest.raises(DataError, match="header of 1,048,577 bytes, over the limit of 1,048,576"):
        update_metadata(padded(header, MAX_HEADER_BYTES + 1, b"\0" * 4))


def test_the_tensor_count_limit_is_exact() -> None:
    def empties(count: int) -> bytes:
        return safetensors_bytes({f"{i:x}": entry("U8", [0], 0, 0) for i in range(count)})

    assert len(deserialize_update(empties(MAX_TENSORS))) == MAX_TENSORS
    with pytest.raises(DataError, match="16,385 tensors, over the limit of 16,384"):
        update_metadata(empties(MAX_TENSORS + 1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "0 bytes, shorter than the 8-byte header length"),
        (safetensors_bytes("[" * 100_000), "header: nested deeper than 3 levels"),
        (safetensors_bytes({}, length=2**64 - 1), "over the limit of 1,048,576"),
        (safetensors_bytes({}, length=500), "header of 500 bytes runs past the end"),
        (safetensors_bytes(b'{"\xff":1}'), "header: not UTF-8 text"),
        (safetensors_bytes('{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}'),
         "NaN is not a JSON number"),
        (safetensors_bytes('{"t":1,"t":2}'), "key 't' appears twice"),
        (safetensors_bytes([]), "the header is a JSON list, not an object"),
        (safetensors_bytes({"__metadata__": {"k": 1}}), "malformed __metadata__"),
        (safetensors_bytes({"t": entry("F4", [2], 0, 1)}, b"\0"), "dtype 'F4' is not one of"),
        (safetensors_bytes({"t": entry("U8", [1] * 9, 0, 1)}, b"\0"),
         "shape must be a list of at most 8 integers < 2\\^64"),
        (safetensors_bytes({"t": entry("U8", [-1], 0, 0)}), "shape must be a list of at most"),
        (safetensors_bytes({"t": entry("U8", [0, 2**62, 2**62], 0, 0)}),
         "is over 1,099,511,627,776 elements"),
        (safetensors_bytes({"t": entry("F32", [3], 0, 4)}, b"\0" * 4),
         "shape \\[3\\] of F32 is 12 bytes, its data_offsets span 4"),
        (safetensors_bytes({"t": entry("F32", [4], 0, 16)}, b"\0" * 8),
         "the tensors cover 16 bytes of data, the file holds 8"),
        (safetensors_bytes({"t": entry("F32", [1], 4, 8)}, b"\0" * 8),
         "data starts at byte 4, expected 0"),
        (safetensors_bytes({"t": entry("U8", [1], 0, 1), "u": entry("U8", [1], 0, 1)}, b"\0"),
         "data starts at byte 0, expected 1"),
        (safetensors_bytes({"t": {**entry("U8", [1], 0, 1), "x": 1}}, b"\0"),
         "expected exactly dtype, shape and data_offsets"),
    ],
)  # fmt: skip
def test_each_limit_names_the_problem(data: bytes, message: str) -> None:
    for read in (update_metadata, deserialize_update):
        with pytest.raises(DataError, match="^update is not a valid safetensors file .*" + message):
            read(data)


def test_errors_quote_at_most_a_little_of_a_hostile_name() -> None:
    name = "x" * 10_000
    with pytest.raises(DataError) as info:
        update_metadata(safetensors_bytes({name: entry("Q", [1], 0, 1)}, b"\0"))
    assert len(str(info.value)) < 400
    assert re.search("x{80}", str(info.value)) and not re.search("x{81}", str(info.value))
