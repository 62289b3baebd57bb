"""The global adapter of a FLock task, derived from public facts, never trusted.

Nobody publishes "the" global adapter. Every participant, and any outsider (`covey flock
fetch`), computes it the same way from the chain and the content-addressed updates:

    global(0)     = the task bundle's initial adapter
    global(r + 1) = global(r) if round r accepted nothing, else the task's `fed.strategy`
                    (equal weights) over the updates round r accepted (the `accepted` bits
                    of result(r), over proposers_of(r) in draw order) that pass validation
                    against global(r) (`Ledger.update_problem`: keys, shapes, dtypes, finite,
                    and a norm within fed.max_update_norm, or when that is 0 within what the
                    task's training can make, `covey.fed.validation.training_norm_bound`)

The strategy is fedavg (an equal-weight average) or one of the robust rules that keep no server
state (`covey.config.FLOCK_STRATEGIES`), with the bundle recipe's [fed] settings. The arithmetic
runs on the CPU and the bytes are those of the adapter's PEFT file (fixed metadata: the
bundle's base model id), so every party holds the same bytes under the same CID.
Proposers publish their update encoded with the task's `fed.transport` against the round's
global adapter (`update_bytes`), so the CID is over the encoded bytes; whoever reads one decodes
it against the same adapter (`read_update`), which the blob names by CID. The blob also names
the task (its contract address) and the round it was made for, and `read_update` refuses it
anywhere else: a proposal cannot be revealed again in a later round or another task unchanged
(a copier that re-wraps the tensors makes a new CID, which voters catch by its delta,
`covey.flock.copies`).
An accepted update that fails decoding or validation is left out by everyone alike (both are
deterministic). One that nobody can fetch stops the derivation with a DataError until some
peer serves it: every participant serves every blob it holds, so a round's voters can.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covey.atomic import atomic_write_bytes
from covey.config import FedConfig, TrainConfig
from covey.errors import ConfigError, DataError
from covey.fed.strategies import get_strategy
from covey.fed.transport import Codec, ErrorFeedback, decode_update, encode_update
from covey.fed.validation import training_norm_bound, validate_update
from covey.flock.task import FlockTask, Outcome
from covey.state import State
from covey.store.cid import cid_from_digest
from covey.store.endpoints import endpoint_problem
from covey.store.fetch import FetchLimits, Source, fetch
from covey.store.local import LocalStore
from covey.store.updates import deserialize_update, serialize_update, update_metadata

log = logging.getLogger("covey.flock")

UPDATE_FORMAT = "covey-flock-update/3"
"""`format` in a proposal blob's metadata; /2 added `transport` and `reference`, /3 `task`
(the contract's address, lower case) and `round`."""


def update_bytes(
    update: State,
    reference: State,
    reference_cid: str,
    codec: Codec,
    feedback: ErrorFeedback | None = None,
    *,
    task: str,
    round_: int,
) -> bytes:
    """The blob a proposer publishes in round `round_` of `task` (the contract's address):
    `update` encoded against the round's global adapter `reference` (named by `reference_cid`),
    with fixed metadata, so the bytes (and the CID) depend only on the tensors, the transport,
    the task, the round and its global adapter."""
    wire = encode_update(update, reference, codec, feedback)
    return proposal_blob(wire, codec, reference_cid, task=task, round_=round_)


def proposal_blob(
    wire: State, codec: Codec, reference_cid: str, *, task: str, round_: int
) -> bytes:
    """The blob of an update already encoded with `codec` against the global adapter named by
    `reference_cid` (see `update_bytes`)."""
    metadata = {
        "format": UPDATE_FORMAT,
        "transport": codec.transport,
        "reference": reference_cid,
        "task": task.lower(),
        "round": str(round_),
    }
    return serialize_update(wire, metadata)


def read_update(
    data: bytes, reference: State, reference_cid: str, codec: Codec, *, task: str, round_: int
) -> State:
    """The adapter a proposal blob stands for, decoded against the round's global adapter;
    DataError if it is not a proposal for round `round_` of `task` in this task's transport
    made from that adapter."""
    metadata = update_metadata(data)
    if metadata.get("format") != UPDATE_FORMAT:
        raise DataError(f"format {metadata.get('format')!r}, expected {UPDATE_FORMAT!r}")
    if metadata.get("task") != task.lower():
        raise DataError(f"made for task {metadata.get('task')}, not this task {task.lower()}")
    if metadata.get("round") != str(round_):
        raise DataError(f"made for round {metadata.get('round')}, not round {round_}")
    if metadata.get("transport") != codec.transport:
        raise DataError(
            f"encoded as {metadata.get('transport')!r}, the task's fed.transport is "
            f"{codec.transport!r}"
        )
    if metadata.get("reference") != reference_cid:
        raise DataError(
            f"made from global adapter {metadata.get('reference')}, not the round's {reference_cid}"
        )
    wire = deserialize_update(data)
    try:
        return decode_update(wire, reference, codec)
    except (ValueError, RuntimeError, IndexError, TypeError, OverflowError) as e:
        # decode_update names what it checks as TransportError (a DataError); anything else
        # from torch on a peer's tensors must still refuse the blob, never stop the reader
        raise DataError(f"update does not decode ({type(e).__name__}: {e})") from None


class Blobs:
    """Where a participant keeps, serves and finds blobs: its own store (which its gateway
    serves) first, then the publisher's registered endpoint, every other participant's, and
    any configured gateways. Whatever is fetched is verified and kept, so it is served on.

    Peers' endpoints are untrusted: one that is not `http(s)://host[:port]` is skipped (and
    logged), and the others may only reach public addresses unless `allow_private_endpoints`
    (the task's `flock.allow_private_endpoints`, for a LAN or loopback task); `gateways` are
    the user's own choice and may reach any address. `limits` bounds each fetch
    (`covey.store.fetch.FetchLimits`)."""

    def __init__(
        self,
        store: LocalStore,
        task: FlockTask | None = None,
        gateways: Sequence[str] = (),
        *,
        limits: FetchLimits = FetchLimits(),
        allow_private_endpoints: bool = False,
    ) -> None:
        self.store = store
        self.task = task
        self.gateways = list(gateways)
        self.limits = limits
        self.allow_private_endpoints = allow_private_endpoints
        """Whether peers' endpoints may be private addresses; set from the task bundle once it
        is read (the bundle itself comes from the publisher or the user's gateways)."""
        self.fetched_bytes = 0
        """Bytes received from other parties so far (not counting the local store)."""
        self.fetch_s = 0.0
        self._skipped: set[str] = set()

    def put(self, data: bytes) -> str:
        return self.store.put(data)

    def get(
        self, cid: str, publisher: str | None = None, *, deadline: float | None = None
    ) -> bytes:
        """The blob `cid`, from the local store or fetched (the publisher's endpoint first),
        giving up (DataError) at `deadline`, a `time.monotonic()` value, if it comes before
        `limits.timeout_s`: a voter bounds its ballot's fetching by its phase window."""
        if cid in self.store:
            return self.store.get(cid)
        started = time.perf_counter()
        try:
            data = fetch(cid, self.sources(publisher), self.limits, deadline=deadline)
        finally:
            self.fetch_s += time.perf_counter() - started
        self.fetched_bytes += len(data)
        self.store.put(data)
        return data

    def sources(self, publisher: str | None = None) -> list[Source]:
        """Where to ask, the publisher's endpoint first, the user's gateways last."""
        sources: list[Source] = []
        if self.task is not None:
            members = self.task.participants()
            if publisher is not None:
                members = [publisher, *[m for m in members if m.lower() != publisher.lower()]]
            for member in members:
                endpoint = self.task.endpoint_of(member)
                problem = endpoint_problem(endpoint) if endpoint else None
                if problem:
                    if endpoint not in self._skipped:  # once per endpoint, not per blob
                        self._skipped.add(endpoint)
                        log.warning("skipping %s's endpoint %r: %s", member, endpoint, problem)
                elif endpoint:
                    sources.append(Source(endpoint, self.allow_private_endpoints))
        sources += [Source(g, allow_private=True) for g in self.gateways]
        return sources


def global_bytes(state: State, base_model: str) -> bytes:
    """The canonical bytes of a global adapter: the adapter_model.safetensors that
    `covey.model.lora.adapter_files` writes for it, so the PEFT folder's file has the CID."""
    return serialize_update(state, {"format": "pt", "base_model": base_model})


class Ledger:
    """Global adapters of one task, derived round by round and cached in `cache` by CID, by
    the task's `fed` rules (max_update_norm, transport) and its `train` recipe (the default
    norm bound)."""

    def __init__(
        self,
        task: FlockTask,
        blobs: Blobs,
        initial_cid: str,
        fed: FedConfig,
        base_model: str,
        cache: Path | None = None,
        *,
        train: TrainConfig,
    ) -> None:
        self.task = task
        self.blobs = blobs
        self.initial_cid = initial_cid
        self.base_model = base_model
        self.fed = fed
        """The task's [fed] settings: validation's norm bound, the merging strategy, the codec."""
        self.train = train
        """The task's [train] settings: how far honest training can move the adapter."""
        self.codec = Codec.of(fed)
        if fed.max_update_norm <= 0 and train.max_steps < 1:
            raise ConfigError(
                "train.max_steps = 0 with fed.max_update_norm = 0: a FLock task needs a bound on "
                "updates; set train.max_steps in the task's recipe"
            )
        self.cache = cache
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        self._cids: dict[int, str] = {}
        self._reports: dict[int, dict[str, Any]] = {}

    def global_state(self, round_: int) -> tuple[State, str]:
        """The adapter round `round_` trains from (`round_` = the number of finished rounds
        gives the task's final adapter), and its CID. Rounds before `round_` must be final."""
        if round_ == 0:
            data = self.blobs.get(self.initial_cid)
            return deserialize_update(data), self.initial_cid
        cid = self._known_cid(round_)
        if cid is not None and cid in self.blobs.store:
            return deserialize_update(self.blobs.store.get(cid)), cid
        previous, previous_cid = self.global_state(round_ - 1)
        accepted = self.accepted_updates(round_ - 1)
        states = []
        for proposer, update_cid in accepted:
            data = self.blobs.get(update_cid, proposer)  # DataError: nobody serves it (yet)
            try:
                update = read_update(
                    data, previous, previous_cid, self.codec, task=self.task.address,
                    round_=round_ - 1,
                )  # fmt: skip
            except DataError as e:
                problem = str(e)
            else:
                problem = self.update_problem(update, previous)
            if problem:
                log.warning(
                    "round %d: accepted update %s left out: %s", round_ - 1, update_cid, problem
                )
                continue
            states.append(update)
        if not states:
            self._remember(round_, previous_cid)
            return previous, previous_cid
        merge = get_strategy(self.fed.strategy).start({k: v.cpu() for k, v in previous.items()})
        for state in states:
            merge.add({k: v.cpu() for k, v in state.items()}, 1.0)
        merged, _ = merge.finish({}, self.fed)
        cid = self.blobs.put(global_bytes(merged, self.base_model))
        self._remember(round_, cid, merge.report)
        return merged, cid

    def aggregation(self, round_: int) -> dict[str, Any]:
        """What `fed.strategy` did to make round `round_`'s global adapter (its accumulator's
        report, `RoundRecord.aggregation`: e.g. Krum's scores and which update it kept, over the
        updates that passed validation, in draw order); empty when the round before accepted
        nothing, or when this ledger found the adapter already derived and no report beside it."""
        self.global_state(round_)
        if round_ in self._reports:
            return self._reports[round_]
        path = self._report_path(round_)
        if path is not None and path.is_file():
            report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return report
        return {}

    def norm_bound(self, reference: State) -> tuple[float, str]:
        """The largest distance an update may have from `reference` (the round's global
        adapter), and where that bound comes from: fed.max_update_norm when set, else what the
        task's training can make (`training_norm_bound`)."""
        if self.fed.max_update_norm > 0:
            return self.fed.max_update_norm, "fed.max_update_norm"
        bound = training_norm_bound(
            self.train, reference, self.fed.transport, self.fed.topk_fraction
        )
        name = (
            f"the most train.max_steps={self.train.max_steps} AdamW steps at "
            f"train.lr={self.train.lr:g} can move the adapter; fed.max_update_norm is 0"
        )
        return bound, name

    def update_problem(self, update: State, reference: State) -> str:
        """Why `update` may not count against the round's global adapter `reference` ("" when
        it may): `validate_update` with the task's norm bound. Voters and the derivation of the
        global adapter check the same, so every party leaves out the same updates."""
        bound, name = self.norm_bound(reference)
        return validate_update(update, reference, 1, 1, bound, name).reason

    def accepted_updates(self, round_: int) -> list[tuple[str, str]]:
        """(proposer, update CID) of each proposal round `round_` accepted, in draw order."""
        result = self.task.result(round_)
        if result.outcome != Outcome.ACCEPTED:
            return []
        digests = dict(self.task.proposals(round_))
        accepted = []
        for i, proposer in enumerate(self.task.proposers_of(round_)):
            if result.accepted >> i & 1 and proposer in digests:
                accepted.append((proposer, cid_from_digest(digests[proposer])))
        return accepted

    def _known_cid(self, round_: int) -> str | None:
        if round_ in self._cids:
            return self._cids[round_]
        if self.cache is not None and (self.cache / f"global_{round_:04d}.cid").is_file():
            return (self.cache / f"global_{round_:04d}.cid").read_text().strip()
        return None

    def _remember(self, round_: int, cid: str, report: dict[str, Any] | None = None) -> None:
        self._cids[round_] = cid
        if report is not None:
            self._reports[round_] = report
            path = self._report_path(round_)
            if path is not None:  # written before the CID, which marks the round derived
                atomic_write_bytes(path, (json.dumps(report) + "\n").encode())
        if self.cache is not None:
            atomic_write_bytes(self.cache / f"global_{round_:04d}.cid", f"{cid}\n".encode())

    def _report_path(self, round_: int) -> Path | None:
        return None if self.cache is None else self.cache / f"global_{round_:04d}.aggregation.json"
