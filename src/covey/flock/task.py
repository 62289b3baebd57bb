"""The FLock task contract and its token, as typed Python: parameters, phases, calls.

`FlockTask.deploy(chain, token, params, task_bundle)` creates a task (approving the reward
pool first) and `FlockTask.attach(chain, address)` joins an existing one; every contract
function is a typed method. The rules live in FlockTask.vy's header; in short, per round:
participants commit and reveal seeds, `draw_roles` picks proposers and voters, proposers commit
then reveal the sha2-256 digest of their update's CID, voters commit then reveal one ballot with
a verdict per proposal, and `finalize` judges each proposal (one ballot, one vote), pays at
fixed rates and burns the rest and every slash.

Phase windows are counted in blocks. `phase_windows(Timing(...), participants)` sizes them from
the chain's block time, the expected training and judging time and the transactions each window
must carry; `TaskParams.check_windows` refuses windows too short for a given timing. On a real
chain each phase-bound method first checks, with `chain.margin_blocks` to spare, that the block
its transaction will land in is still in the phase (`PhaseError` otherwise), and
`wait_for_phase` waits for the next one; on the embedded chain it mines to it instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import astuple, dataclass, fields
from enum import IntEnum
from functools import cached_property
from typing import Any

from eth_utils.address import to_checksum_address

from covey.errors import ConfigError
from covey.flock.chain import (
    EMBEDDED_BLOCK_TIME_S,
    BoundContract,
    Chain,
    ChainError,
    TxResult,
    contract_address,
)
from covey.store.endpoints import endpoint_problem

TOKEN_UNIT = 10**18  # the token has 18 decimals: 10 tokens are 10 * TOKEN_UNIT
MAX_PARTICIPANTS = 64  # FlockTask.vy's hard caps, checked again here for clear errors
MAX_STAKE = 2**96
MAX_POOL = 2**96
MAX_ROUNDS = 10_000
MAX_TIMEOUT_BLOCKS = 255
MAX_KEEPER_PCT = 5  # every transition's keeper fee together, as a share of the reward pool


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
class Timing:
    """What the phase windows must fit: the chain's pace and the task's work, in seconds."""

    block_time_s: float
    """Seconds per block (12 on Ethereum mainnet; anvil's --block-time)."""
    train_s: float
    """A proposer's local training, which happens in PROPOSE_COMMIT."""
    judge_s: float | None = None
    """A voter fetching and scoring every proposal, in VOTE_COMMIT; None: as long as train_s."""
    tx_s: float = 30.0
    """Sending one transaction and seeing it mined, on a busy node."""
    txs_per_block: int = 50
    """The task's transactions one block carries (1 on the embedded chain)."""


EMBEDDED_TIMING = Timing(block_time_s=EMBEDDED_BLOCK_TIME_S, train_s=0.0, tx_s=0.0, txs_per_block=1)
"""The embedded chain: a block per transaction, and no block passes while anyone trains."""

WINDOWS = (
    "registration_blocks",
    "seed_commit_blocks",
    "seed_reveal_blocks",
    "propose_commit_blocks",
    "propose_reveal_blocks",
    "vote_commit_blocks",
    "vote_reveal_blocks",
)


def phase_windows(timing: Timing, participants: int, margin: float = 2.0) -> dict[str, int]:
    """Window lengths in blocks (TaskParams fields) that fit the work of `participants`.

    A window must hold, `margin` times over, both the time its work takes (training for
    PROPOSE_COMMIT, judging for VOTE_COMMIT, one transaction for the others, two at
    registration: approve then join) in blocks of `block_time_s`, and one transaction per
    participant (two at registration) at `txs_per_block`; plus the block that opens it (and
    SEED_REVEAL the beacon block at its end, which takes no reveals).
    timeout_blocks, how long a due start/draw_roles/finalize may wait before the task stalls,
    is the longest window, at most 255.
    """
    if timing.block_time_s <= 0 or timing.txs_per_block < 1 or participants < 1 or margin < 1:
        raise ConfigError(
            "phase_windows needs block_time_s > 0, txs_per_block >= 1, participants >= 1 and"
            " margin >= 1"
        )
    judge_s = timing.train_s if timing.judge_s is None else timing.judge_s

    def blocks(seconds: float, txs: int) -> int:
        need = max(seconds / timing.block_time_s, txs / timing.txs_per_block)
        return math.ceil(margin * need) + 1

    tx = timing.tx_s
    windows = {
        "registration_blocks": blocks(2 * tx, 2 * participants),
        "seed_commit_blocks": blocks(tx, participants),
        "seed_reveal_blocks": blocks(tx, participants) + 1,  # + the beacon block
        "propose_commit_blocks": blocks(timing.train_s + tx, participants),
        "propose_reveal_blocks": blocks(tx, participants),
        "vote_commit_blocks": blocks(judge_s + tx, participants),
        "vote_reveal_blocks": blocks(tx, participants),
    }
    windows["timeout_blocks"] = min(MAX_TIMEOUT_BLOCKS, max(windows.values()))
    return windows


@dataclass(frozen=True)
class TaskParams:
    """A task's creation parameters, in the contract's `Params` order (amounts in token wei).

    The defaults follow FLock's demo: a 10-token stake, a 1000-token reward pool.
    """

    rounds: int = 3
    min_participants: int = 4
    max_participants: int = 16
    stake: int = 10 * TOKEN_UNIT
    """What every participant stakes, exactly: one member, one stake, one vote."""
    reward_pool: int = 1000 * TOKEN_UNIT
    proposers_per_round: int = 1
    voters_per_round: int = 3
    slash_pct: int = 10
    """Lost for a rejected proposal or a losing vote (a voter: the share it got wrong)."""
    no_show_pct: int = 20
    """Lost for a missed duty (seed, proposal, vote); must exceed slash_pct."""
    threshold_pct: int = 50
    """A proposal is accepted when more than this share of the committed ballots accept it,
    rejected when more than the rest reject it; a tie decides nothing."""
    voter_reward_pct: int = 20
    keeper_fee: int = TOKEN_UNIT // 10
    """Paid from the pool to whoever calls start, draw_roles or finalize; all of them together
    at most 5% of the pool."""
    max_missed_rounds: int = 2
    """A participant that misses a duty in this many rounds is evicted."""
    registration_blocks: int = 20
    seed_commit_blocks: int = 10
    seed_reveal_blocks: int = 10
    """Its last block is the beacon block: it takes no reveals."""
    propose_commit_blocks: int = 10
    propose_reveal_blocks: int = 10
    vote_commit_blocks: int = 10
    vote_reveal_blocks: int = 10
    timeout_blocks: int = 100

    def validate(self) -> None:
        """The constructor's checks, so a bad setting fails here with a flag-level message."""
        problems = [f"{f.name} must be >= 0" for f in fields(self) if getattr(self, f.name) < 0]
        if not 1 <= self.rounds <= MAX_ROUNDS:
            problems.append(f"rounds must be in 1..{MAX_ROUNDS}")
        if self.max_participants > MAX_PARTICIPANTS:
            problems.append(f"max_participants is capped at {MAX_PARTICIPANTS}")
        if self.min_participants > self.max_participants:
            problems.append("min_participants must not exceed max_participants")
        if self.proposers_per_round < 1 or self.voters_per_round < 1:
            problems.append("each round needs at least one proposer and one voter")
        if self.proposers_per_round + self.voters_per_round > self.min_participants:
            problems.append("proposers_per_round + voters_per_round must be <= min_participants")
        if not 1 <= self.stake <= MAX_STAKE:
            problems.append("stake must be in 1..2**96 wei")
        if self.reward_pool > MAX_POOL:
            problems.append("reward_pool is capped at 2**96 wei")
        if not self.slash_pct < self.no_show_pct <= 100:
            problems.append("need slash_pct < no_show_pct <= 100 (not acting must cost more)")
        if not 1 <= self.threshold_pct <= 99:
            problems.append("threshold_pct must be in 1..99 (a share that must be exceeded)")
        if self.voter_reward_pct > 100:
            problems.append("voter_reward_pct is a percentage (0..100)")
        if self.keeper_fee * (1 + 2 * self.rounds) * 100 > self.reward_pool * MAX_KEEPER_PCT:
            most = self.reward_pool * MAX_KEEPER_PCT // (100 * (1 + 2 * self.rounds))
            problems.append(
                f"keeper_fee x (1 + 2 x rounds) transitions must be at most {MAX_KEEPER_PCT}% of"
                f" reward_pool (keeper_fee at most {most} wei)"
            )
        if self.max_missed_rounds < 1:
            problems.append("max_missed_rounds must be at least 1")
        problems += [f"{name} must be at least 1" for name in WINDOWS if getattr(self, name) < 1]
        if self.seed_reveal_blocks == 1:
            problems.append("seed_reveal_blocks must be at least 2 (its last is the beacon block)")
        if not 1 <= self.timeout_blocks <= MAX_TIMEOUT_BLOCKS:
            problems.append(f"timeout_blocks must be in 1..{MAX_TIMEOUT_BLOCKS}")
        if problems:
            raise ConfigError("invalid task parameters: " + "; ".join(problems))

    def check_windows(self, timing: Timing) -> None:
        """ConfigError naming every window too short for `timing` at max_participants, even
        with no margin; the fix: `replace(params, **phase_windows(timing, participants))`."""
        floor = phase_windows(timing, self.max_participants, margin=1.0)
        short = [
            f"{name} = {getattr(self, name)} < {need}"
            for name, need in floor.items()
            if getattr(self, name) < need
        ]
        if short:
            raise ConfigError(
                f"phase windows too short for {self.max_participants} participants at"
                f" {timing.block_time_s} s per block and {timing.train_s} s of training: "
                + ", ".join(short)
                + "; size them with covey.flock.task.phase_windows"
            )

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)

    @property
    def round_budget(self) -> int:
        """Every round's reward: the pool after setting aside every transition's keeper fee,
        over the rounds (as the contract computes it)."""
        return (self.reward_pool - self.keeper_fee * (1 + 2 * self.rounds)) // self.rounds


def validate_endpoint(endpoint: str) -> str:
    """Where a participant serves blobs, `http(s)://host[:port]` of at most 256 bytes (no path,
    query, fragment or user info: `covey.store.endpoints.endpoint_problem`), or "" for none;
    ConfigError otherwise. Which addresses peers will connect to is checked when they fetch."""
    if endpoint == "":
        return endpoint
    problem = endpoint_problem(endpoint)
    if problem:
        raise ConfigError(
            f"endpoint {endpoint[:300]!r}: {problem}; expected http(s)://host[:port] such as "
            "http://203.0.113.5:8091"
        )
    return endpoint


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
