"""Adapter updates as bytes: safetensors only, so nothing from a peer is ever unpickled.

The bytes are an adapter's identity (FLock names them by CID, checkpoints record their sha256),
so the same tensors and metadata give the same bytes in every process and on every machine:
safetensors writes its `__metadata__` from a hash map whose order changes from process to
process, so the header is rewritten with the metadata keys sorted. Tensors keep the library's
fixed order (by dtype, then name), whatever order the state dict was built in.

Bytes from a peer are checked by `read_header` before safetensors or any JSON parser sees them,
under hard limits (`MAX_HEADER_BYTES`, `MAX_HEADER_DEPTH`, `MAX_TENSORS`, `MAX_RANK`,
`DTYPES`): the header is parsed by `covey.store.bounded` (so no nesting can overflow the
stack), every entry's dtype, shape and offsets are checked against the data that follows, and
whatever still goes wrong while loading is a DataError, never another exception.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from covey.errors import DataError
from covey.state import State
from covey.store.bounded import loads_json

_HEADER_LENGTH = 8  # little-endian u64 before the JSON header
_ALIGNMENT = 8  # safetensors pads the header with spaces so tensor data starts aligned
_METADATA = "__metadata__"

MAX_HEADER_BYTES = 1 << 20
"""1 MiB. A header costs about 130 bytes per tensor: a rank-16 LoRA of a 7B model on all seven
linear modules of its 32 layers has 448 tensors (about 60 kB), 1,344 when sent int8+topk (values,
scales, indices: about 180 kB); a 70B model's (80 layers) about 450 kB sent int8+topk
(tests/store/test_update_limits.py builds these headers)."""
MAX_HEADER_DEPTH = 3
"""A safetensors header nests exactly three deep: the header, a tensor's entry, its shape."""
MAX_TENSORS = 16_384
"""Over 4x the 3,360 tensors of a 70B model's all-linear LoRA sent int8+topk."""
MAX_RANK = 8
"""Dimensions of one tensor (LoRA matrices have 2)."""
MAX_ELEMENTS = 1 << 40
"""The product of a tensor's nonzero dimensions: bounds an empty tensor's shape, which no byte
count does (torch overflows computing its strides). A nonempty one is bounded by the data."""
DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}  # fmt: skip
"""The safetensors dtypes Covey reads, and their sizes in bytes: adapters are F32, F16 or BF16,
transports add I8, I16 and I32; the float8/float4/complex and unsigned types that safetensors
also knows are refused (not every torch build loads them all)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; its bytes are data[begin:end] after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: the metadata and every tensor's entry, by name."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def serialize_update(state: State, metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of an adapter, the same for the same tensors and metadata everywhere."""
    data = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    size = int.from_bytes(data[:_HEADER_LENGTH], "little")
    header: dict[str, Any] = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + size])
    canonical: dict[str, Any] = {}
    if "__metadata__" in header:
        canonical["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    canonical.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _ALIGNMENT)
    return len(text).to_bytes(_HEADER_LENGTH, "little") + text + data[_HEADER_LENGTH + size :]


def _refuse(problem: str) -> DataError:
    return DataError(f"update is not a valid safetensors file ({problem})")


def read_header(data: bytes) -> Header:
    """The header of safetensors bytes from anyone, checked within the limits above before
    any other parser sees it; DataError naming the problem otherwise."""
    if len(data) < _HEADER_LENGTH:
        raise _refuse(f"{len(data)} bytes, shorter than the {_HEADER_LENGTH}-byte header length")
    size = int.from_bytes(data[:_HEADER_LENGTH], "little")
    if size > MAX_HEADER_BYTES:
        raise _refuse(f"header of {size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}")
    body = len(data) - _HEADER_LENGTH - size
    if body < 0:
        raise _refuse(f"header of {size:,} bytes runs past the end of the data")
    try:
        tree = loads_json(
            data[_HEADER_LENGTH : _HEADER_LENGTH + size],
            what="header",
            max_bytes=MAX_HEADER_BYTES,
            max_depth=MAX_HEADER_DEPTH,
        )
    except DataError as e:
        raise _refuse(str(e)) from None
    if not isinstance(tree, dict):
        raise _refuse(f"the header is a JSON {type(tree).__name__}, not an object")
    metadata = tree.pop(_METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse("malformed __metadata__: it must map names to strings")
    if len(tree) > MAX_TENSORS:
        raise _refuse(f"{len(tree):,} tensors, over the limit of {MAX_TENSORS:,}")
    tensors = {name: _entry(name, value) for name, value in tree.items()}
    _check_layout(tensors, body)
    return Header(metadata, tensors)


def _entry(name: str, value: Any) -> TensorEntry:
    """One tensor's entry, checked: a known dtype, a shape whose bytes are its offsets' span."""
    shown = repr(name[:80])
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(f"tensor {shown}: expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _refuse(
            f"tensor {shown}: dtype {str(dtype)[:20]!r} is not one of {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not _ints(shape):
        raise _refuse(f"tensor {shown}: shape must be a list of at most {MAX_RANK} integers < 2^64")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise _refuse(f"tensor {shown}: shape {shape} is over {MAX_ELEMENTS:,} elements")
    if not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _refuse(f"tensor {shown}: data_offsets must be [begin, end] with begin <= end")
    begin, end = offsets
    if math.prod(shape) * DTYPES[dtype] != end - begin:
        raise _refuse(
            f"tensor {shown}: shape {shape} of {dtype} is {math.prod(shape) * DTYPES[dtype]:,} "
            f"bytes, its data_offsets span {end - begin:,}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _ints(value: Any) -> bool:
    """A list of integers that fit safetensors' u64 (so no message quotes a huge one)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in value
    )


def _check_layout(tensors: dict[str, TensorEntry], body: int) -> None:
    """The tensors' bytes must tile the data after the header exactly, as safetensors
    requires: no gap, no overlap, nothing past the end, nothing left over."""
    at = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != at:
            raise _refuse(
                f"tensor {name[:80]!r}: data starts at byte {entry.begin:,}, expected {at:,}"
                " (the tensors' data must follow one another without gaps or overlaps)"
            )
        at = entry.end
    if at != body:
        raise _refuse(f"the tensors cover {at:,} bytes of data, the file holds {body:,}")


def update_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes ({} when it has none), after `read_header` has
    checked the whole header; DataError if unreadable."""
    return read_header(data).metadata


def deserialize_update(data: bytes) -> State:
    """Parse safetensors bytes; anything else (a pickle, garbage, a header over the limits)
    is refused with a DataError."""
    header = read_header(data)
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError, OverflowError, TypeError) as e:
        # read_header leaves nothing known for these to catch; a safetensors or torch version
        # that reads some corner differently must still give a refusal, not a crash
        raise _refuse(f"{type(e).__name__}: {e}") from None
    if state.keys() != header.tensors.keys():
        raise _refuse("safetensors read other tensors than the header declares")
    return state
