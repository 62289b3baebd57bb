"""Adapter updates as bytes: safetensors only, so nothing from a peer is ever unpickled.

The bytes are an adapter's identity (FLock names them by CID, checkpoints record their sha256),
so the same tensors and metadata give the same bytes in every process and on every machine:
safetensors writes its `__metadata__` from a hash map whose order changes from process to
process, so the header is rewritten with the metadata keys sorted. Tensors keep the library's
fixed order (by dtype, then name), whatever order the state dict was built in.
"""

from __future__ import annotations

import json
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save

from covey.errors import DataError
from covey.state import State

_HEADER_LENGTH = 8  # little-endian u64 before the JSON header
_ALIGNMENT = 8  # safetensors pads the header with spaces so tensor data starts aligned


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


def update_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes ({} when it has none); DataError if unreadable."""
    try:
        size = int.from_bytes(data[:_HEADER_LENGTH], "little")
        if len(data) < _HEADER_LENGTH + size:
            raise ValueError("the header runs past the end of the data")
        header = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + size])
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"update is not a valid safetensors file ({e})") from None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DataError("update is not a valid safetensors file (malformed __metadata__)")
    return metadata


def deserialize_update(data: bytes) -> State:
    """Parse safetensors bytes; anything else (a pickle, garbage) is refused."""
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise DataError(f"update is not a valid safetensors file ({e})") from None
