"""Adapter updates as bytes: safetensors only, so nothing from a peer is ever unpickled."""

from __future__ import annotations

from safetensors import SafetensorError
from safetensors.torch import load, save

from covey.errors import DataError
from covey.state import State


def serialize_update(state: State, metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of an adapter (deterministic for the same tensors and metadata)."""
    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def deserialize_update(data: bytes) -> State:
    """Parse safetensors bytes; anything else (a pickle, garbage) is refused."""
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise DataError(f"update is not a valid safetensors file ({e})") from None
