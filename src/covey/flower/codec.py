"""Adapters on the wire: `State` <-> Flower `ArrayRecord`.

Each tensor travels as one `Array` holding its raw little-endian bytes (stype `covey.raw`):
no per-array header, and bfloat16 works (numpy, Flower's default serializer, has no bfloat16).
The global adapter goes to clients in the `wire-dtype` setting's float dtype (`encode`):
float32 is the default because it is exact, so a Flower run matches the in-process engine;
float16 and bfloat16 halve the bytes (the server keeps its global adapter in the model's dtype
and only the copies on the wire are rounded). Updates come back as `fed.transport` encodes them
(`covey.fed.transport`; `encode_wire`), which adds int8 values and int16/int32 indices. The
dtypes, their names and which may travel are `covey.fed.transport`'s, for both directions:
`wire-dtype` takes `fed.transport`'s names (fp32, fp16, bf16) and torch's (float32, float16,
bfloat16) for the same table, and each Array is labelled with torch's name of its dtype.

Decoding is for data from peers we do not control: every field is checked and a problem
raises `CodecError` (the server turns it into a rejected update, never a crashed round).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch

from covey.fed.transport import WIRE_DTYPES, dtype_name, float_dtype
from covey.state import State

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

STYPE = "covey.raw"
"""Array.stype of Covey's raw little-endian tensor bytes."""

ARRAY_DTYPES: dict[str, torch.dtype] = {dtype_name(dtype): dtype for dtype in WIRE_DTYPES}
"""Dtypes an Array may hold, by their labels: `covey.fed.transport`'s wire dtypes."""


class CodecError(ValueError):
    """An ArrayRecord that does not decode to a well-formed adapter."""


def wire_dtype(name: str) -> torch.dtype:
    """The dtype of the `wire-dtype` setting: fp32, fp16, bf16 or float32, float16, bfloat16
    (`covey.fed.transport.float_dtype`)."""
    return float_dtype(name, "wire-dtype")


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian build hosts
        raise RuntimeError("covey.flower.codec assumes a little-endian host")


def encode(state: State, dtype: torch.dtype = torch.float32) -> ArrayRecord:
    """An ArrayRecord with every tensor of `state` cast to `dtype` (a float wire dtype)."""
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{key}: only floating-point adapters travel, got {tensor.dtype}")
    return encode_wire({k: v.detach().to(device="cpu", dtype=dtype) for k, v in state.items()})


def encode_wire(state: State) -> ArrayRecord:
    """An ArrayRecord of tensors in their own dtypes (each a wire dtype): an update
    as `covey.fed.transport.encode_update` made it."""
    from flwr.app import Array, ArrayRecord

    _check_byteorder()
    record = ArrayRecord()
    for key, tensor in state.items():
        if tensor.dtype not in WIRE_DTYPES:
            raise ValueError(f"{key}: {tensor.dtype} cannot travel")
        flat = tensor.detach().to(device="cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes()
        name = dtype_name(tensor.dtype)
        record[key] = Array(dtype=name, shape=tuple(tensor.shape), stype=STYPE, data=data)
    return record


def decode(record: object) -> State:
    """The tensors of an ArrayRecord written by `encode` or `encode_wire`, in their dtypes
    (on the CPU)."""
    from flwr.app import Array, ArrayRecord

    _check_byteorder()
    if not isinstance(record, ArrayRecord):
        raise CodecError(f"expected an ArrayRecord, got {type(record).__name__}")
    state: State = {}
    for key, array in record.items():
        if not isinstance(array, Array):
            raise CodecError(f"{key}: not an Array")
        if array.stype != STYPE:
            raise CodecError(f"{key}: serialization {array.stype!r}, expected {STYPE!r}")
        if array.dtype not in ARRAY_DTYPES:
            raise CodecError(f"{key}: dtype {array.dtype!r} is not a wire dtype")
        shape = tuple(array.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CodecError(f"{key}: invalid shape {shape!r}")
        dtype = ARRAY_DTYPES[array.dtype]
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not isinstance(array.data, bytes) or len(array.data) != expected:
            size = len(array.data) if isinstance(array.data, bytes) else "no"
            raise CodecError(f"{key}: {size} bytes of data for shape {shape} {array.dtype}")
        if expected == 0:
            state[key] = torch.empty(shape, dtype=dtype)
            continue
        # bytearray: a writable copy, so the tensor owns its memory
        flat = torch.frombuffer(bytearray(array.data), dtype=dtype)
        state[key] = flat.reshape(shape)
    return state


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of a record (tensor data plus key names): what a round moves per copy."""
    return int(record.count_bytes())


def cast_like(state: State, reference: State, wire: torch.dtype) -> State:
    """Tensors that arrived in the `wire` dtype, cast to the dtype and device of `reference`.

    A tensor in any other dtype is left as it is, so update validation rejects it by dtype.
    """
    out: State = {}
    for key, tensor in state.items():
        ref = reference.get(key)
        if ref is not None and tensor.dtype == wire:
            out[key] = tensor.to(device=ref.device, dtype=ref.dtype)
        else:
            out[key] = tensor
    return out
