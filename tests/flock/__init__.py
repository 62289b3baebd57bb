"""Helpers shared by the FLock-mode tests: a funded embedded chain and round drivers.

Tests import `World` and the drivers from here; every test starts from a snapshot of one
module-scoped chain, so the slow parts (chain start, token deploy, funding) happen once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from covey.flock.chain import Chain, TxResult
from covey.flock.commitments import proposal_commitment, seed_commitment, vote_commitment
from covey.flock.params import TOKEN_UNIT, TaskParams
from covey.flock.task import FlockTask, Phase, Token

FUNDS = 10_000 * TOKEN_UNIT  # what each participant account gets at the start
BUNDLE = hashlib.sha256(b"covey test task bundle").digest()  # stands in for a CID's digest

# small and fast: 1 proposer, 2 voters, short windows (each transaction mines one block), no
# keeper fee and three misses before eviction, so that settlement tests count only their subject
SMALL = TaskParams(
    rounds=2,
    min_participants=3,
    max_participants=8,
    stake=10 * TOKEN_UNIT,
    reward_pool=1000 * TOKEN_UNIT,
    proposers_per_round=1,
    voters_per_round=2,
    slash_pct=10,
    no_show_pct=20,
    threshold_pct=50,
    voter_reward_pct=20,
    keeper_fee=0,
    max_missed_rounds=3,
    registration_blocks=40,
    seed_commit_blocks=12,
    seed_reveal_blocks=12,
    propose_commit_blocks=8,
    propose_reveal_blocks=8,
    vote_commit_blocks=8,
    vote_reveal_blocks=8,
    timeout_blocks=30,
)


@dataclass
class World:
    """One embedded chain: the token, its deployer (the task creator) and funded accounts."""

    chain: Chain
    token: Token
    creator: str
    people: list[str]
    snapshot: int = 0

    @classmethod
    def create(cls, accounts: int = 12) -> World:
        chain = Chain.embedded(accounts=accounts)
        creator, *people = chain.accounts
        token = Token.deploy(chain, 10_000_000 * TOKEN_UNIT, sender=creator)
        for who in people:
            token.transfer(who, FUNDS, sender=creator)
        world = cls(chain, token, creator, people)
        world.snapshot = chain.snapshot()
        return world

    def reset(self) -> None:
        self.chain.revert(self.snapshot)
        self.chain.gas.clear()

    def task(self, params: TaskParams = SMALL, **changes: int) -> FlockTask:
        params = replace(params, **changes)
        return FlockTask.deploy(self.chain, self.token, params, BUNDLE, sender=self.creator)


def fixed_seed(round_: int, who: str) -> bytes:
    """A deterministic seed, so that role draws (and so the tests) are reproducible."""
    return keccak(f"seed/{round_}/{who}".encode())


def fixed_salt(round_: int, who: str) -> bytes:
    return keccak(f"salt/{round_}/{who}".encode())


def digest_of(text: str) -> bytes:
    return keccak(f"cid/{text}".encode())


def update_digest(round_: int, who: str) -> bytes:
    """The digest a proposer proposes in the drivers below."""
    return digest_of(f"{round_}/{who}")


@dataclass
class RoundPlan:
    """Who does what in one round; every field defaults to 'everyone behaves'."""

    withhold_seed: set[str] = field(default_factory=set)
    skip_seed: set[str] = field(default_factory=set)
    skip_propose: set[str] = field(default_factory=set)
    withhold_proposal: set[str] = field(default_factory=set)
    votes: Mapping[str, bool | int] | None = None
    """voter -> verdicts, a bit mask over the round's proposers or a bool for all of them;
    None: everyone accepts everything."""
    skip_vote_commit: set[str] = field(default_factory=set)
    skip_vote_reveal: set[str] = field(default_factory=set)


def join_all(task: FlockTask, people: Iterable[str]) -> None:
    """Everyone joins, each staking the task's `stake` (no endpoint)."""
    for who in people:
        task.join(sender=who)


def start(task: FlockTask) -> TxResult:
    task.advance_to_phase(Phase.AWAIT_START)
    return task.start()


def seed_and_draw(
    task: FlockTask, members: Iterable[str], plan: RoundPlan | None = None
) -> TxResult:
    """SEED_COMMIT -> draw_roles for the current round."""
    plan = plan or RoundPlan()
    r = task.current_round()
    members = [m for m in members if m not in plan.skip_seed]
    for who in members:
        task.commit_seed(seed_commitment(fixed_seed(r, who), who), sender=who)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for who in members:
        if who not in plan.withhold_seed:
            task.reveal_seed(fixed_seed(r, who), sender=who)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    return task.draw_roles()


def propose(task: FlockTask, plan: RoundPlan | None = None) -> None:
    """PROPOSE_COMMIT -> PROPOSE_REVEAL: each proposer commits, then reveals, its digest."""
    plan = plan or RoundPlan()
    r = task.current_round()
    proposers = [p for p in task.proposers_of(r) if p not in plan.skip_propose]
    for who in proposers:
        commitment = proposal_commitment(update_digest(r, who), fixed_salt(r, who), who)
        task.commit_proposal(commitment, sender=who)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    for who in proposers:
        if who not in plan.withhold_proposal:
            task.reveal_proposal(update_digest(r, who), fixed_salt(r, who), sender=who)


def vote(task: FlockTask, plan: RoundPlan | None = None) -> None:
    """VOTE_COMMIT -> VOTE_REVEAL, when there is a valid proposal to vote on."""
    plan = plan or RoundPlan()
    r = task.current_round()
    if not task.proposal_count(r):
        return
    every = (1 << len(task.proposers_of(r))) - 1
    votes = plan.votes if plan.votes is not None else dict.fromkeys(task.voters_of(r), True)
    masks = {
        who: every if accept is True else 0 if accept is False else accept
        for who, accept in votes.items()
    }
    task.advance_to_phase(Phase.VOTE_COMMIT)
    for who, mask in masks.items():
        if who not in plan.skip_vote_commit:
            task.commit_vote(vote_commitment(mask, fixed_salt(r, who), who), sender=who)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    for who, mask in masks.items():
        if who not in plan.skip_vote_commit | plan.skip_vote_reveal:
            task.reveal_vote(mask, fixed_salt(r, who), sender=who)


def propose_and_vote(task: FlockTask, plan: RoundPlan | None = None) -> TxResult:
    """PROPOSE_COMMIT -> finalize for the current round (roles already drawn)."""
    propose(task, plan)
    vote(task, plan)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    return task.finalize()


def play_round(task: FlockTask, members: Iterable[str], plan: RoundPlan | None = None) -> TxResult:
    seed_and_draw(task, members, plan)
    return propose_and_vote(task, plan)


def beacon_block(task: FlockTask, round_: int) -> int:
    """The last block of the round's SEED_REVEAL window (it takes no reveals), whose hash the
    draw mixes in."""
    (started,) = [e for e in task.events("RoundStarted") if e["round"] == round_]
    p = task.params
    return int(started["start_block"]) + p.seed_commit_blocks + p.seed_reveal_blocks - 1


def draw_in_python(
    task: FlockTask,
    round_: int,
    revealed: list[str],
    *,
    seeds: Mapping[str, bytes] | None = None,
    block: int | None = None,
) -> tuple[list[str], list[str]]:
    """The contract's documented draw, redone off chain: XOR of the seeds (default: the
    drivers' `fixed_seed`s) and the hash of `block` (default: the round's beacon block), then a
    partial Fisher-Yates shuffle of the revealers."""
    xor = 0
    for who in revealed:
        seed = fixed_seed(round_, who) if seeds is None else seeds[who]
        xor ^= int.from_bytes(seed, "big")
    block = beacon_block(task, round_) if block is None else block
    block_hash = bytes(task.chain.w3.eth.get_block(block)["hash"])
    seed = keccak(
        abi_encode(
            ["uint256", "bytes32", "uint256", "address"], [xor, block_hash, round_, task.address]
        )
    )
    eligible = list(revealed)
    p = task.params
    need = p.proposers_per_round + p.voters_per_round
    for i in range(need):
        rnd = int.from_bytes(keccak(abi_encode(["bytes32", "uint256"], [seed, i])), "big")
        j = i + rnd % (len(eligible) - i)
        eligible[i], eligible[j] = eligible[j], eligible[i]
    return eligible[: p.proposers_per_round], eligible[p.proposers_per_round : need]


def contract_holdings(task: FlockTask) -> int:
    """What the task contract's books say it holds: stakes + pool + unclaimed credits + what
    was burned (locked in it for good)."""
    return task.total_staked() + task.pool() + task.total_unclaimed() + task.burned()
