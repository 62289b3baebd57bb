"""A FLock participant: one account, its private data, its own folder; it plays by the chain.

`Participant.step()` looks at the task's phase and does the one thing that is due for this
participant, if any: join, commit or reveal its seed, call a due transition (start, draw_roles,
finalize: anyone may, and a second caller's revert is harmless), train and commit a proposal,
publish and reveal it, judge the round's proposals and commit a ballot, reveal it, and at the
end claim and withdraw. Everything it decides from is either on chain or in its folder, so a
participant killed at any moment and started again continues where it was:

    FOLDER/
      state.json     secrets (seeds, proposal and ballot salts) and what they commit to,
                     written atomically *before* the transaction that commits to them; per
                     round its role, proposal (CID, training metrics) and ballot (verdicts,
                     scores); `costs`: gas, bytes fetched and fetch time per round
      pending/       its update between committing and revealing (unpublished: a copier
                     would otherwise see it before the commit window closes)
      feedback/      under fed.transport = int8+topk, the error-feedback residual after the
                     last round it proposed in (`round_<r>.safetensors`), added to its next
                     update
      store/         every blob it holds, served by its gateway (`GET /ipfs/{cid}`)
      sketches/      a sketch of the delta of every valid proposal of each round it has looked
                     at (`covey.flock.copies`), to refuse copies of earlier rounds' updates
      globals/       the CIDs of the global adapters it derived and the aggregation report of
                     each (`covey.flock.ledger`)

How a voter judges a round's proposals is `covey.flock.voter`. `covey flock join` runs one
`Participant` in a loop against a real node; the simulation (`covey.flock.protocol`) steps N
of them on an embedded chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covey.atomic import atomic_write_bytes
from covey.config import RunConfig
from covey.data.prompts import Example
from covey.errors import CoveyError, DataError
from covey.fed.attacks import UPDATE_ATTACKS
from covey.fed.client import UpdateAttack, client_update
from covey.fed.rounds import RunModel
from covey.fed.transport import ErrorFeedback
from covey.flock.chain import ChainError, ContractRevert
from covey.flock.commitments import (
    accept_mask,
    proposal_commitment,
    seed_commitment,
    vote_commitment,
)
from covey.flock.copies import SketchBook, Sketcher
from covey.flock.history import finished_rounds
from covey.flock.ledger import Blobs, Ledger, proposal_blob
from covey.flock.params import TOKEN_UNIT
from covey.flock.task import FlockTask, Phase, PhaseError, Role
from covey.flock.voter import Voter
from covey.state import State
from covey.store.cid import cid_for, digest_of

log = logging.getLogger("covey.flock.agent")

FINISHED = (Phase.ENDED, Phase.CANCELLED, Phase.STALLED)
STATE_FILE = "state.json"
FEEDBACK = "feedback"


@dataclass(frozen=True)
class Behaviour:
    """How a participant deviates from the protocol: for robustness experiments only.

    `update_attack` (`covey.fed.attacks`: sign_flip, noise, scale, free_rider) changes what it
    proposes; `vote` is `honest`, `always_accept` (colludes with every proposal) or
    `random_vote`. Recorded as experiment ground truth; no honest participant reads it.
    """

    update_attack: str = ""
    strength: float = 1.0
    vote: str = "honest"

    @property
    def malicious(self) -> bool:
        return bool(self.update_attack) or self.vote != "honest"

    @classmethod
    def from_attack(cls, kind: str, strength: float) -> Behaviour:
        """Behaviour of `attack.kind` (as the other engines): an update attack also colludes
        when voting; a vote attack only votes."""
        if kind == "none":
            return cls()
        if kind in UPDATE_ATTACKS:
            return cls(update_attack=kind, strength=strength, vote="always_accept")
        return cls(vote=kind)


SecretSource = Callable[[int, str], bytes]
"""`secret(round, purpose) -> 32 bytes`: fresh randomness on a real network; seeded in the
simulation so runs repeat."""


def random_secret(round_: int, purpose: str) -> bytes:
    return secrets.token_bytes(32)


class LocalState:
    """The participant's own memory (`state.json`): every secret before it is committed."""

    def __init__(self, folder: Path, task: str, address: str) -> None:
        self.path = folder / STATE_FILE
        self.data: dict[str, Any] = {"task": task, "address": address, "rounds": {}}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}: unreadable participant state ({e})") from None
            if saved.get("task") != task or saved.get("address") != address:
                raise DataError(
                    f"{self.path} belongs to participant {saved.get('address')} of task "
                    f"{saved.get('task')}, not {address} of {task}; use another --state folder"
                )
            self.data = saved

    def round(self, round_: int) -> dict[str, Any]:
        rounds: dict[str, dict[str, Any]] = self.data["rounds"]
        return rounds.setdefault(str(round_), {})

    def save(self) -> None:
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1) + "\n").encode())

    def secret(self, round_: int, purpose: str, source: SecretSource) -> bytes:
        """The round's secret for `purpose`, made and saved the first time it is asked for."""
        entry = self.round(round_)
        if purpose not in entry:
            entry[purpose] = source(round_, purpose).hex()
            self.save()
        return bytes.fromhex(entry[purpose])


@dataclass
class Participant:
    """One FLock participant (see the module docstring)."""

    task: FlockTask
    address: str
    cfg: RunConfig
    model: RunModel
    train: Sequence[Example]
    validation: Sequence[Example]
    folder: Path
    blobs: Blobs
    ledger: Ledger
    endpoint: str = ""
    behaviour: Behaviour = field(default_factory=Behaviour)
    secret: SecretSource = random_secret
    name: str = ""
    done: bool = False
    """Set once the task has finished and this participant has claimed and withdrawn."""

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = LocalState(self.folder, self.task.address, self.address)
        self.name = self.name or self.address[:10]
        self._derived = 0
        if "sketch_key" not in self.state.data:  # secret: a copier must not know the sketch
            self.state.data["sketch_key"] = self.secret(0, "sketch_key").hex()
            self.state.save()
        self.sketches = SketchBook(
            self.folder / "sketches", Sketcher(bytes.fromhex(self.state.data["sketch_key"]))
        )
        self.voter = Voter(
            self.task, self.cfg, self.model, self.validation, self.blobs, self.ledger,
            self.sketches, self.name,
        )  # fmt: skip

    # ---------------------------------------------------------------- the state machine

    def step(self) -> bool:
        """Do what is due now; True if a transaction was sent (or work done toward one)."""
        if self.done:
            return False
        phase = self.task.phase()
        round_ = self.task.current_round()
        finished = finished_rounds(self.task)
        self._report_finished_rounds(finished)
        self._derive_globals(finished)
        gas, fetched, fetch_s = _gas_spent(self.task), self.blobs.fetched_bytes, self.blobs.fetch_s
        try:
            return self._act(phase, round_)
        except PhaseError as e:  # the window closed under us: the next step sees the new phase
            log.debug("%s: %s", self.name, e)
            return False
        except ContractRevert as e:
            if self.task.phase() != phase or self.task.current_round() != round_:
                return False  # someone else moved the phase first (start, draw, finalize)
            raise ChainError(f"{self.name}: {e}") from None
        finally:  # what this step cost, for the round's record and benchmarks/
            costs = {
                "gas": _gas_spent(self.task) - gas,
                "fetched_bytes": self.blobs.fetched_bytes - fetched,
                "fetch_s": self.blobs.fetch_s - fetch_s,
            }
            if any(costs.values()):
                bucket = (
                    "join" if phase == Phase.REGISTRATION
                    else "settle" if phase in FINISHED
                    else str(round_)
                )  # fmt: skip
                entry = self.state.data.setdefault("costs", {}).setdefault(bucket, {})
                for key, value in costs.items():
                    entry[key] = entry.get(key, 0) + value
                self.state.save()

    def _derive_globals(self, finished: int) -> None:
        """Derive the global adapter after the `finished` rounds as soon as they are final,
        while the proposers whose updates it averages are still online to serve them."""
        if self._derived >= finished:
            return
        try:
            _, cid = self.ledger.global_state(finished)
        except DataError as e:  # nobody serves an accepted update yet: try again next step
            log.warning("%s: global adapter after round %d: %s", self.name, finished - 1, e)
            return
        self._derived = finished
        log.info("%s: global adapter after %d round(s): %s", self.name, finished, cid)

    def _act(self, phase: Phase, round_: int) -> bool:
        me = self.address
        if phase in FINISHED:
            return self._settle(phase)
        if self.task.joined(me) and self._update_endpoint():
            return True  # a restart on another address: peers must find our blobs again
        if phase == Phase.REGISTRATION:
            return self._join() if not self.task.joined(me) else False
        if phase in (Phase.AWAIT_START, Phase.AWAIT_DRAW, Phase.AWAIT_FINALIZE):
            return self._keep(phase)
        if not self._member():
            if phase == Phase.SEED_COMMIT and not self.task.joined(me):
                return self._join()  # a free slot after an eviction or exit
            return False
        if phase == Phase.SEED_COMMIT:
            return self._commit_seed(round_)
        if phase == Phase.SEED_REVEAL:
            return self._reveal_seed(round_)
        role = self.task.role_of(round_, me)
        self._note_role(round_, role)
        if role == Role.PROPOSER and phase == Phase.PROPOSE_COMMIT:
            return self._commit_proposal(round_)
        if role == Role.PROPOSER and phase == Phase.PROPOSE_REVEAL:
            return self._reveal_proposal(round_)
        if role == Role.VOTER and phase == Phase.VOTE_COMMIT:
            return self._commit_ballot(round_)
        if role == Role.VOTER and phase == Phase.VOTE_REVEAL:
            return self._reveal_ballot(round_)
        return False

    def _member(self) -> bool:
        return any(p.lower() == self.address.lower() for p in self.task.participants())

    # ---------------------------------------------------------------- registration

    def _join(self) -> bool:
        if self.state.data.get("left"):
            return False
        stake_and_join(self.task, self.address, self.endpoint, self.name)
        return True

    def _update_endpoint(self) -> bool:
        if self.endpoint and self.task.endpoint_of(self.address) != self.endpoint:
            self.task.set_endpoint(self.endpoint, sender=self.address)
            log.info("%s: now serving blobs at %s", self.name, self.endpoint)
            return True
        return False

    # ---------------------------------------------------------------- transitions

    def _keep(self, phase: Phase) -> bool:
        """Call the due transition; whoever is first gets the keeper fee, later callers see the
        phase move on (their revert is caught in `step`)."""
        call = {
            Phase.AWAIT_START: self.task.start,
            Phase.AWAIT_DRAW: self.task.draw_roles,
            Phase.AWAIT_FINALIZE: self.task.finalize,
        }[phase]
        try:
            call(sender=self.address)
        except ContractRevert as e:  # another participant called it first: harmless
            log.debug("%s: %s not needed (%s)", self.name, call.__name__, e)
            return False
        log.info("%s: called %s", self.name, call.__name__)
        return True

    # ---------------------------------------------------------------- seeds

    def _commit_seed(self, round_: int) -> bool:
        commitment, _ = self.task.seed_status(round_, self.address)
        if any(commitment):
            return False
        seed = self.state.secret(round_, "seed", self.secret)  # saved before it is committed
        self.task.commit_seed(seed_commitment(seed, self.address), sender=self.address)
        log.info("%s: round %d: committed a seed", self.name, round_)
        return True

    def _reveal_seed(self, round_: int) -> bool:
        commitment, revealed = self.task.seed_status(round_, self.address)
        if not any(commitment) or revealed:
            return False
        seed = self.state.secret(round_, "seed", self.secret)
        self.task.reveal_seed(seed, sender=self.address)
        log.info("%s: round %d: revealed its seed", self.name, round_)
        return True

    def _note_role(self, round_: int, role: Role) -> None:
        entry = self.state.round(round_)
        if "role" not in entry:
            entry["role"] = role.name.lower()
            self.state.save()
            log.info("%s: round %d: role %s", self.name, round_, entry["role"])

    # ---------------------------------------------------------------- proposing

    def _commit_proposal(self, round_: int) -> bool:
        if any(self.task.proposal_of(round_, self.address).commitment):
            return False
        entry = self.state.round(round_)
        if "proposal" not in entry:  # a restart after training reuses the trained update
            global_state, global_cid = self.ledger.global_state(round_)
            data, line = self._train(round_, global_state, global_cid)
            pending = self.folder / "pending"
            pending.mkdir(exist_ok=True)
            cid = cid_for(data)
            atomic_write_bytes(pending / cid, data)
            entry["proposal"] = {"cid": cid, "from": global_cid, "training": line}
            self.state.save()
            for old in self._feedback_files(before=round_):  # superseded by this round's
                old.unlink()
        proposal = entry["proposal"]
        salt = self.state.secret(round_, "proposal_salt", self.secret)
        commitment = proposal_commitment(digest_of(proposal["cid"]), salt, self.address)
        self.task.commit_proposal(commitment, sender=self.address)
        log.info("%s: round %d: committed proposal %s", self.name, round_, proposal["cid"])
        return True

    def _train(
        self, round_: int, global_state: State, global_cid: str
    ) -> tuple[bytes, dict[str, float]]:
        """Train from the round's global adapter on the private data (or attack); the update's
        blob (encoded with fed.transport) and the training metrics."""
        seed = int.from_bytes(self.state.secret(round_, "train_seed", self.secret)[:4], "big")
        attack = self.behaviour.update_attack
        codec = self.ledger.codec
        # the residual after the last round this participant proposed in; the new one is
        # saved before the proposal is (a restart that trains again reads the same old one)
        feedback = None
        if codec.sparse:
            previous = self._feedback_files(before=round_)
            feedback = (
                ErrorFeedback.from_bytes(previous[-1].read_bytes(), str(previous[-1]))
                if previous
                else ErrorFeedback()
            )
        update = client_update(
            self.model.model, self.model.pad_id, self.train, global_state, self.cfg.train, seed,
            codec, feedback=feedback, free_rider_trains=False,
            attack=UpdateAttack(attack, self.behaviour.strength, self.cfg.attack.estimate_shards)
            if attack
            else None,
        )  # fmt: skip
        if update.metrics:
            log.info(
                "%s: round %d: trained on %d examples (loss %.4f, %.0f tokens/s)",
                self.name, round_, len(self.train), update.metrics["train_loss"],
                update.metrics["tokens_per_s"],
            )  # fmt: skip
        task = self.task.address  # the blob names the task and round: refused in any other
        data = proposal_blob(update.wire, codec, global_cid, task=task, round_=round_)
        if feedback is not None:
            (self.folder / FEEDBACK).mkdir(exist_ok=True)
            path = self.folder / FEEDBACK / f"round_{round_:04d}.safetensors"
            atomic_write_bytes(path, feedback.to_bytes())
        return data, update.metrics

    def _feedback_files(self, before: int) -> list[Path]:
        """Saved residuals of rounds before `before`, oldest first."""
        folder = self.folder / FEEDBACK
        if not folder.is_dir():
            return []
        names = sorted(folder.glob("round_*.safetensors"))
        return [p for p in names if int(p.stem.removeprefix("round_")) < before]

    def _reveal_proposal(self, round_: int) -> bool:
        status = self.task.proposal_of(round_, self.address)
        proposal = self.state.round(round_).get("proposal")
        if not any(status.commitment) or any(status.digest) or proposal is None:
            return False
        cid = proposal["cid"]
        data = (self.folder / "pending" / cid).read_bytes()
        self.blobs.put(data)  # published now that no one can commit a copy any more
        proposal["bytes"] = len(data)
        salt = self.state.secret(round_, "proposal_salt", self.secret)
        self.task.reveal_proposal(digest_of(cid), salt, sender=self.address)
        log.info("%s: round %d: revealed proposal %s", self.name, round_, cid)
        return True

    # ---------------------------------------------------------------- voting

    def _commit_ballot(self, round_: int) -> bool:
        if any(self.task.vote_of(round_, self.address).commitment):
            return False
        if self.task.proposal_count(round_) == 0:
            return False  # the contract closes voting on a round without a valid proposal
        entry = self.state.round(round_)
        if "ballot" not in entry:
            entry["ballot"] = self._judge(round_)
            self.state.save()
        ballot = entry["ballot"]
        salt = self.state.secret(round_, "ballot_salt", self.secret)
        mask = accept_mask(ballot["accepts"])
        self.task.commit_vote(vote_commitment(mask, salt, self.address), sender=self.address)
        log.info(
            "%s: round %d: committed ballot %s",
            self.name, round_, "".join("+-"[not a] for a in ballot["accepts"]),
        )  # fmt: skip
        return True

    def _judge(self, round_: int) -> dict[str, Any]:
        """The round's ballot (`Voter.judge`), its verdicts replaced by a dishonest voter's
        (`Behaviour.vote`) in robustness experiments."""
        ballot = self.voter.judge(round_)
        n = len(ballot["accepts"])
        if self.behaviour.vote == "always_accept":
            ballot["accepts"] = [True] * n
        elif self.behaviour.vote == "random_vote":
            digest = self.state.secret(round_, "random_vote", self.secret)
            coins = np.random.default_rng(list(digest)).integers(2, size=n)
            ballot["accepts"] = [bool(c) for c in coins]
        return ballot

    def _reveal_ballot(self, round_: int) -> bool:
        vote = self.task.vote_of(round_, self.address)
        ballot = self.state.round(round_).get("ballot")
        if not any(vote.commitment) or vote.revealed or ballot is None:
            return False
        salt = self.state.secret(round_, "ballot_salt", self.secret)
        self.task.reveal_vote(accept_mask(ballot["accepts"]), salt, sender=self.address)
        log.info("%s: round %d: revealed its ballot", self.name, round_)
        return True

    # ---------------------------------------------------------------- the end

    def _settle(self, phase: Phase) -> bool:
        me = self.address
        if self.task.reward_of(me) > 0:
            amount = self.task.reward_of(me)
            self.task.claim(sender=me)
            log.info("%s: claimed %s tokens", self.name, _tokens(amount))
            return True
        if self.task.stake_of(me) > 0:
            result = self.task.withdraw(sender=me)
            for event in result.named("Withdrawn"):
                log.info("%s: withdrew its stake of %s tokens", self.name, _tokens(event["stake"]))
            return True
        self.done = True
        log.info("%s: task %s; nothing left to claim", self.name, phase.name.lower())
        return False

    def _report_finished_rounds(self, finished: int) -> None:
        """One line per newly finished round: what this participant earned and lost in it."""
        reported = int(self.state.data.get("reported", 0))
        if reported >= finished:
            return
        me = self.address.lower()
        # events of the rounds still to report are all at or after the block that opened the
        # stage they were read in (the draw's slashes are in the block that opened the round)
        since = self.state.data.get("scanned_from")
        next_since = self.task.stage_start()
        rewards = self.task.events("Rewarded", since)
        slashes = self.task.events("Slashed", since)
        for r in range(reported, min(finished, self.task.params.rounds)):
            result = self.task.result(r)
            got = sum(e["amount"] for e in rewards if _of(e, r, me))
            lost = sum(e["amount"] for e in slashes if _of(e, r, me))
            log.info(
                "%s: round %d: %s; reward %s, slash %s",
                self.name, r, result.outcome.name.lower(), _tokens(got), _tokens(lost),
            )  # fmt: skip
        self.state.data["reported"] = finished
        self.state.data["scanned_from"] = next_since
        self.state.save()


def stake_and_join(task: FlockTask, address: str, endpoint: str, name: str) -> None:
    """Approve and stake the task's minimum, registering where this participant serves blobs."""
    stake = task.params.stake
    balance = task.token.balance_of(address)
    if balance < stake:
        raise CoveyError(
            f"{address} holds {balance / TOKEN_UNIT:g} tokens of {task.token.address}; the "
            f"stake is {stake / TOKEN_UNIT:g}: ask the task's creator to fund the address"
        )
    task.join(endpoint, sender=address)
    log.info("%s: joined with a stake of %s tokens; serving blobs at %s", name, _tokens(stake),
             endpoint or "(nowhere)")  # fmt: skip


def _gas_spent(task: FlockTask) -> int:
    """Gas of every transaction this process has sent on `task`'s chain connection."""
    return sum(sum(used) for used in task.chain.gas.values())


def _of(event: dict[str, Any], round_: int, who: str) -> bool:
    return bool(event["round"] == round_ and str(event["participant"]).lower() == who)


def _tokens(wei: int) -> str:
    return f"{wei / TOKEN_UNIT:.2f}"


def data_split(examples: Sequence[Example], keep: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): every k-th example is private validation data, never trained on:
    `keep` of them, but at most a quarter of the examples and at least one. DataError with
    fewer than 2 examples (nothing would be left to train on)."""
    if len(examples) < 2:
        raise DataError(
            f"a FLock participant needs at least 2 examples (one to train on, one held out to"
            f" judge proposals with); its data has {len(examples)}: give it more records"
        )
    keep = max(1, min(keep, len(examples) // 4))
    step = len(examples) // keep
    chosen = set(range(0, len(examples), step)[:keep])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    validation = [e for i, e in enumerate(examples) if i in chosen]
    return train, validation


def seeded_secret(seed: int, index: int) -> SecretSource:
    """Secrets derived from a run seed, so a simulation repeats exactly (never on a network)."""

    def secret(round_: int, purpose: str) -> bytes:
        return hashlib.sha256(f"{seed}/{round_}/{index}/{purpose}".encode()).digest()

    return secret
