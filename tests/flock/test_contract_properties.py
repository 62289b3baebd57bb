"""Random call sequences against FlockTask (Hypothesis stateful testing) keep its invariants.

A small Python model predicts whether each call may succeed (phase, membership, commitments,
roles, balances); the contract must agree, call by call. Amounts are not predicted, they are
checked by bookkeeping from the events: after every step the contract holds exactly
stakes + pool + unclaimed rewards, tokens are conserved, and each account's wallet + stake +
unclaimed rewards equals its funds + rewards credited - slashes (so nobody takes out more than
stake plus earnings). Wrong-salt and other-address reveals and second votes are always refused.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from covey.flock.chain import (
    TOKEN_UNIT,
    ContractRevert,
    FlockTask,
    Phase,
    TxResult,
    seed_commitment,
    vote_commitment,
)
from tests.flock import FUNDS, SMALL, World, digest_of

pytestmark = [
    pytest.mark.chain,
    # py-evm changes the recursion limit while a test runs; Hypothesis notes it, harmlessly
    pytest.mark.filterwarnings("ignore:The recursion limit will not be reset"),
]

T = TOKEN_UNIT
PARAMS = replace(
    SMALL,
    rounds=2,
    min_participants=4,
    max_participants=5,
    # two voters (unequal stakes) judging two proposals: split verdicts, voters both paid and
    # partly slashed, ties settled by threshold_pct
    proposers_per_round=2,
    voters_per_round=2,
    registration_blocks=16,  # 6 people x (approve + join) fit, so the cap gets hit
    seed_commit_blocks=6,
    seed_reveal_blocks=6,
    propose_blocks=4,
    vote_commit_blocks=4,
    vote_reveal_blocks=4,
)
ALL_ACCEPT = (1 << PARAMS.proposers_per_round) - 1  # a ballot accepting every proposal
PEOPLE = 6  # one more than max_participants, so the cap gets hit

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World.create(accounts=PEOPLE + 1)
    return _world


STAKES = [9 * T, 10 * T, 25 * T]  # 9 is below min_stake
ACTIONS = [
    "mine",
    "join",
    "start",
    "commit_seed",
    "reveal_seed",
    "draw_roles",
    "propose",
    "commit_vote",
    "reveal_vote",
    "finalize",
    "claim",
    "withdraw",
    "exit",
    "reclaim_pool",
]
person = st.integers(min_value=0, max_value=PEOPLE - 1)


class FlockMachine(RuleBasedStateMachine):
    """One task per example; the model is rebuilt from the contract's events."""

    def __init__(self) -> None:
        super().__init__()
        self.w = world()
        self.w.reset()
        self.people = self.w.people[:PEOPLE]
        self.task: FlockTask = self.w.task(PARAMS)
        self.supply = sum(self.w.token.balance_of(p) for p in [self.w.creator, *self.people])
        self.supply += self.w.token.balance_of(self.task.address)
        self.reg_end = self.task.registration_end()
        self.stage = "registration"
        self.stage_start = 0
        self.round = 0
        self.pool = PARAMS.reward_pool
        self.members: list[str] = []
        self.ever_joined: set[str] = set()
        self.stake: dict[str, int] = dict.fromkeys(self.people, 0)
        self.unclaimed: dict[str, int] = dict.fromkeys(self.people, 0)
        self.credited: dict[str, int] = dict.fromkeys(self.people, 0)
        self.slashed: dict[str, int] = dict.fromkeys(self.people, 0)
        self.wallet: dict[str, int] = {p: self.w.token.balance_of(p) for p in self.people}
        self.done: set[str] = set()  # functions that succeeded at least once (for statistics)
        self.dirty = True  # a transaction succeeded since the books were last checked
        self.acted: set[tuple[int, Phase]] = set()  # (round, phase) where `advance` acted
        self.reset_round()

    def reset_round(self) -> None:
        self.seeds: dict[str, bytes] = {}
        self.revealed: set[str] = set()
        self.proposers: list[str] = []
        self.voters: list[str] = []
        self.proposed: set[str] = set()
        self.ballots: dict[str, tuple[int, int, bytes]] = {}
        self.opened: set[str] = set()

    # ------------------------------------------------------------ the model's phase

    def phase(self) -> Phase:
        """The phase the next transaction will see, from the model alone."""
        b = self.w.chain.next_block
        p = PARAMS
        if self.stage == "registration":
            return Phase.REGISTRATION if b < self.reg_end else Phase.AWAIT_START
        if self.stage == "seeding":
            off = b - self.stage_start
            if off < p.seed_commit_blocks:
                return Phase.SEED_COMMIT
            if off < p.seed_commit_blocks + p.seed_reveal_blocks:
                return Phase.SEED_REVEAL
            return Phase.AWAIT_DRAW
        if self.stage == "round":
            off = b - self.stage_start
            if off < p.propose_blocks:
                return Phase.PROPOSE
            if off < p.propose_blocks + p.vote_commit_blocks:
                return Phase.VOTE_COMMIT
            if off < p.propose_blocks + p.vote_commit_blocks + p.vote_reveal_blocks:
                return Phase.VOTE_REVEAL
            return Phase.AWAIT_FINALIZE
        return Phase.ENDED if self.stage == "ended" else Phase.CANCELLED

    def attempt(self, expect: bool, name: str, *args: object, **kwargs: object) -> None:
        """Call `name`; it must succeed exactly when the model says so."""
        fn = getattr(self.task, name)
        if expect:
            self.apply(fn(*args, **kwargs))
            self.done.add(name)
            self.dirty = True
        else:
            with pytest.raises(ContractRevert):
                fn(*args, **kwargs)

    def apply(self, result: TxResult) -> None:
        """Update the model from a successful transaction's events."""
        for ev in result.events:
            a = ev.args
            if ev.name == "Joined":
                who = a["participant"]
                self.members.append(who)
                self.ever_joined.add(who)
                self.stake[who] = a["amount"]
                self.wallet[who] -= a["amount"]
            elif ev.name == "TaskCancelled":
                self.stage = "cancelled"
            elif ev.name == "RoundStarted":
                self.stage, self.stage_start, self.round = "seeding", a["start_block"], a["round"]
                self.reset_round()
            elif ev.name == "RolesDrawn":
                self.stage, self.stage_start = "round", result.block
                self.proposers, self.voters = list(a["proposers"]), list(a["voters"])
            elif ev.name == "TaskEnded":
                self.stage = "ended"
                self.round = PARAMS.rounds
            elif ev.name == "Slashed":
                who = a["participant"]
                self.stake[who] -= a["amount"]
                self.slashed[who] += a["amount"]
                self.pool += a["amount"]
            elif ev.name == "Rewarded":
                who = a["participant"]
                self.unclaimed[who] += a["amount"]
                self.credited[who] += a["amount"]
                self.pool -= a["amount"]
            elif ev.name in ("Claimed",):
                who = a["participant"]
                assert a["amount"] == self.unclaimed[who]
                self.wallet[who] += a["amount"]
                self.unclaimed[who] = 0
            elif ev.name in ("Withdrawn", "Exited"):
                who = a["participant"]
                # all of the stake, no more: deposits less slashes
                assert a["amount"] == self.stake[who]
                self.wallet[who] += a["amount"]
                self.stake[who] = 0
                if ev.name == "Exited":
                    self.members.remove(who)
            elif ev.name == "PoolReclaimed":
                assert a["amount"] == self.pool
                self.pool = 0

    # ------------------------------------------------------------ progress

    @initialize(amounts=st.lists(st.sampled_from(STAKES), min_size=PEOPLE, max_size=PEOPLE))
    def register(self, amounts: list[int]) -> None:
        """Most examples start with people joining (some below min_stake, one over the cap)."""
        for i, amount in enumerate(amounts):
            self.join(i, amount)

    @rule(
        noise=st.integers(0, 2),
        absent=st.sets(person, max_size=1),
        accepts=st.lists(st.integers(0, ALL_ACCEPT), min_size=PEOPLE, max_size=PEOPLE),
        action=st.sampled_from(ACTIONS),
        i=person,
        j=person,
        flag=st.booleans(),
        other=st.booleans(),
        score=st.integers(0, 2**64 - 1),
    )
    def step(
        self,
        noise: int,
        absent: set[int],
        accepts: list[int],
        action: str,
        i: int,
        j: int,
        flag: bool,
        other: bool,
        score: int,
    ) -> None:
        """Two steps in three move the task on; the third is any call by anyone, or mining.

        A single rule, so that Hypothesis's swarm testing (which turns rules off per example)
        cannot switch progress off.
        """
        if noise == 2:
            self.act(action, i, j, flag, other, score)
        else:
            self.advance(absent, accepts)

    def advance(self, absent: set[int], accepts: list[int]) -> None:
        """Move the task on: first everyone (but the `absent`) does this phase's action, then
        the next call advances past it (mining to its end, or start/draw_roles/finalize)."""
        phase = self.phase()
        transition = {
            Phase.AWAIT_START: "start",
            Phase.AWAIT_DRAW: "draw_roles",
            Phase.AWAIT_FINALIZE: "finalize",
        }
        if phase in transition:
            self.attempt(True, transition[phase])
        elif phase in (Phase.ENDED, Phase.CANCELLED):
            self.cash_out(absent)
        elif phase == Phase.REGISTRATION or (self.round, phase) in self.acted:
            self.task.skip_phase()
        else:
            self.acted.add((self.round, phase))
            self.everyone_acts(phase, absent, accepts)

    def everyone_acts(self, phase: Phase, absent: set[int], accepts: list[int]) -> None:
        for i, who in enumerate(self.people):
            if i in absent or self.phase() != phase:
                continue
            if phase == Phase.SEED_COMMIT and who in self.members and who not in self.seeds:
                self.commit_seed(i)
            elif phase == Phase.SEED_REVEAL and who in self.seeds and who not in self.revealed:
                self.reveal_seed(i, i, wrong=False)
            elif phase == Phase.PROPOSE and who in self.proposers and who not in self.proposed:
                self.propose(i)
            elif phase == Phase.VOTE_COMMIT and who in self.voters and who not in self.ballots:
                self.commit_vote(i, accepts[i], 500 + i)
            elif phase == Phase.VOTE_REVEAL and who in self.ballots and who not in self.opened:
                self.reveal_vote(i, i, wrong_salt=False, flip=False)

    # ------------------------------------------------------------ any call, any time

    def act(self, action: str, i: int, j: int, flag: bool, other: bool, score: int) -> None:
        """One call by someone, valid or not: the contract must agree with the model."""
        if action == "mine":
            self.w.chain.mine(1 + j % 3)
        elif action == "join":
            self.join(i, STAKES[j % len(STAKES)])
        elif action in ("start", "draw_roles", "finalize"):
            expected = {"start": Phase.AWAIT_START, "draw_roles": Phase.AWAIT_DRAW}
            self.attempt(self.phase() == expected.get(action, Phase.AWAIT_FINALIZE), action)
        elif action == "commit_seed":
            self.commit_seed(i)
        elif action == "reveal_seed":
            self.reveal_seed(i, j if other else i, wrong=flag)
        elif action == "propose":
            self.propose(i)
        elif action == "commit_vote":
            # a ballot with a bit beyond the proposers now and then: committing works, revealing not
            self.commit_vote(i, score % (2 * (ALL_ACCEPT + 1)), score)
        elif action == "reveal_vote":
            self.reveal_vote(i, j if other else i, wrong_salt=flag, flip=score % 2 == 1)
        elif action == "claim":
            self.attempt(self.unclaimed[self.people[i]] > 0, "claim", sender=self.people[i])
        elif action == "withdraw":
            who = self.people[i]
            ok = self.stage in ("ended", "cancelled") and self.stake[who] > 0
            self.attempt(ok, "withdraw", sender=who)
        elif action == "exit":
            self.exit(i)
        elif action == "reclaim_pool":
            ok = self.stage in ("ended", "cancelled") and self.pool > 0
            self.attempt(ok, "reclaim_pool", sender=self.w.creator)

    def cash_out(self, absent: set[int]) -> None:
        """After the task: everyone but the `absent` claims and withdraws; the pool goes back."""
        for i, who in enumerate(self.people):
            if i not in absent and self.unclaimed[who]:
                self.attempt(True, "claim", sender=who)
            if i not in absent and self.stake[who]:
                self.attempt(True, "withdraw", sender=who)
        if self.pool:
            self.attempt(True, "reclaim_pool", sender=self.w.creator)

    # ------------------------------------------------------------ single calls

    def join(self, i: int, amount: int) -> None:
        who = self.people[i]
        # approve first: it mines a block, which can close registration before the join lands
        if self.w.token.allowance(who, self.task.address) < amount:
            self.w.token.approve(self.task.address, amount, sender=who)
        ok = (
            self.phase() == Phase.REGISTRATION
            and who not in self.ever_joined
            and amount >= PARAMS.min_stake
            and len(self.members) < PARAMS.max_participants
        )
        self.attempt(ok, "join", amount, sender=who, approve=False)

    def commit_seed(self, i: int) -> None:
        who = self.people[i]
        seed = digest_of(f"seed {self.round} {who} {self.w.chain.next_block}")
        ok = (
            self.phase() == Phase.SEED_COMMIT
            and who in self.members
            and self.stake[who] > 0
            and who not in self.seeds
        )
        self.attempt(ok, "commit_seed", seed_commitment(seed, who), sender=who)
        if ok:
            self.seeds[who] = seed

    def reveal_seed(self, i: int, j: int, wrong: bool) -> None:
        """Reveal i's seed, sent by j (a wrong sender, unless i == j), or a garbled one."""
        owner, sender = self.people[i], self.people[j]
        seed = self.seeds.get(owner, digest_of("no seed"))
        if wrong:
            seed = digest_of(f"not {seed.hex()}")
        ok = (
            self.phase() == Phase.SEED_REVEAL
            and owner == sender
            and owner in self.seeds
            and owner not in self.revealed
            and not wrong
        )
        self.attempt(ok, "reveal_seed", seed, sender=sender)
        if ok:
            self.revealed.add(owner)

    def propose(self, i: int) -> None:
        who = self.people[i]
        ok = self.phase() == Phase.PROPOSE and who in self.proposers and who not in self.proposed
        self.attempt(ok, "propose", digest_of(f"update {self.round} {who}"), sender=who)
        if ok:
            self.proposed.add(who)

    def commit_vote(self, i: int, accepts: int, score: int) -> None:
        who = self.people[i]
        salt = digest_of(f"salt {self.round} {who} {accepts} {score}")
        ok = (
            self.phase() == Phase.VOTE_COMMIT
            and who in self.voters
            and bool(self.proposed)
            and who not in self.ballots  # a second vote must fail
        )
        self.attempt(ok, "commit_vote", vote_commitment(accepts, score, salt, who), sender=who)
        if ok:
            self.ballots[who] = (accepts, score, salt)

    def reveal_vote(self, i: int, j: int, wrong_salt: bool, flip: bool) -> None:
        """Open i's ballot, sent by j, possibly with the wrong salt or another verdict."""
        owner, sender = self.people[i], self.people[j]
        accepts, score, salt = self.ballots.get(owner, (ALL_ACCEPT, 0, digest_of("none")))
        if wrong_salt:
            salt = digest_of(f"wrong {salt.hex()}")
        ok = (
            self.phase() == Phase.VOTE_REVEAL
            and owner == sender
            and owner in self.ballots
            and owner not in self.opened
            and not wrong_salt
            and not flip
            and accepts <= ALL_ACCEPT
        )
        self.attempt(ok, "reveal_vote", accepts ^ flip, score, salt, sender=sender)
        if ok:
            self.opened.add(owner)

    def exit(self, i: int) -> None:
        who = self.people[i]
        phase = self.phase()
        unassigned = who not in self.proposers and who not in self.voters
        ok = who in self.members and (
            (phase == Phase.SEED_COMMIT and who not in self.seeds)
            or (Phase.PROPOSE <= phase <= Phase.AWAIT_FINALIZE and unassigned)
        )
        self.attempt(ok, "exit", sender=who)

    # ------------------------------------------------------------ invariants

    @invariant()
    def phase_matches_the_model(self) -> None:
        assert self.task.phase() == self.phase()

    @invariant()
    def books_balance(self) -> None:
        """The contract holds stakes + pool + unclaimed, and the model agrees on each."""
        if not self.dirty:
            return
        self.dirty = False
        staked, pool, unclaimed = (
            self.task.total_staked(),
            self.task.pool(),
            self.task.total_unclaimed(),
        )
        assert staked == sum(self.stake.values())
        assert pool == self.pool
        assert unclaimed == sum(self.unclaimed.values())
        assert self.w.token.balance_of(self.task.address) == staked + pool + unclaimed

    @invariant()
    def tallies_count_each_voter_once(self) -> None:
        if self.stage == "round" and self.opened:
            tally = self.task.tally(self.round)
            assert tally.revealed_count == len(self.opened)

    def teardown(self) -> None:
        """Per account: wallet + stake + unclaimed = funds + credited - slashed; supply kept."""
        event(f"reached stage {self.stage}, round {self.round}")
        for name in sorted(self.done):
            event(f"succeeded: {name}")
        token, task = self.w.token, self.task
        for who in self.people:
            assert token.balance_of(who) == self.wallet[who]
            assert task.stake_of(who) == self.stake[who]
            assert task.reward_of(who) == self.unclaimed[who]
            total = self.wallet[who] + self.stake[who] + self.unclaimed[who]
            assert total == FUNDS + self.credited[who] - self.slashed[who]
        held = sum(token.balance_of(p) for p in [self.w.creator, *self.people])
        assert held + token.balance_of(task.address) == self.supply


FlockMachine.TestCase.settings = settings(
    max_examples=5,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFlockProperties = FlockMachine.TestCase
