"""A FLock task's creation parameters and their checks, before anything is sent to a chain.

`TaskParams` holds what `FlockTask.deploy` creates a task with, in the contract's `Params`
order, and `validate` repeats the contract constructor's checks so a bad setting fails with a
flag-level message. Phase windows are counted in blocks: `phase_windows(Timing(...),
participants)` sizes them from the chain's block time, the expected training and judging time
and the transactions each window must carry; `TaskParams.check_windows` refuses windows too
short for a given timing. `validate_endpoint` checks where a participant serves its blobs.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

from covey.errors import ConfigError
from covey.flock.chain import EMBEDDED_BLOCK_TIME_S
from covey.store.endpoints import endpoint_problem

TOKEN_UNIT = 10**18  # the token has 18 decimals: 10 tokens are 10 * TOKEN_UNIT
MAX_PARTICIPANTS = 64  # FlockTask.vy's hard caps, checked again here for clear errors
MAX_STAKE = 2**96
MAX_POOL = 2**96
MAX_ROUNDS = 10_000
MAX_TIMEOUT_BLOCKS = 255
MAX_KEEPER_PCT = 5  # every transition's keeper fee together, as a share of the reward pool


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
                + "; size them with covey.flock.params.phase_windows"
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
