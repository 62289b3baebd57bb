"""Helpers shared by the FLock-mode tests: a funded embedded chain and round drivers.

Tests import `World` and the drivers from here; every test starts from a snapshot of one
module-scoped chain, so the slow parts (chain start, token deploy, funding) happen once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from covey.flock.chain import (
    TOKEN_UNIT,
    Chain,
    FlockTask,
    Phase,
    TaskParams,
    Token,
    TxResult,
    seed_commitment,
    vote_commitment,
)

FUNDS = 10_000 * TOKEN_UNIT  # what each participant account gets at the start

# small and fast: 1 proposer, 2 voters, short windows (each transaction mines one block)
SMALL = TaskParams(
    rounds=2,
    min_participants=3,
    max_participants=8,
    min_stake=10 * TOKEN_UNIT,
    reward_pool=1000 * TOKEN_UNIT,
    proposers_per_round=1,
    voters_per_round=2,
    slash_pct=10,
    threshold_pct=50,
    voter_reward_pct=20,
    registration_blocks=40,
    seed_commit_blocks=12,
    seed_reveal_blocks=12,
    propose_blocks=8,
    vote_commit_blocks=8,
    vote_reveal_blocks=8,
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
        token = chain.deploy_token(10_000_000 * TOKEN_UNIT, sender=creator)
        for who in people:
            token.transfer(who, FUNDS, sender=creator)
        world = cls(chain, token, creator, people)
        world.snapshot = chain.snapshot()
        return world

    def reset(self) -> None:
        self.chain.revert(self.snapshot)
        self.chain.gas.clear()

    def task(self, params: TaskParams = SMALL, **changes: int) -> FlockTask:
        return self.chain.deploy_task(self.token, replace(params, **changes), sender=self.creator)


def fixed_seed(round_: int, who: str) -> bytes:
    """A deterministic seed, so that role draws (and so the tests) are reproducible."""
    return keccak(f"seed/{round_}/{who}".encode())


def fixed_salt(round_: int, who: str) -> bytes:
    return keccak(f"salt/{round_}/{who}".encode())


def digest_of(text: str) -> bytes:
    return keccak(f"cid/{text}".encode())


@dataclass
class RoundPlan:
    """Who does what in one round; every field defaults to 'everyone behaves'."""

    withhold_seed: set[str] = field(default_factory=set)
    skip_seed: set[str] = field(default_factory=set)
    skip_propose: set[str] = field(default_factory=set)
    votes: Mapping[str, tuple[bool | int, int]] | None = None
    """voter -> (verdicts, score), verdicts a bit mask over the round's proposers or a bool for
    all of them; None: everyone accepts everything."""
    skip_vote_commit: set[str] = field(default_factory=set)
    skip_vote_reveal: set[str] = field(default_factory=set)


def join_all(task: FlockTask, stakes: Mapping[str, int]) -> None:
    for who, amount in stakes.items():
        task.join(amount, sender=who)


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


def propose_and_vote(task: FlockTask, plan: RoundPlan | None = None) -> TxResult:
    """PROPOSE -> finalize for the current round (roles already drawn)."""
    plan = plan or RoundPlan()
    r = task.current_round()
    for who in task.proposers_of(r):
        if who not in plan.skip_propose:
            task.propose(digest_of(f"{r}/{who}"), sender=who)
    voters = task.voters_of(r)
    votes = plan.votes if plan.votes is not None else {v: (True, 900) for v in voters}
    every = (1 << len(task.proposers_of(r))) - 1
    masks = {
        who: (every if accept is True else 0 if accept is False else accept, score)
        for who, (accept, score) in votes.items()
    }
    if task.proposal_count(r):
        task.advance_to_phase(Phase.VOTE_COMMIT)
        for who, (mask, score) in masks.items():
            if who not in plan.skip_vote_commit:
                salt = fixed_salt(r, who)
                task.commit_vote(vote_commitment(mask, score, salt, who), sender=who)
        task.advance_to_phase(Phase.VOTE_REVEAL)
        for who, (mask, score) in masks.items():
            if who not in plan.skip_vote_commit | plan.skip_vote_reveal:
                task.reveal_vote(mask, score, fixed_salt(r, who), sender=who)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    return task.finalize()


def play_round(task: FlockTask, members: Iterable[str], plan: RoundPlan | None = None) -> TxResult:
    seed_and_draw(task, members, plan)
    return propose_and_vote(task, plan)


def draw_in_python(
    task: FlockTask, round_: int, revealed: list[str]
) -> tuple[list[str], list[str]]:
    """The contract's documented draw, redone off chain: XOR of seeds, then Fisher-Yates."""
    xor = 0
    for who in revealed:
        xor ^= int.from_bytes(fixed_seed(round_, who), "big")
    seed = keccak(abi_encode(["uint256", "uint256", "address"], [xor, round_, task.address]))
    eligible = list(revealed)
    p = task.params
    need = p.proposers_per_round + p.voters_per_round
    for i in range(need):
        rnd = int.from_bytes(keccak(abi_encode(["bytes32", "uint256"], [seed, i])), "big")
        j = i + rnd % (len(eligible) - i)
        eligible[i], eligible[j] = eligible[j], eligible[i]
    return eligible[: p.proposers_per_round], eligible[p.proposers_per_round : need]


def contract_holdings(task: FlockTask) -> int:
    """What the task contract's books say it holds: stakes + pool + unclaimed rewards."""
    return task.total_staked() + task.pool() + task.total_unclaimed()
