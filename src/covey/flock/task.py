"""The FLock task contract and its token, as typed Python: phases, views, calls.

`FlockTask.deploy(chain, token, params, task_bundle)` creates a task (approving the reward
pool first) and `FlockTask.attach(chain, address)` joins an existing one; every contract
function is a typed method. The rules live in FlockTask.vy's header; in short, per round:
participants commit and reveal seeds, `draw_roles` picks proposers and voters, proposers commit
then reveal the sha2-256 digest of their update's CID, voters commit then reveal one ballot with
a verdict per proposal, and `finalize` judges each proposal (one ballot, one vote), pays at
fixed rates and burns the rest and every slash.

The parameters a task is created with, their checks and the phase windows' sizing are in
`covey.flock.params`. On a real chain each phase-bound method first checks, with
`chain.margin_blocks` to spare, that the block its transaction will land in is still in the
phase (`PhaseError` otherwise), and `wait_for_phase` waits for the next one; on the embedded
chain it mines to it instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Any

from eth_utils.address import to_checksum_address

from covey.errors import ConfigError
from covey.flock.chain import (
    BoundContract,
    Chain,
    ChainError,
    TxResult,
    contract_address,
)
from covey.flock.params import TOKEN_UNIT, TaskParams, Timing, validate_endpoint


class Phase(IntEnum):
    """FlockTask.phase(): what can be called now."""

    REGISTRATION = 0
    AWAIT_START = 1
    SEED_COMMIT = 2
    SEED_REVEAL = 3
    AWAIT_DRAW = 4
    PROPOSE_COMMIT = 5
    PROPOSE_REVEAL = 6
    VOTE_COMMIT = 7
    VOTE_REVEAL = 8
    AWAIT_FINALIZE = 9
    ENDED = 10
    CANCELLED = 11
    STALLED = 12  # a due start/draw_roles/finalize was not called within timeout_blocks


AWAITING = (Phase.AWAIT_START, Phase.AWAIT_DRAW, Phase.AWAIT_FINALIZE)


class Role(IntEnum):
    NONE = 0
    PROPOSER = 1
    VOTER = 2


class Outcome(IntEnum):
    PENDING = 0
    ACCEPTED = 1
    REJECTED = 2
    NO_PROPOSALS = 3
    NO_QUORUM = 4  # no valid proposal got a decided verdict
    VOID = 5  # too few seed revealers to draw the roles


class SlashReason(IntEnum):
    SEED_NOT_COMMITTED = 1
    SEED_NOT_REVEALED = 2
    NO_PROPOSAL = 3
    DUPLICATE_PROPOSAL = 4
    PROPOSAL_REJECTED = 5
    VOTE_NOT_REVEALED = 6
    LOSING_VOTE = 7
    EXIT = 8  # left with exit() before the task was over


@dataclass(frozen=True)
class ProposalStatus:
    commitment: bytes
    digest: bytes  # zero until revealed
    valid: bool  # revealed and not a duplicate of an earlier commitment


@dataclass(frozen=True)
class Vote:
    commitment: bytes
    weight: int  # 1: every ballot weighs the same
    revealed: bool
    accepts: int  # bit i: accept the proposal of proposers_of(round)[i]


@dataclass(frozen=True)
class Tally:
    committed_weight: int  # the ballots every proposal is judged against
    revealed_weight: int
    committed_count: int
    revealed_count: int


@dataclass(frozen=True)
class RoundResult:
    outcome: Outcome
    reward: int  # the round's budget (TaskParams.round_budget)
    paid: int  # rewards credited in the round; reward - paid was burned
    slashed: int  # all the round's slashes, the draw's included (burned)
    accepted: int  # bit i: the proposal of proposers_of(round)[i] was accepted
    rejected: int  # bit i: it was rejected (neither: undecided, or not a valid proposal)

    def accepted_proposers(self, proposers: list[str]) -> list[str]:
        """The proposers (from `FlockTask.proposers_of(round)`) whose proposal was accepted."""
        return [p for i, p in enumerate(proposers) if self.accepted >> i & 1]


class PhaseError(ChainError):
    """A transaction would land outside its phase, or too close to the window's end."""


class Token(BoundContract):
    """An ERC-20 (Covey's Token, or any token the task was created with)."""

    artifact = "Token"

    @classmethod
    def deploy(
        cls,
        chain: Chain,
        supply: int = 1_000_000 * TOKEN_UNIT,
        *,
        name: str = "Covey Stake",
        symbol: str = "COVEY",
        sender: str | None = None,
    ) -> Token:
        """Deploy Covey's fixed-supply ERC-20; the whole supply goes to the sender."""
        constructor = chain.factory("Token").constructor(name, symbol, supply)
        receipt = chain.send("deploy Token", constructor, sender)
        return cls(chain, str(receipt["contractAddress"]))

    @classmethod
    def attach(cls, chain: Chain, address: str) -> Token:
        """A deployed ERC-20 (Covey's Token or any other)."""
        return cls(chain, chain.require_code(address, "ERC-20 token"))

    def name(self) -> str:
        return str(self.call("name"))

    def symbol(self) -> str:
        return str(self.call("symbol"))

    def decimals(self) -> int:
        return int(self.call("decimals"))

    def balance_of(self, who: str) -> int:
        return int(self.call("balanceOf", to_checksum_address(who)))

    def allowance(self, owner: str, spender: str) -> int:
        return int(self.call("allowance", to_checksum_address(owner), to_checksum_address(spender)))

    def transfer(self, to: str, amount: int, *, sender: str | None = None) -> TxResult:
        return self.transact("transfer", to_checksum_address(to), amount, sender=sender)

    def approve(self, spender: str, amount: int, *, sender: str | None = None) -> TxResult:
        return self.transact("approve", to_checksum_address(spender), amount, sender=sender)


class FlockTask(BoundContract):
    """A deployed FlockTask: one typed method per contract function."""

    artifact = "FlockTask"

    def __init__(self, chain: Chain, address: str, *, params: TaskParams | None = None) -> None:
        super().__init__(chain, address)
        if params is not None:
            self.__dict__["params"] = params

    @classmethod
    def deploy(
        cls,
        chain: Chain,
        token: Token,
        params: TaskParams,
        task_bundle: bytes,
        *,
        sender: str | None = None,
        timing: Timing | None = None,
    ) -> FlockTask:
        """Create a task: approve the reward pool to its future address, then deploy it.

        `task_bundle` is the sha2-256 digest of the task bundle's CID
        (`covey.store.cid.digest_of`). With `timing`, windows too short for it are refused
        before anything is sent. The constructor pulls the pool with transferFrom, so the
        deployer must hold it.
        """
        params.validate()
        if timing is not None:
            params.check_windows(timing)
        if len(task_bundle) != 32 or not any(task_bundle):
            raise ConfigError("task_bundle must be the 32-byte sha2-256 digest of a CID")
        origin = to_checksum_address(sender) if sender else chain.default_account
        nonce = int(chain.w3.eth.get_transaction_count(origin, "pending"))
        if params.reward_pool > 0:
            token.approve(contract_address(origin, nonce + 1), params.reward_pool, sender=origin)
            if int(chain.w3.eth.get_transaction_count(origin, "pending")) != nonce + 1:
                raise ChainError(f"{origin} sent another transaction while deploying; deploy again")
        constructor = chain.factory("FlockTask").constructor(
            token.address, params.as_tuple(), task_bundle
        )
        receipt = chain.send("deploy FlockTask", constructor, origin)
        return cls(chain, str(receipt["contractAddress"]), params=params)

    @classmethod
    def attach(cls, chain: Chain, address: str) -> FlockTask:
        """A deployed FlockTask (its parameters are read once, on first use)."""
        return cls(chain, chain.require_code(address, "FlockTask"))

    # ---------------------------------------------------------------- immutables

    @cached_property
    def params(self) -> TaskParams:
        return TaskParams(*self.call("params"))

    @cached_property
    def token(self) -> Token:
        return Token(self.chain, str(self.call("token")))

    @cached_property
    def task_bundle(self) -> bytes:
        """The sha2-256 digest of the task bundle's CID (`covey.store.cid.cid_from_digest`)."""
        return bytes(self.call("task_bundle"))

    @cached_property
    def deployed_at(self) -> int:
        """The block the task was created in: where event scans start."""
        return int(self.call("deployed_at"))

    def creator(self) -> str:
        return str(self.call("creator"))

    def registration_end(self) -> int:
        return int(self.call("registration_end"))

    # ---------------------------------------------------------------- views

    def phase(self) -> Phase:
        """The phase at `chain.call_block` (the next block on the embedded chain)."""
        return Phase(self.call("phase"))

    def phase_at(self, block: int) -> tuple[Phase, int]:
        """The phase a transaction mined in `block` would see if no transition comes first,
        and the first block after that phase (0: it lasts until a call ends it)."""
        phase, end = self.call("phase_at", block)
        return Phase(phase), int(end)

    def phase_end(self) -> int:
        """The first block after the current phase; 0 for ENDED, CANCELLED and STALLED."""
        return self.phase_at(self.chain.next_block)[1]

    def current_round(self) -> int:
        return int(self.call("current_round"))

    def stage_start(self) -> int:
        return int(self.call("stage_start"))

    def pool(self) -> int:
        """Budgets of rounds not settled yet and keeper fees not paid yet."""
        return int(self.call("pool"))

    def burned(self) -> int:
        """Every slash and every reward a round did not pay: locked in the contract for good."""
        return int(self.call("burned"))

    def round_budget(self) -> int:
        return int(self.call("round_budget"))

    def beacon_block(self) -> int:
        """The block whose hash the current round's draw mixes in (0 outside seeding)."""
        return int(self.call("beacon_block"))

    def total_staked(self) -> int:
        return int(self.call("total_staked"))

    def total_unclaimed(self) -> int:
        return int(self.call("total_unclaimed"))

    def participants(self) -> list[str]:
        return [str(a) for a in self.call("get_participants")]

    def participant_count(self) -> int:
        return int(self.call("participant_count"))

    def joined(self, who: str) -> bool:
        return bool(self.call("joined", to_checksum_address(who)))

    def stake_of(self, who: str) -> int:
        return int(self.call("stakes", to_checksum_address(who)))

    def reward_of(self, who: str) -> int:
        """Credited and not yet claimed: rewards, keeper fees, an eviction refund."""
        return int(self.call("rewards", to_checksum_address(who)))

    def endpoint_of(self, who: str) -> str:
        """The URL where `who` serves its blobs ("" if none)."""
        return str(self.call("endpoints", to_checksum_address(who)))

    def missed_rounds(self, who: str) -> int:
        return int(self.call("missed_rounds", to_checksum_address(who)))

    def seed_status(self, round_: int, who: str) -> tuple[bytes, bool]:
        commitment, revealed = self.call("seed_status", round_, to_checksum_address(who))
        return bytes(commitment), bool(revealed)

    def round_seed(self, round_: int) -> bytes:
        return bytes(self.call("round_seed", round_))

    def role_of(self, round_: int, who: str) -> Role:
        return Role(self.call("role_of", round_, to_checksum_address(who)))

    def proposers_of(self, round_: int) -> list[str]:
        return [str(a) for a in self.call("proposers_of", round_)]

    def voters_of(self, round_: int) -> list[str]:
        return [str(a) for a in self.call("voters_of", round_)]

    def proposal_of(self, round_: int, who: str) -> ProposalStatus:
        commitment, digest, valid = self.call("proposal_of", round_, to_checksum_address(who))
        return ProposalStatus(bytes(commitment), bytes(digest), bool(valid))

    def proposals(self, round_: int) -> list[tuple[str, bytes]]:
        """(proposer, digest) of each valid proposal of the round, in draw order."""
        who, digests = self.call("proposals", round_)
        return [(str(a), bytes(d)) for a, d in zip(who, digests, strict=True)]

    def proposal_count(self, round_: int) -> int:
        """Valid proposals (revealed, not duplicates) in the round."""
        return int(self.call("proposal_count", round_))

    def vote_of(self, round_: int, who: str) -> Vote:
        commitment, weight, revealed, accepts = self.call(
            "vote_of", round_, to_checksum_address(who)
        )
        return Vote(bytes(commitment), int(weight), bool(revealed), int(accepts))

    def tally(self, round_: int) -> Tally:
        return Tally(*(int(x) for x in self.call("tally", round_)))

    def result(self, round_: int) -> RoundResult:
        outcome, *amounts = self.call("result", round_)
        return RoundResult(Outcome(outcome), *(int(a) for a in amounts))

    def events(
        self, name: str, from_block: int | None = None, to_block: int | None = None
    ) -> list[dict[str, Any]]:
        """Every `name` event since `from_block` (default: the task's deployment block)."""
        start = self.deployed_at if from_block is None else from_block
        return super().events(name, start, to_block)

    # ---------------------------------------------------------------- transactions

    def _act(
        self, name: str, phases: tuple[Phase, ...], *args: Any, sender: str | None
    ) -> TxResult:
        if self.chain.margin_blocks:
            self.check_phase(name, phases)
        return self.transact(name, *args, sender=sender)

    def join(
        self, endpoint: str = "", *, sender: str | None = None, approve: bool = True
    ) -> TxResult:
        """Stake the task's `stake` and register with the URL where blobs are served; approves
        the task for it first unless told not to. Open in REGISTRATION, and in SEED_COMMIT
        while a slot is free."""
        validate_endpoint(endpoint)
        who = to_checksum_address(sender) if sender else self.chain.default_account
        amount = self.params.stake
        if approve and self.token.allowance(who, self.address) < amount:
            self.token.approve(self.address, amount, sender=who)
        phases = (Phase.REGISTRATION, Phase.SEED_COMMIT)
        return self._act("join", phases, endpoint, sender=who)

    def set_endpoint(self, endpoint: str, *, sender: str | None = None) -> TxResult:
        return self.transact("set_endpoint", validate_endpoint(endpoint), sender=sender)

    def start(self, *, sender: str | None = None) -> TxResult:
        return self._act("start", (Phase.AWAIT_START,), sender=sender)

    def commit_seed(self, commitment: bytes, *, sender: str | None = None) -> TxResult:
        """Commit `commitments.seed_commitment(seed, sender)`."""
        return self._act("commit_seed", (Phase.SEED_COMMIT,), commitment, sender=sender)

    def reveal_seed(self, seed: bytes, *, sender: str | None = None) -> TxResult:
        """Reveal the round's seed; the reveal window's last block (the beacon) takes none."""
        if self.chain.margin_blocks:
            beacon = self.beacon_block() or None  # 0 outside seeding: the phase check says why
            self.check_phase("reveal_seed", (Phase.SEED_REVEAL,), before=beacon)
        return self.transact("reveal_seed", seed, sender=sender)

    def draw_roles(self, *, sender: str | None = None) -> TxResult:
        return self._act("draw_roles", (Phase.AWAIT_DRAW,), sender=sender)

    def commit_proposal(self, commitment: bytes, *, sender: str | None = None) -> TxResult:
        """Commit `commitments.proposal_commitment(digest, salt, sender)`; publish the update
        only once PROPOSE_COMMIT has closed."""
        phases = (Phase.PROPOSE_COMMIT,)
        return self._act("commit_proposal", phases, commitment, sender=sender)

    def reveal_proposal(self, digest: bytes, salt: bytes, *, sender: str | None = None) -> TxResult:
        """Open the proposal: the sha2-256 digest of the update's CID and the commitment's salt."""
        phases = (Phase.PROPOSE_REVEAL,)
        return self._act("reveal_proposal", phases, digest, salt, sender=sender)

    def commit_vote(self, commitment: bytes, *, sender: str | None = None) -> TxResult:
        """Commit `commitments.vote_commitment(accepts, salt, sender)`."""
        return self._act("commit_vote", (Phase.VOTE_COMMIT,), commitment, sender=sender)

    def reveal_vote(self, accepts: int, salt: bytes, *, sender: str | None = None) -> TxResult:
        """Open a ballot: bit i of `accepts` judges the proposal of proposers_of(round)[i]."""
        return self._act("reveal_vote", (Phase.VOTE_REVEAL,), accepts, salt, sender=sender)

    def finalize(self, *, sender: str | None = None) -> TxResult:
        return self._act("finalize", (Phase.AWAIT_FINALIZE,), sender=sender)

    def claim(self, *, sender: str | None = None) -> TxResult:
        return self.transact("claim", sender=sender)

    def withdraw(self, *, sender: str | None = None) -> TxResult:
        return self.transact("withdraw", sender=sender)

    def exit(self, *, sender: str | None = None) -> TxResult:
        return self.transact("exit", sender=sender)

    def reclaim_pool(self, *, sender: str | None = None) -> TxResult:
        return self.transact("reclaim_pool", sender=sender)

    # ---------------------------------------------------------------- timing

    def check_phase(
        self, function: str, phases: tuple[Phase, ...], *, before: int | None = None
    ) -> None:
        """PhaseError unless the latest block and the block `chain.margin_blocks` after the
        next one are both in one of `phases` (windows are contiguous: so is every block
        between), i.e. a transaction sent now lands in the phase with blocks to spare; with
        `before`, that block must also come before block `before`."""
        latest = self.chain.block_number
        margin = self.chain.margin_blocks
        now, _ = self.phase_at(latest)
        later, end = self.phase_at(latest + 1 + margin)
        if now in phases and later in phases:
            if before is None or latest + 1 + margin < before:
                return
            raise PhaseError(
                f"{function} must land before block {before}: block {latest + 1 + margin} would"
                " not; wait_for_phase() waits for the next window"
            )
        wanted = " or ".join(p.name for p in phases)
        raise PhaseError(
            f"{function} needs {wanted} with {margin} block(s) to spare: block {latest} is in"
            f" {now.name}, block {latest + 1 + margin} would be in {later.name}"
            + (f" (that phase ends at block {end})" if end else "")
            + "; wait_for_phase() waits for the next window"
        )

    def wait_for_phase(
        self, phase: Phase, *, timeout_s: float = 600.0, poll_s: float = 0.5
    ) -> None:
        """Return once a transaction sent now lands in `phase` with `chain.margin_blocks` to
        spare. The embedded chain mines to it (`advance_to_phase`); a real one is polled, so a
        phase after start/draw_roles/finalize needs someone to call them."""
        if self.chain.is_embedded:
            self.advance_to_phase(phase)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.check_phase("wait_for_phase", (phase,))
                return
            except PhaseError:
                if time.monotonic() > deadline:
                    raise ChainError(
                        f"phase {phase.name} not reached within {timeout_s:.0f} s (now"
                        f" {self.phase_at(self.chain.block_number)[0].name})"
                    ) from None
            time.sleep(poll_s)

    def advance_to_phase(self, phase: Phase) -> None:
        """Mine until the next transaction lands in `phase` (embedded chain).

        Only timed phases are reached by mining (and STALLED, past an AWAIT_* phase):
        ChainError if start, draw_roles or finalize must come first, or if `phase` is behind.
        """
        current, end = self.phase_at(self.chain.next_block)
        start = current
        while current != phase:
            if not end or (current in AWAITING and phase != Phase.STALLED):
                raise ChainError(f"cannot mine from phase {start.name} to {phase.name}")
            self.chain.advance_to(end)
            current, end = self.phase_at(self.chain.next_block)
