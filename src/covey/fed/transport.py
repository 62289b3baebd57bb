"""How an update travels: `fed.transport`, the same encoding on every engine.

An update leaves a client as a flat dict of tensors (the *wire state*), which Flower carries as
an ArrayRecord (`covey.flower.codec`) and FLock as a safetensors blob (`covey.store.updates`):

- `fp32`, `fp16`, `bf16`: the trained adapter's weights, cast (fp32 is exact). A receiver
  needs nothing else.
- `int8`: the *delta* from the round's global adapter (the reference), symmetric int8 with one
  float32 scale per output row of each 2-D tensor (per tensor for 1-D): `KEY` (int8, the
  tensor's shape) and `KEY:scale`. Deltas are small and similar in size along a row, so the
  grid is fine where weights (LoRA A's random rows) would not be; each element is off by at
  most half its row's scale.
- `int8+topk`: the `fed.topk_fraction` largest-magnitude entries of each tensor's delta:
  `KEY:index` (flat indices, ascending: int16 for tensors of at most 32,768 entries, which
  covers LoRA matrices up to hidden size 4,096 at r=8, else int32), `KEY` (int8 values) and
  `KEY:scale` (one float32 per tensor: the kept entries are the tensor's largest, so their
  range is narrow, and a scale per row would weigh more than the values on LoRA's B rows of r
  entries). What is not sent stays with the client (`ErrorFeedback`) and is added to its next
  delta, so nothing is lost, only delayed (Stich et al., "Sparsified SGD with Memory",
  NeurIPS 2018).

A receiver decodes against the same reference (the global adapter the round trained from), so
shapes and counts travel implicitly and are checked against it: a malformed wire state raises
`TransportError`, naming the tensor, which every engine turns into a rejected update.
Encoding is deterministic (ties in top-k go to the lower index), so the same update gives the
same bytes, and so the same FLock CID, everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from covey.config import FedConfig, Transport
from covey.errors import ConfigError, DataError
from covey.state import State

SCALE = ":scale"
"""Suffix of a tensor's int8 scales in a wire state."""
INDEX = ":index"
"""Suffix of a tensor's top-k flat indices in a wire state."""
INT8_MAX = 127

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""The float dtypes an adapter travels in, by `fed.transport`'s names: updates on the way up,
and on Flower the global adapter on the way down (its `wire-dtype` setting, `float_dtype`)."""
TORCH_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
"""torch's names of the float dtypes, accepted for the same dtypes where a setting names one."""
WIRE_DTYPES: tuple[torch.dtype, ...] = (
    *FLOAT_DTYPES.values(),
    torch.int8,
    torch.int16,
    torch.int32,
)
"""Every dtype a tensor may have on the wire: the float dtypes (float32 also for int8 scales),
int8 values, int16/int32 top-k indices (`Codec.index_dtype`)."""


def float_dtype(name: str, setting: str) -> torch.dtype:
    """The float dtype called `name` (fp32, fp16, bf16, or torch's float32, float16, bfloat16;
    any case, spaces around ignored); a ConfigError naming `setting` for anything else."""
    key = name.strip().lower()
    key = TORCH_NAMES.get(key, key)
    if key not in FLOAT_DTYPES:
        raise ConfigError(
            f"{setting} {name!r}: expected one of {', '.join(FLOAT_DTYPES)} "
            f"(or {', '.join(TORCH_NAMES)})"
        )
    return FLOAT_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a wire dtype (`float32`, `bfloat16`, `int8`...): how a tensor's dtype is
    labelled in transit (Flower's `Array.dtype`) and in round records."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"{dtype} cannot travel")
    return str(dtype).removeprefix("torch.")


class TransportError(DataError):
    """A wire state that does not decode against the reference adapter."""


@dataclass(frozen=True)
class Codec:
    """`fed.transport` and `fed.topk_fraction`: how updates are encoded and decoded."""

    transport: Transport = "fp32"
    topk_fraction: float = 0.1

    @classmethod
    def of(cls, fed: FedConfig) -> Codec:
        return cls(fed.transport, fed.topk_fraction)

    @property
    def sends_delta(self) -> bool:
        """True when the wire holds the delta from the reference (int8 transports)."""
        return self.transport not in FLOAT_DTYPES

    @property
    def sparse(self) -> bool:
        return self.transport == "int8+topk"

    @staticmethod
    def index_dtype(numel: int) -> torch.dtype:
        """The narrowest signed dtype that holds every flat index of `numel` entries."""
        return torch.int16 if numel <= 2**15 else torch.int32

    def kept(self, numel: int) -> int:
        """Entries top-k keeps of a tensor of `numel` entries: at least one (of a non-empty one)."""
        return min(numel, max(1, math.ceil(self.topk_fraction * numel)))


# ---------------------------------------------------------------- encoding


def encode_update(
    update: State, reference: State, codec: Codec, feedback: ErrorFeedback | None = None
) -> State:
    """The wire state of a trained adapter `update` that started from `reference`.

    With `feedback`, the client's unsent residual is added to the delta first and the new
    residual (what this encoding leaves out) is kept in it; without, nothing is carried over.
    """
    if not codec.sends_delta:
        dtype = FLOAT_DTYPES[codec.transport]
        return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in update.items()}
    delta = {
        k: v.detach().to(device="cpu", dtype=torch.float32) - _reference(reference, k)
        for k, v in update.items()
    }
    if feedback is not None:
        delta = feedback.add_residual(delta)
    wire: State = {}
    for key, tensor in delta.items():
        wire |= _encode_sparse(key, tensor, codec) if codec.sparse else _encode_dense(key, tensor)
    if feedback is not None:
        sent = _decode_delta(wire, delta, codec)
        feedback.residual = {k: delta[k] - sent[k] for k in delta}
    return wire


def _reference(reference: State, key: str) -> torch.Tensor:
    if key not in reference:
        raise ValueError(f"{key}: not in the reference adapter (the update has another layout)")
    return reference[key].detach().to(device="cpu", dtype=torch.float32)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as (output rows, rest); a 1-D (or 0-D) tensor is one row."""
    return tensor.reshape(tensor.shape[0] if tensor.dim() >= 2 else 1, -1)


def _quantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 of `values` (rows) on the grid of `scale` (one per row); a zero scale gives 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    return torch.round(values / safe).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _encode_dense(key: str, delta: torch.Tensor) -> State:
    rows = _rows(delta)
    scale = rows.abs().amax(dim=1) / INT8_MAX if rows.numel() else torch.zeros(rows.shape[0])
    return {
        key: _quantize(rows, scale).reshape(delta.shape).contiguous(),
        key + SCALE: scale.to(torch.float32).contiguous(),
    }


def _encode_sparse(key: str, delta: torch.Tensor, codec: Codec) -> State:
    flat = delta.reshape(-1)
    k = codec.kept(flat.numel())
    # stable: equal magnitudes keep the lower index, so the bytes do not depend on the kernel
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    index = torch.sort(order).values
    values = flat[index]
    scale = values.abs().amax().reshape(1) / INT8_MAX if k else torch.zeros(1)
    return {
        key: _quantize(values.reshape(1, -1), scale).reshape(-1).contiguous(),
        key + INDEX: index.to(codec.index_dtype(flat.numel())).contiguous(),
        key + SCALE: scale.to(torch.float32).contiguous(),
    }


# ---------------------------------------------------------------- decoding


def decode_update(wire: State, reference: State, codec: Codec) -> State:
    """The adapter a wire state stands for, in `reference`'s dtypes and on its devices.

    Checks every tensor against `reference` and `codec`; `TransportError` names the problem.
    """
    if not codec.sends_delta:
        dtype = FLOAT_DTYPES[codec.transport]
        _check_keys(wire, {k: k for k in reference})
        for key, tensor in wire.items():
            _expect(key, tensor, dtype, tuple(reference[key].shape))
        return {k: _like(wire[k], reference[k]) for k in reference}
    delta = _decode_delta(wire, reference, codec)
    return {k: _like(_reference(reference, k) + delta[k], reference[k]) for k in reference}


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return tensor.to(device=reference.device, dtype=reference.dtype)


def _decode_delta(wire: State, reference: State, codec: Codec) -> State:
    """The float32 delta of each reference key, checked as `decode_update` says."""
    suffixes = (SCALE, INDEX) if codec.sparse else (SCALE,)
    owner = {k + s: k for k in reference for s in ("", *suffixes)}
    _check_keys(wire, owner)
    delta: State = {}
    for key, ref in reference.items():
        shape = tuple(ref.shape)
        values, scale = wire[key], wire[key + SCALE]
        if codec.sparse:
            numel = math.prod(shape)
            k = codec.kept(numel)
            _expect(key + INDEX, wire[key + INDEX], codec.index_dtype(numel), (k,))
            _expect(key, values, torch.int8, (k,))
            _expect(key + SCALE, scale, torch.float32, (1,))
            index = wire[key + INDEX].to(torch.int64)
            if k and (index[0] < 0 or index[-1] >= numel or bool((index.diff() <= 0).any())):
                raise TransportError(
                    f"{key + INDEX}: indices must rise strictly within 0..{numel - 1}"
                )
            _check_scale(key, scale)
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[index] = values.to(torch.float32) * scale
            delta[key] = flat.reshape(shape)
        else:
            rows = shape[0] if len(shape) >= 2 else 1
            _expect(key, values, torch.int8, shape)
            _expect(key + SCALE, scale, torch.float32, (rows,))
            _check_scale(key, scale)
            dense = _rows(values.to(torch.float32)) * scale.unsqueeze(1)
            delta[key] = dense.reshape(shape)
    return delta


def _check_keys(wire: State, owner: dict[str, str]) -> None:
    missing = sorted(set(owner) - set(wire))
    if missing:
        raise TransportError(f"{missing[0]}: missing from the update ({len(missing)} missing)")
    extra = sorted(set(wire) - set(owner))
    if extra:
        raise TransportError(f"{extra[0]}: not a tensor of the adapter's encoding")


def _expect(key: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype:
        raise TransportError(f"{key}: dtype {tensor.dtype}, expected {dtype}")
    if tuple(tensor.shape) != shape:
        raise TransportError(f"{key}: shape {tuple(tensor.shape)}, expected {shape}")


def _check_scale(key: str, scale: torch.Tensor) -> None:
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise TransportError(f"{key + SCALE}: scales must be finite and >= 0")


# ---------------------------------------------------------------- error feedback


@dataclass
class ErrorFeedback:
    """A client's residual: the part of its past deltas that top-k (and rounding) left out,
    added to its next delta. Kept on the client, saved with `to_bytes` beside its state."""

    residual: State = field(default_factory=dict)

    def add_residual(self, delta: State) -> State:
        """`delta` plus the residual (a residual of another layout is a bug, not data)."""
        if self.residual and self.residual.keys() != delta.keys():
            raise ValueError("the error-feedback residual has another adapter layout")
        return {k: v + self.residual[k] if self.residual else v for k, v in delta.items()}

    def to_bytes(self) -> bytes:
        """Safetensors bytes of the residual (float32)."""
        return save({k: v.contiguous() for k, v in self.residual.items()})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ErrorFeedback:
        """The residual saved by `to_bytes`; `where` names the file for errors."""
        try:
            residual = load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise DataError(
                f"{where}: unreadable error-feedback residual ({e}); delete it to start over "
                "(the unsent remainder of the last update is lost)"
            ) from None
        return cls(residual)
