"""Copies across rounds: a proposal whose delta nearly repeats what another proposer published
in an earlier round of the task.

The contract refuses a digest revealed twice, and an update names its task and round
(`covey.flock.ledger.read_update`), so an earlier blob cannot be revealed again as it is. But
its tensors are public once revealed: a copier can wrap them again with new metadata (a new
CID), perturb them, add the old delta to the new global adapter, or re-parametrize it (in each
LoRA module, B M and M^-1 A compute the same B A with other matrices), and propose that as its
own work. What it cannot hide is its delta (update minus the global adapter it was made from),
in parameter space or in what it adds to the model's weights (function space): nearly the
author's. So a voter keeps a sketch of both for every valid proposal of every earlier round
(`SketchBook`, in its folder) and rejects a proposal whose delta has a cosine of at least
`flock.copy_cosine` with one of them in either space (`find_copy`, `similarity`).

What it stops, and what not (benchmarks/bench_voter_checks.py, SmolLM2, demo recipe, IID data):
honest updates of two participants reach a cosine of 0.36 after 2 local steps and 0.51 after 8,
while a re-wrap or an old delta on a newer global adapter is at 1.0 (parameters), a
re-parametrized copy at 0.94 to 1.0 (function; its parameters at 0.0), and a copy with
Gaussian noise of 0.3 times its norm at 0.96. But that noise is nearly free on a real model:
noise of twice the delta's norm left the copy's held-out gain as it was (cosine 0.45 to 0.57).
A copier who adds noise until the cosine is under the threshold keeps its copy's worth, up to
what the norm bound allows (`covey.fed.validation.training_norm_bound`: honest updates sit at
0.4 to 0.8 of it, leaving room for noise of about 0.75 to 2 times their norm), and a lower
threshold would cost honest proposers first. Mixing two earlier deltas gives 0.75 to 0.85.
So this check stops naive copies; a careful copier is left to the voters' scoring, which
rejects an old delta the global adapter already holds when it harms (it did after 8 steps).

Whose is a delta: the first proposer to publish it. A proposer's own earlier deltas never count
against it (retraining from an unchanged global adapter repeats much of the last update), and a
copy of an author's update does not make the author's later, similar update a copy of the copy:
`find_copy` looks at the earliest round with a near-parallel delta, and accepts the proposal when
its own proposer published one there.

Sketches (`Sketcher`) are random projections keyed by a secret of the voter's own (a copier who
knew them could pick a perturbation that scrambles the sketch alone), SKETCH_SIZE entries per
space whatever the adapter's size: 128 KiB per proposal as float64, half that on disk, 20 to 40
ms to make for SmolLM2's 460,800 adapter parameters. A LoRA module's weight change B A - B0 A0
is projected on both sides to PROJECTION_SIDE rows and columns from its low-rank factors, never
formed; the concatenation, like the parameter delta, is then count-sketched (Charikar, Chen and
Farach-Colton 2002). Cosines come through within 0.03 (parameters) and 0.05 (function) of the
exact ones on SmolLM2, exact when the adapter is small enough.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from eth_utils.address import to_checksum_address
from safetensors import SafetensorError
from safetensors.torch import load, save

from covey.atomic import atomic_write_bytes
from covey.errors import DataError
from covey.state import State, delta, flatten
from covey.store.updates import update_metadata

log = logging.getLogger("covey.flock.copies")

SKETCH_SIZE = 8192
"""Buckets of a delta's sketch: the cosine error against the memory per delta (8 bytes each)."""
PROJECTION_SIDE = 32
"""Rows and columns a LoRA module's weight change is projected to (where it has more)."""
SKETCH_FORMAT = "covey-delta-sketches/2"
_PRIME = 2**31 - 1  # the hash's field: entries are numbered below it
_CHUNK = 1 << 20  # entries hashed at a time (bounds the memory of the index arithmetic)
_LORA_A, _LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(state: State) -> tuple[list[tuple[str, str]], list[str]]:
    """(lora_A key, lora_B key) of each LoRA module of an adapter state, in key order, and its
    other keys (a module kept whole, say), whose parameter deltas are compared as they are."""
    pairs = [
        (k, k.replace(_LORA_A, _LORA_B))
        for k in sorted(state)
        if _LORA_A in k and k.replace(_LORA_A, _LORA_B) in state and state[k].dim() == 2
    ]
    paired = {k for pair in pairs for k in pair}
    return pairs, [k for k in sorted(state) if k not in paired]


def function_space(update: State, reference: State) -> torch.Tensor:
    """An update's delta as what it adds to the model's weights, exactly: B A - B0 A0 of each
    LoRA module (flattened, in key order; the LoRA scaling is the same for every module and
    left out), then the parameter delta of any other key. Invariant to re-parametrizing a
    module (B M, M^-1 A); costs a dense weight matrix per module (`Sketcher` does not)."""
    pairs, others = lora_pairs(reference)
    parts = [
        (_f64(update[b]) @ _f64(update[a]) - _f64(reference[b]) @ _f64(reference[a])).flatten()
        for a, b in pairs
    ]
    parts.append(_parameter_delta(update, reference, others))
    return torch.cat(parts)


def _parameter_delta(update: State, reference: State, keys: list[str]) -> torch.Tensor:
    """The flat float64 delta of `keys` (the ones outside LoRA pairs), on the CPU."""
    return flatten(delta(update, {k: reference[k] for k in keys}, torch.float64, device="cpu"))


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


class Sketcher:
    """Sketches of updates' function-space deltas (`function_space`), keyed by a voter's secret
    `key`: every sketch one voter compares must come from the same key, sizes and adapter.

    Each LoRA module's weight change B A - B0 A0 (d_out x d_in) is projected to L (B A - B0 A0) R
    with Gaussian L (side x d_out) and R (d_in x side), entries of variance 1/side, from the
    key (a side no longer than `side` is kept as it is): E[L^T L] = I and E[R R^T] = I, so
    inner products, and cosines, are kept in expectation, computed from the low-rank factors
    (L B)(A R) without ever forming the weight matrix. The projections, concatenated, are then
    count-sketched (Charikar, Chen and Farach-Colton 2002) into `size` buckets: each entry is
    added with a sign to one bucket, both picked by a keyed hash. A vector of at most `size`
    entries is kept as it is.
    """

    def __init__(self, key: bytes, size: int = SKETCH_SIZE, side: int = PROJECTION_SIDE) -> None:
        if size < 1 or side < 1:
            raise ValueError(f"a sketch needs at least one bucket and row, got {size}, {side}")
        self.size, self.side = size, side
        self._key = key
        self.key_id = hashlib.sha256(b"covey-delta-sketch-id/" + key).hexdigest()[:16]
        """Names the key in saved sketches without revealing it."""
        digest = hashlib.sha256(b"covey-delta-sketch/" + key).digest()
        words = [int.from_bytes(digest[i : i + 8], "big") for i in range(0, 32, 8)]
        # two pairwise-independent hashes ((a*i + b) mod p): one picks the bucket, one the sign
        self._bucket = (1 + words[0] % (_PRIME - 1), words[1] % _PRIME)
        self._sign = (1 + words[2] % (_PRIME - 1), words[3] % _PRIME)
        self._projections: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def sketch(self, update: State, reference: State) -> torch.Tensor:
        """The sketch of `update`'s delta from `reference`, (2, size) float64: row 0 in
        parameter space (the flattened LoRA matrices, keys in order), row 1 in function space
        (`function_space`, projected)."""
        parameters = flatten(delta(update, reference, torch.float64, device="cpu"))
        return torch.stack(
            [self.count_sketch(parameters), self.count_sketch(self._function(update, reference))]
        )

    def _function(self, update: State, reference: State) -> torch.Tensor:
        pairs, others = lora_pairs(reference)
        parts = []
        for a, b in pairs:
            left, right = self._projection(a, reference[b].shape[0], reference[a].shape[1])
            new = (left @ _f64(update[b])) @ (_f64(update[a]) @ right)
            old = (left @ _f64(reference[b])) @ (_f64(reference[a]) @ right)
            parts.append((new - old).flatten())
        parts.append(_parameter_delta(update, reference, others))
        return torch.cat(parts)

    def _projection(self, name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._projections.get((name, rows, cols))
        if cached is None:
            seed = hashlib.sha256(self._key + b"/" + name.encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(seed[:8], "big") >> 1)
            side = self.side
            left = (
                torch.randn(side, rows, generator=generator, dtype=torch.float64) / side**0.5
                if rows > side
                else torch.eye(rows, dtype=torch.float64)
            )
            right = (
                torch.randn(cols, side, generator=generator, dtype=torch.float64) / side**0.5
                if cols > side
                else torch.eye(cols, dtype=torch.float64)
            )
            cached = self._projections[(name, rows, cols)] = (left, right)
        return cached

    def count_sketch(self, vector: torch.Tensor) -> torch.Tensor:
        """`vector` in `size` buckets (float64); itself, padded with zeros, when it has at most
        `size` entries."""
        flat = vector.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if flat.numel() <= self.size:
            return torch.nn.functional.pad(flat, (0, self.size - flat.numel()))
        if flat.numel() >= _PRIME:
            raise ValueError(f"a vector of {flat.numel()} entries is too long to sketch")
        out = torch.zeros(self.size, dtype=torch.float64)
        for start in range(0, flat.numel(), _CHUNK):
            values = flat[start : start + _CHUNK]
            index = torch.arange(start, start + values.numel(), dtype=torch.int64)
            bucket = _hash(index, self._bucket) % self.size
            sign = (_hash(index, self._sign) & 1).to(torch.float64) * 2 - 1
            out.index_add_(0, bucket, values * sign)
        return out


def _hash(index: torch.Tensor, ab: tuple[int, int]) -> torch.Tensor:
    a, b = ab
    return (index * a + b) % _PRIME  # a, index < 2^31: the product fits in int64


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of two vectors (0 when either is zero: a free rider's delta matches nothing)."""
    x, y = x.double().flatten(), y.double().flatten()
    scale = float(x.norm()) * float(y.norm())
    return float(x @ y) / scale if scale > 0 else 0.0


def similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """How alike two `Sketcher.sketch`es are: the larger of their cosines in parameter space
    (exactly 1 for an old delta added to a new global adapter) and in function space (the same
    under a re-parametrization that leaves the parameters far apart)."""
    return max(cosine(x[0], y[0]), cosine(x[1], y[1]))


@dataclass(frozen=True)
class Earlier:
    """The sketch of one valid proposal of an earlier round."""

    round: int
    proposer: str
    sketch: torch.Tensor


@dataclass(frozen=True)
class Copy:
    """What a proposal copies: the earliest near-parallel delta, published by someone else."""

    round: int
    author: str
    cosine: float

    def reason(self) -> str:
        return (
            f"a copy of {to_checksum_address(self.author)}'s proposal of round {self.round} "
            f"(delta cosine {self.cosine:.3f} >= flock.copy_cosine)"
        )


def find_copy(
    sketch: torch.Tensor, proposer: str, earlier: Iterable[Earlier], threshold: float
) -> Copy | None:
    """The earlier delta `sketch` (of `proposer`'s proposal) copies, if any: among the earlier
    deltas with a cosine of at least `threshold`, those of the earliest round; None when there
    are none or when `proposer` published one of them (its own work, copied by others since)."""
    me = proposer.lower()
    matches = [(e, c) for e in earlier if (c := similarity(sketch, e.sketch)) >= threshold]
    if not matches:
        return None
    first = min(e.round for e, _ in matches)
    authors = [(e, c) for e, c in matches if e.round == first]
    if any(e.proposer.lower() == me for e, _ in authors):
        return None
    author, best = max(authors, key=lambda pair: pair[1])
    return Copy(round=first, author=author.proposer, cosine=best)


@dataclass
class RoundSketches:
    """What a voter knows of one round's valid proposals: a sketch per proposer (address in
    lower case) whose update it read, and the proposers whose update it could not use (not
    served when it asked, not decodable, invalid), which it does not ask for again."""

    sketches: dict[str, torch.Tensor] = field(default_factory=dict)
    unusable: set[str] = field(default_factory=set)

    def add(self, proposer: str, sketch: torch.Tensor | None) -> None:
        if sketch is None:
            self.unusable.add(proposer.lower())
        else:
            self.sketches[proposer.lower()] = sketch

    def known(self) -> set[str]:
        return {*self.sketches, *self.unusable}


class SketchBook:
    """A voter's sketches of earlier rounds' deltas, one safetensors file per round once it has
    looked at every valid proposal of the round (`FOLDER/round_<r>.safetensors`: a float64
    tensor per proposer; the metadata lists the unusable proposers)."""

    def __init__(self, folder: Path, sketcher: Sketcher) -> None:
        self.folder = folder
        self.sketcher = sketcher

    def path(self, round_: int) -> Path:
        return self.folder / f"round_{round_:04d}.safetensors"

    def load(self, round_: int) -> RoundSketches | None:
        """The round's sketches; None when the file is missing, unreadable or of another sketch
        size (the round is sketched again from the blobs)."""
        path = self.path(round_)
        if not path.is_file():
            return None
        data = path.read_bytes()
        try:
            sketches = {k: v.double() for k, v in load(data).items()}
            metadata = update_metadata(data)
        except (SafetensorError, ValueError, RuntimeError, DataError) as e:
            log.warning("%s: unreadable (%s); sketching the round again", path, e)
            return None
        if metadata != {**metadata, **self._identity()}:
            log.warning("%s: another sketch format, size or key; sketching the round again", path)
            return None
        unusable = {a for a in metadata.get("unusable", "").split(",") if a}
        return RoundSketches(sketches, unusable)

    def save(self, round_: int, known: RoundSketches) -> None:
        metadata = {**self._identity(), "unusable": ",".join(sorted(known.unusable))}
        tensors = {k.lower(): v.float().contiguous() for k, v in known.sketches.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(round_), save(tensors, metadata=metadata))

    def _identity(self) -> dict[str, str]:
        return {
            "format": SKETCH_FORMAT,
            "size": str(self.sketcher.size),
            "side": str(self.sketcher.side),
            "key": self.sketcher.key_id,
            "torch": torch.__version__,  # the projections are torch.randn streams
        }

    @staticmethod
    def earlier(rounds: Sequence[tuple[int, RoundSketches]]) -> list[Earlier]:
        return [
            Earlier(round_, proposer, sketch)
            for round_, known in rounds
            for proposer, sketch in known.sketches.items()
        ]
