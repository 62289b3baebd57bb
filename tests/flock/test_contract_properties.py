"""Random call sequences against FlockTask (Hypothesis stateful testing) keep its invariants.

The contract's bytecode from artifacts.json runs on revm in process (pyrevm: the EVM inside
anvil and reth; no blocks are built and no state roots computed, so a call costs a fraction of a
millisecond), and the chain tier can afford 10,000 sequences (COVEY_PROPERTY_SEQUENCES changes
the count; the default tier runs a hundred). A Python model predicts whether each call may
succeed (phase, membership, commitments, roles, balances); the contract must agree, call by
call. Each settlement is recomputed independently: every reward, slash, eviction refund, keeper
fee and reclaimed pool the contract emits must equal the model's, to the wei, and so must what
it burns. Transitions that are due (start, draw_roles, finalize) must never revert, with a
stake at the 2**96 cap and a 2**96 pool on a token of supply 2**256 - 1. After every sequence
the task is run out to STALLED if it has not ended, everyone cashes out and the contract must
hold exactly what was burned, with each account's wallet + stake + credits equal to its funds +
earnings - slashes.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.abi import (
    collapse_if_tuple,
    event_abi_to_log_topic,
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
)
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from covey.flock.chain import contract_address, load_artifacts
from covey.flock.commitments import proposal_commitment, seed_commitment, vote_commitment
from covey.flock.params import MAX_POOL, MAX_STAKE, TOKEN_UNIT, TaskParams
from covey.flock.task import Outcome, Phase, SlashReason
from tests.flock import BUNDLE

pyrevm = pytest.importorskip("pyrevm", reason="pip install pyrevm (the dev extra has it)")

T = TOKEN_UNIT
BLOCK_GAS = 30_000_000  # every call must fit in a 30M block
VIEWER = "0x00000000000000000000000000000000000C0FFE"  # the caller of views (an account)


# ---------------------------------------------------------------- revm harness


class Reverted(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Evm:
    """revm with one block per transaction, like the embedded chain; views see the next block."""

    def __init__(self) -> None:
        self.evm = pyrevm.EVM(spec_id="CANCUN")
        self.block = 1
        self._set_block()

    def _set_block(self) -> None:
        self.evm.set_block_env(pyrevm.BlockEnv(number=self.block, timestamp=12 * self.block))

    def mine(self, blocks: int) -> None:
        self.block += blocks
        self._set_block()

    def snapshot(self) -> tuple[Any, int]:
        return self.evm.snapshot(), self.block

    def revert(self, snapshot: tuple[Any, int]) -> None:
        checkpoint, self.block = snapshot
        self.evm.revert(checkpoint)
        self._set_block()

    def deploy(self, name: str, sender: str, *args: Any) -> Contract:
        art = artifacts()[name]
        (constructor,) = [item for item in art["abi"] if item["type"] == "constructor"]
        code = bytes.fromhex(art["bytecode"][2:])
        code += abi_encode(get_abi_input_types(constructor), args)
        try:
            address = self.evm.deploy(sender, code, gas=BLOCK_GAS)
        except RuntimeError as e:
            raise Reverted(_reason(e)) from None
        self.mine(1)
        return Contract(self, name, address)


@cache
def artifacts() -> dict[str, Any]:
    contracts: dict[str, Any] = load_artifacts()["contracts"]
    return contracts


def _reason(error: RuntimeError) -> str:
    match = re.search(r"output: 0x([0-9a-f]*)", str(error))
    output = bytes.fromhex(match.group(1)) if match else b""
    if output[:4] == bytes.fromhex("08c379a0"):
        return str(abi_decode(["string"], output[4:])[0])
    return f"no reason ({str(error)[:80]})"


@cache
def abi_tables(name: str) -> tuple[dict[str, Any], dict[bytes, Any]]:
    """Per function: selector, input and output types; per event topic: its ABI entry."""
    abi = artifacts()[name]["abi"]
    functions = {
        item["name"]: (
            function_abi_to_4byte_selector(item),
            get_abi_input_types(item),
            get_abi_output_types(item),
        )
        for item in abi
        if item["type"] == "function"
    }
    events = {event_abi_to_log_topic(item): item for item in abi if item["type"] == "event"}
    return functions, events


class Contract:
    def __init__(self, evm: Evm, name: str, address: str) -> None:
        self.evm = evm
        self.address = to_checksum_address(address)
        self.functions, self.events = abi_tables(name)

    def _data(self, name: str, args: tuple[Any, ...]) -> bytes:
        selector, inputs, _ = self.functions[name]
        return selector + abi_encode(inputs, args) if args else selector

    def call(self, name: str, *args: Any) -> Any:
        data = self._data(name, args)
        out = bytes(self.evm.evm.message_call(VIEWER, self.address, data, is_static=True))
        outputs = self.functions[name][2]
        if outputs == ["uint256"]:
            return int.from_bytes(out, "big")
        values = abi_decode(outputs, out)
        return values[0] if len(values) == 1 else values

    def tx(self, name: str, *args: Any, sender: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            self.evm.evm.message_call(sender, self.address, self._data(name, args), gas=BLOCK_GAS)
        except RuntimeError as e:
            raise Reverted(_reason(e)) from None
        events = [self._decode(log) for log in self.evm.evm.result.logs]
        self.evm.mine(1)
        return [e for e in events if e is not None]

    def _decode(self, log: Any) -> tuple[str, dict[str, Any]] | None:
        if checksum(log.address) != self.address:
            return None
        topics = [bytes.fromhex(t[2:]) for t in log.topics]
        item = self.events[topics[0]]
        indexed = [i for i in item["inputs"] if i["indexed"]]
        plain = [i for i in item["inputs"] if not i["indexed"]]
        values = [
            abi_decode([i["type"]], topic)[0] for i, topic in zip(indexed, topics[1:], strict=True)
        ]
        values += abi_decode([collapse_if_tuple(i) for i in plain], bytes(log.data[1]))
        return item["name"], {
            i["name"]: _checksummed(i["type"], v)
            for i, v in zip(indexed + plain, values, strict=True)
        }


@cache
def checksum(address: str) -> str:
    return to_checksum_address(address)


def _checksummed(kind: str, value: Any) -> Any:
    """Addresses as web3 gives them (eth_abi decodes them in lower case)."""
    if kind == "address":
        return checksum(value)
    if kind == "address[]":
        return [checksum(a) for a in value]
    return value


# ---------------------------------------------------------------- the world and the model

PEOPLE = 6  # one more than max_participants, so the cap gets hit
FUNDS = 2**100  # per person: several maximal stakes
# what a joiner approves before join(): mostly enough, 9 tokens too little for a 10-token stake
APPROVALS = [9 * T, *[10 * T, 25 * T, MAX_STAKE] * 3]
BASE = TaskParams(
    rounds=2,
    min_participants=4,
    max_participants=5,
    stake=10 * T,
    reward_pool=1000 * T,
    # two voters judging two proposals: split (tied) and undecided verdicts
    proposers_per_round=2,
    voters_per_round=2,
    slash_pct=10,
    no_show_pct=25,
    threshold_pct=50,
    voter_reward_pct=20,
    keeper_fee=T,
    max_missed_rounds=2,
    registration_blocks=16,  # 6 people x (approve + join) fit, so the cap gets hit
    seed_commit_blocks=6,
    seed_reveal_blocks=6,
    propose_commit_blocks=4,
    propose_reveal_blocks=4,
    vote_commit_blocks=4,
    vote_reveal_blocks=4,
    timeout_blocks=5,
)
VARIANTS = [
    BASE,
    replace(BASE, threshold_pct=51, keeper_fee=0, max_missed_rounds=1),
    replace(BASE, rounds=1, threshold_pct=99, slash_pct=0, no_show_pct=100),
    replace(BASE, proposers_per_round=1, voters_per_round=3, rounds=3, keeper_fee=2 * T),
    # the caps: a 2**96 stake and pool, every keeper fee together at 5% of the pool
    replace(
        BASE, stake=MAX_STAKE, reward_pool=MAX_POOL, keeper_fee=MAX_POOL // 100,
        voter_reward_pct=100,
    ),
]  # fmt: skip
ACTIONS = {  # random calls and their weights
    "mine": 4,
    "stall": 1,
    "join": 2,
    "set_endpoint": 1,
    "start": 1,
    "commit_seed": 2,
    "reveal_seed": 2,
    "draw_roles": 1,
    "commit_proposal": 2,
    "reveal_proposal": 2,
    "commit_vote": 2,
    "reveal_vote": 2,
    "finalize": 1,
    "claim": 2,
    "withdraw": 2,
    "exit": 4,
    "reclaim_pool": 1,
}
DIGEST_CHOICES = [0, 1, 1, 1, 2, 3, 3]  # mostly its own, some shared (this round, any round), empty
MOVES_TOKENS = {
    "join",
    "start",
    "draw_roles",
    "finalize",
    "claim",
    "withdraw",
    "exit",
    "reclaim_pool",
}
TRANSITIONS = {
    Phase.AWAIT_START: "start",
    Phase.AWAIT_DRAW: "draw_roles",
    Phase.AWAIT_FINALIZE: "finalize",
}


def popcount(x: int) -> int:
    return bin(x).count("1")


def digest_for(round_: int, choice: int, who: str) -> bytes:
    """0: a digest every proposer of the round may pick (duplicates), 1: its own, 2: the empty
    digest, 3: one digest for every round (an earlier round's, revealed again)."""
    if choice == 2:
        return b"\0" * 32
    if choice == 3:
        return keccak(b"update of every round")
    return keccak(f"update {round_} {who if choice else 'shared'}".encode())


@dataclass
class World:
    """Accounts, a 2**256 - 1 token and a snapshot to start every sequence from."""

    evm: Evm
    token: Contract
    creator: str
    keeper: str  # no participant: calls transitions for the fee
    people: list[str]
    base: tuple[Any, int]


_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        evm = Evm()
        creator, keeper, *people = [
            to_checksum_address(f"0x{0xC0FFEE00 + i:040x}") for i in range(8)
        ]
        token = evm.deploy("Token", creator, "Stake", "STK", 2**256 - 1)
        for who in people:
            token.tx("transfer", who, FUNDS, sender=creator)
        _world = World(evm, token, creator, keeper, people, evm.snapshot())
    return _world


@dataclass
class RoundState:
    seeds: dict[str, bytes] = field(default_factory=dict)
    revealed: set[str] = field(default_factory=set)
    proposers: list[str] = field(default_factory=list)
    voters: list[str] = field(default_factory=list)
    proposal_commits: dict[str, tuple[bytes, bytes, int]] = field(default_factory=dict)
    digests: dict[str, bytes] = field(default_factory=dict)  # revealed
    owner: dict[bytes, str] = field(default_factory=dict)  # digest -> first committer (this round)
    ballots: dict[str, tuple[int, bytes, int]] = field(default_factory=dict)  # mask, salt, weight
    opened: set[str] = field(default_factory=set)

    def valid(self, who: str) -> bool:
        digest = self.digests.get(who)
        return digest is not None and self.owner.get(digest) == who


class FlockMachine(RuleBasedStateMachine):
    """One task per sequence; the model predicts every outcome and amount."""

    def __init__(self) -> None:
        super().__init__()
        self.w = world()
        self.w.evm.revert(self.w.base)
        self.w.base = self.w.evm.snapshot()  # revm checkpoints are single-use
        self.people = self.w.people
        self.accounts = [self.w.creator, self.w.keeper, *self.people]
        self.wallet = {a: self.w.token.call("balanceOf", a) for a in self.accounts}
        self.start_wallet = dict(self.wallet)
        self.stake = dict.fromkeys(self.accounts, 0)
        self.unclaimed = dict.fromkeys(self.accounts, 0)
        self.earned = dict.fromkeys(self.accounts, 0)  # rewards, fees, end-of-task shares
        self.lost = dict.fromkeys(self.accounts, 0)  # slashes
        self.burned = 0
        self.used: dict[bytes, str] = {}  # digests owned in earlier rounds -> their owner
        self.missed = dict.fromkeys(self.accounts, 0)
        self.members: list[str] = []
        self.ever_joined: set[str] = set()
        self.done: set[str] = set()  # functions that succeeded at least once (statistics)
        self.acted: set[tuple[int, Phase]] = set()
        self.round = 0
        self.rs = RoundState()
        self.task: Contract | None = None
        self.dirty = True  # tokens or credits moved since the books were last compared

    # ------------------------------------------------------------ setup

    @initialize(
        params=st.sampled_from(VARIANTS),
        amounts=st.lists(st.sampled_from(APPROVALS), min_size=PEOPLE, max_size=PEOPLE),
    )
    def create(self, params: TaskParams, amounts: list[int]) -> None:
        """Deploy a task, then people join (some approving too little, some too late)."""
        self.p = params
        creator = self.w.creator
        # revm counts a sender's nonce for deployments only
        future = contract_address(creator, self.w.evm.evm.basic(creator).nonce)
        self.w.token.tx("approve", future, params.reward_pool, sender=creator)
        args = (self.w.token.address, params.as_tuple(), BUNDLE)
        self.task = self.w.evm.deploy("FlockTask", creator, *args)
        assert self.task.address == future
        self.wallet[self.w.creator] -= params.reward_pool
        self.pool = params.reward_pool
        self.stage, self.stage_start = "registration", 0
        self.reg_end = self.w.evm.block - 1 + params.registration_blocks
        for i, amount in enumerate(amounts):
            self.join(i, amount)

    # ------------------------------------------------------------ the model's phase

    def phase(self, block: int | None = None) -> Phase:
        """The phase a transaction mined in `block` (default: the next) sees, from the model."""
        b = self.w.evm.block if block is None else block
        p, t = self.p, self.p.timeout_blocks
        if self.stage == "registration":
            if b < self.reg_end:
                return Phase.REGISTRATION
            return Phase.AWAIT_START if b < self.reg_end + t else Phase.STALLED
        if self.stage in ("ended", "cancelled"):
            return Phase.ENDED if self.stage == "ended" else Phase.CANCELLED
        end = self.stage_start
        if self.stage == "seeding":
            windows = [(p.seed_commit_blocks, Phase.SEED_COMMIT)]
            windows += [(p.seed_reveal_blocks, Phase.SEED_REVEAL), (t, Phase.AWAIT_DRAW)]
        else:
            windows = [
                (p.propose_commit_blocks, Phase.PROPOSE_COMMIT),
                (p.propose_reveal_blocks, Phase.PROPOSE_REVEAL),
                (p.vote_commit_blocks, Phase.VOTE_COMMIT),
                (p.vote_reveal_blocks, Phase.VOTE_REVEAL),
                (t, Phase.AWAIT_FINALIZE),
            ]
        for length, phase in windows:
            end += length
            if b < end:
                return phase
        return Phase.STALLED

    def phase_end(self) -> int:
        b = self.w.evm.block
        now = self.phase(b)
        if now in (Phase.ENDED, Phase.CANCELLED, Phase.STALLED):
            return b
        while self.phase(b) == now:
            b += 1
        return b

    # ------------------------------------------------------------ calling

    def attempt(self, expect: bool, name: str, *args: Any, sender: str) -> list[Any] | None:
        """Call `name`; it must succeed exactly when the model says so."""
        assert self.task is not None
        try:
            events = self.task.tx(name, *args, sender=sender)
        except Reverted as e:
            assert not expect, f"{name} from {sender} reverted: {e.reason}"
            return None
        assert expect, f"{name} from {sender} succeeded where the model expected a revert"
        self.done.add(name)
        self.dirty |= name in MOVES_TOKENS
        return events

    def keeper_fee(self, keeper: str, events: list[Any]) -> None:
        fee = min(self.p.keeper_fee, self.pool)
        paid = [a for name, a in events if name == "KeeperPaid"]
        assert paid == ([{"round": self.round, "keeper": keeper, "amount": fee}] if fee else [])
        self.pool -= fee
        self.credit(keeper, fee)

    def credit(self, who: str, amount: int) -> None:
        self.unclaimed[who] += amount
        self.earned[who] += amount

    def slash(self, who: str, pct: int, parts: int, whole: int) -> int:
        amount = self.stake[who] * pct * parts // (100 * whole)
        self.stake[who] -= amount
        self.lost[who] += amount
        self.burned += amount
        return amount

    @property
    def budget(self) -> int:
        p = self.p
        return (p.reward_pool - p.keeper_fee * (1 + 2 * p.rounds)) // p.rounds

    def evict(self, who: str) -> int:
        event("a participant was evicted")
        refund = self.stake[who]
        self.members.remove(who)
        self.stake[who] = 0
        self.unclaimed[who] += refund  # its own stake, not an earning
        return refund

    def next_round(self, block: int) -> None:
        self.round += 1
        self.used |= self.rs.owner
        self.rs = RoundState()
        if self.round == self.p.rounds:
            self.stage = "ended"
        else:
            self.stage, self.stage_start = "seeding", block

    # ------------------------------------------------------------ the step

    @rule(choice=st.integers(0, 2**64 - 1))
    def step(self, choice: int) -> None:
        """Three steps in four move the task on; the fourth is any call by anyone, or mining.

        One rule drawing one number, from which the step's choices are derived: Hypothesis's
        own bookkeeping per drawn value costs more than the EVM, and a single rule keeps its
        swarm testing (which turns rules off per example) from switching progress off.
        """
        rng = random.Random(choice)
        sender = rng.choice(self.accounts)  # the creator, an outside keeper or a participant
        if rng.random() < 0.75:
            self.advance(rng, sender)
        else:
            self.act(rng, sender)

    def advance(self, rng: random.Random, keeper: str) -> None:
        """Call the due transition; or have everyone (but a few absent) do this phase's duty,
        and mostly mine past the phase; after the task, cash out."""
        phase = self.phase()
        absent = {i for i in range(PEOPLE) if rng.random() < 0.12}
        if phase in TRANSITIONS:
            getattr(self, TRANSITIONS[phase])(keeper)
        elif phase in (Phase.ENDED, Phase.CANCELLED, Phase.STALLED):
            self.cash_out(absent)
        elif phase == Phase.REGISTRATION or (self.round, phase) in self.acted:
            self.w.evm.mine(self.phase_end() - self.w.evm.block)
        else:
            self.acted.add((self.round, phase))
            common = self.ballot(rng)  # most voters agree, so most verdicts are decided
            for i in range(PEOPLE):
                if i not in absent and self.phase() == phase:
                    accepts = common if rng.random() < 0.7 else self.ballot(rng)
                    self.duty(phase, i, accepts, rng.choice(DIGEST_CHOICES))
            if rng.random() < 0.6:  # else stay: the next steps act inside the phase
                self.w.evm.mine(self.phase_end() - self.w.evm.block)

    def ballot(self, rng: random.Random) -> int:
        """A mask over the round's proposers; one in ten has a bit beyond them (refused)."""
        width = len(self.rs.proposers) + (rng.random() < 0.1)
        return rng.randrange(1 << width)

    def duty(self, phase: Phase, i: int, accepts: int, choice: int) -> None:
        who, rs = self.people[i], self.rs
        if phase == Phase.SEED_COMMIT and who in self.members and who not in rs.seeds:
            self.commit_seed(i)
        elif phase == Phase.SEED_REVEAL and who in rs.seeds and who not in rs.revealed:
            self.reveal_seed(i, i, wrong=False)
        elif phase == Phase.PROPOSE_COMMIT and who in rs.proposers:
            if who not in rs.proposal_commits:
                self.commit_proposal(i, choice)
        elif phase == Phase.PROPOSE_REVEAL and who in rs.proposal_commits:
            if who not in rs.digests:
                self.reveal_proposal(i, i, wrong=False)
        elif phase == Phase.VOTE_COMMIT and who in rs.voters and who not in rs.ballots:
            self.commit_vote(i, accepts)
        elif phase == Phase.VOTE_REVEAL and who in rs.ballots and who not in rs.opened:
            self.reveal_vote(i, i, wrong=False, flip=False)

    def act(self, rng: random.Random, sender: str) -> None:
        """One call by someone, valid or not: the contract must agree with the model."""
        (action,) = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))
        i, j = rng.randrange(PEOPLE), rng.randrange(PEOPLE)
        flag, other = rng.random() < 0.3, rng.random() < 0.3
        who = self.people[i]
        if action == "mine":
            self.w.evm.mine(1 + j % 3)
        elif action == "stall":  # far enough that a due transition times out
            self.w.evm.mine(self.p.timeout_blocks + j)
        elif action == "join":
            self.join(i, rng.choice(APPROVALS))
        elif action == "set_endpoint":
            url = f"https://peer{j}.example"
            events = self.attempt(who in self.members, "set_endpoint", url, sender=who)
            if events is not None:
                assert events == [("EndpointSet", {"participant": who, "endpoint": url})]
        elif action in ("start", "draw_roles", "finalize"):
            if self.phase() == {v: k for k, v in TRANSITIONS.items()}[action]:
                getattr(self, action)(sender)
            else:
                self.attempt(False, action, sender=sender)
        elif action == "commit_seed":
            self.commit_seed(i)
        elif action == "reveal_seed":
            self.reveal_seed(i, j if other else i, wrong=flag)
        elif action == "commit_proposal":
            self.commit_proposal(i, rng.choice(DIGEST_CHOICES))
        elif action == "reveal_proposal":
            self.reveal_proposal(i, j if other else i, wrong=flag)
        elif action == "commit_vote":
            self.commit_vote(i, self.ballot(rng))
        elif action == "reveal_vote":
            self.reveal_vote(i, j if other else i, wrong=flag, flip=other and not flag)
        elif action == "claim":
            self.claim(rng.choice(self.accounts))
        elif action == "withdraw":
            self.withdraw(who)
        elif action == "exit":
            self.exit(i)
        elif action == "reclaim_pool":
            self.reclaim_pool(self.w.creator if flag else who)

    def cash_out(self, absent: set[int]) -> None:
        """After the task: everyone but the `absent` claims and withdraws; the creator reclaims."""
        for i, who in enumerate(self.people):
            if i not in absent and self.unclaimed[who]:
                self.claim(who)
            if i not in absent and self.stake[who]:
                self.withdraw(who)
        for who in (self.w.creator, self.w.keeper):
            if self.unclaimed[who]:
                self.claim(who)
        self.reclaim_pool(self.w.creator)

    # ------------------------------------------------------------ registration and transitions

    def join(self, i: int, approved: int) -> None:
        who, stake = self.people[i], self.p.stake
        assert self.task is not None
        # approve first: it mines a block, which can close the window before the join lands
        self.w.token.tx("approve", self.task.address, approved, sender=who)
        url = "" if i % 2 else f"http://10.0.0.{i}:8000"
        ok = (
            self.phase() in (Phase.REGISTRATION, Phase.SEED_COMMIT)
            and who not in self.ever_joined
            and approved >= stake  # join takes exactly the task's stake, whatever was approved
            and len(self.members) < self.p.max_participants
        )
        events = self.attempt(ok, "join", url, sender=who)
        if events is not None:
            assert events == [("Joined", {"participant": who, "amount": stake, "endpoint": url})]
            self.members.append(who)
            self.ever_joined.add(who)
            self.stake[who] = stake
            self.wallet[who] -= stake

    def start(self, keeper: str) -> None:
        events = self.attempt(True, "start", sender=keeper)
        assert events is not None
        self.keeper_fee(keeper, events)
        n = len(self.members)
        if n < self.p.min_participants:
            assert ("TaskCancelled", {"participants": n}) in events
            self.stage = "cancelled"
        else:
            assert ("TaskStarted", {"participants": n}) in events
            self.stage, self.stage_start = "seeding", self.w.evm.block - 1

    def draw_roles(self, keeper: str) -> None:
        """Seed no-shows are slashed (and evicted at max_missed_rounds), then roles drawn."""
        events = self.attempt(True, "draw_roles", sender=keeper)
        assert events is not None
        self.keeper_fee(keeper, events)
        block, rs, p = self.w.evm.block - 1, self.rs, self.p
        slashes, leaving = {}, []
        for who in list(self.members):
            if who in rs.revealed:
                continue
            reason = (
                SlashReason.SEED_NOT_REVEALED if who in rs.seeds else SlashReason.SEED_NOT_COMMITTED
            )
            slashes[who] = (self.slash(who, p.no_show_pct, 1, 1), reason)
            self.missed[who] += 1
            if self.missed[who] >= p.max_missed_rounds:
                leaving.append(who)
        refunds = {who: self.evict(who) for who in leaving}
        self.check_events(events, slashes, {}, refunds)
        eligible = [m for m in self.members if m in rs.revealed]
        need = p.proposers_per_round + p.voters_per_round
        if len(eligible) < need:  # void: the round's budget is burned
            (void,) = [a for name, a in events if name == "RoundFinalized"]
            assert void["outcome"] == Outcome.VOID
            assert (void["reward"], void["paid"]) == (self.budget, 0)
            assert void["slashed"] == sum(a for a, _ in slashes.values())
            self.pool -= self.budget
            self.burned += self.budget
            self.next_round(block)
            return
        (drawn,) = [a for name, a in events if name == "RolesDrawn"]
        rs.proposers, rs.voters = drawn["proposers"], drawn["voters"]
        assert len(rs.proposers) == p.proposers_per_round and len(rs.voters) == p.voters_per_round
        assert len(set(rs.proposers + rs.voters)) == need and set(rs.proposers + rs.voters) <= set(
            eligible
        )
        self.stage, self.stage_start = "round", block
        self.round_slashed = sum(a for a, _ in slashes.values())

    def finalize(self, keeper: str) -> None:
        """Recompute the settlement from the model and compare every amount."""
        events = self.attempt(True, "finalize", sender=keeper)
        assert events is not None
        self.keeper_fee(keeper, events)
        rs, p = self.rs, self.p
        reward = self.budget
        committed = len(rs.ballots)  # every ballot weighs 1
        revealed = len(rs.opened)
        valid = [rs.valid(pr) for pr in rs.proposers]
        accepted = rejected = 0
        judged = []
        for k, pr in enumerate(rs.proposers):
            if not valid[k]:
                continue
            yes = sum(1 for v in rs.opened if rs.ballots[v][0] >> k & 1)
            no = revealed - yes
            if yes * 100 > p.threshold_pct * committed:
                accepted |= 1 << k
            elif no * 100 > (100 - p.threshold_pct) * committed:
                rejected |= 1 << k
            judged.append(
                {
                    "round": self.round,
                    "proposer": pr,
                    "accept_votes": yes,
                    "reject_votes": no,
                    "accepted": bool(accepted >> k & 1),
                    "rejected": bool(rejected >> k & 1),
                }
            )
        n_valid, decided = sum(valid), accepted | rejected
        outcome = (
            Outcome.NO_PROPOSALS
            if n_valid == 0
            else Outcome.ACCEPTED
            if accepted
            else Outcome.REJECTED
            if rejected
            else Outcome.NO_QUORUM
        )
        # fixed rates, whoever else wins or loses
        voter_budget = reward * p.voter_reward_pct // 100
        per_proposal = (reward - voter_budget) // p.proposers_per_round
        per_seat = voter_budget // p.voters_per_round
        rewards: dict[str, int] = {}
        slashes: dict[str, tuple[int, SlashReason]] = {}
        leaving = []

        def no_show(who: str, reason: SlashReason) -> None:
            slashes[who] = (self.slash(who, p.no_show_pct, 1, 1), reason)
            self.missed[who] += 1
            if self.missed[who] >= p.max_missed_rounds:
                leaving.append(who)

        for k, pr in enumerate(rs.proposers):
            if not valid[k]:
                dup = pr in rs.digests
                no_show(pr, SlashReason.DUPLICATE_PROPOSAL if dup else SlashReason.NO_PROPOSAL)
            elif accepted >> k & 1:
                rewards[pr] = per_proposal
            elif rejected >> k & 1:
                slashes[pr] = (self.slash(pr, p.slash_pct, 1, 1), SlashReason.PROPOSAL_REJECTED)
        n_decided = popcount(decided)
        for v in rs.voters if n_valid else []:
            if v not in rs.opened:
                no_show(v, SlashReason.VOTE_NOT_REVEALED)
            elif decided:
                mask = rs.ballots[v][0]
                wrong = popcount((mask ^ accepted) & decided)
                if wrong < n_decided:
                    rewards[v] = per_seat * (n_decided - wrong) // n_decided
                if wrong:
                    slash = self.slash(v, p.slash_pct, wrong, n_valid)
                    slashes[v] = (slash, SlashReason.LOSING_VOTE)
        for who, amount in rewards.items():
            self.credit(who, amount)
        paid = sum(rewards.values())
        self.pool -= reward
        self.burned += reward - paid  # nobody gains from what others did not earn
        refunds = {who: self.evict(who) for who in leaving}
        self.check_events(events, slashes, rewards, refunds)
        if valid and not all(valid):
            event("a proposal was missing or a duplicate")
        if any(valid[k] and not decided >> k & 1 for k in range(len(valid))):
            event("a valid proposal was left undecided")
        assert [a for name, a in events if name == "ProposalJudged"] == judged
        (final,) = [a for name, a in events if name == "RoundFinalized"]
        assert final == {
            "round": self.round,
            "outcome": outcome,
            "reward": reward,
            "paid": paid,
            "slashed": self.round_slashed + sum(a for a, _ in slashes.values()),
            "accepted": accepted,
            "rejected": rejected,
            "committed_weight": committed,
        }
        event(f"outcome {outcome.name}")
        self.next_round(self.w.evm.block - 1)

    def check_events(
        self,
        events: list[Any],
        slashes: dict[str, tuple[int, SlashReason]],
        rewards: dict[str, int],
        refunds: dict[str, int],
    ) -> None:
        got_slashes = {
            a["participant"]: (a["amount"], SlashReason(a["reason"]))
            for name, a in events
            if name == "Slashed"
        }
        assert got_slashes == slashes
        assert {
            a["participant"]: a["amount"] for name, a in events if name == "Rewarded"
        } == rewards
        assert {a["participant"]: a["refund"] for name, a in events if name == "Evicted"} == refunds

    # ------------------------------------------------------------ seeds, proposals, votes

    def commit_seed(self, i: int) -> None:
        who, rs = self.people[i], self.rs
        seed = keccak(f"seed {self.round} {who} {self.w.evm.block}".encode())
        ok = (
            self.phase() == Phase.SEED_COMMIT
            and who in self.members
            and self.stake[who] > 0
            and who not in rs.seeds
        )
        if self.attempt(ok, "commit_seed", seed_commitment(seed, who), sender=who) is not None:
            rs.seeds[who] = seed

    def reveal_seed(self, i: int, j: int, wrong: bool) -> None:
        """Reveal i's seed, sent by j (a wrong sender, unless i == j), or a garbled one."""
        owner, sender, rs, p = self.people[i], self.people[j], self.rs, self.p
        seed = rs.seeds.get(owner, keccak(b"no seed"))
        if wrong:
            seed = keccak(b"not " + seed)
        beacon = self.stage_start + p.seed_commit_blocks + p.seed_reveal_blocks - 1
        ok = (
            self.phase() == Phase.SEED_REVEAL
            and self.w.evm.block < beacon  # the beacon block takes no reveals
            and owner == sender
            and owner in rs.seeds
            and owner not in rs.revealed
            and not wrong
        )
        if self.attempt(ok, "reveal_seed", seed, sender=sender) is not None:
            rs.revealed.add(owner)

    def commit_proposal(self, i: int, choice: int) -> None:
        who, rs = self.people[i], self.rs
        digest = digest_for(self.round, choice, who)
        salt = keccak(f"salt {self.round} {who}".encode())
        ok = (
            self.phase() == Phase.PROPOSE_COMMIT
            and who in rs.proposers
            and who not in rs.proposal_commits
        )
        commitment = proposal_commitment(digest, salt, who)
        if self.attempt(ok, "commit_proposal", commitment, sender=who) is not None:
            rs.proposal_commits[who] = (digest, salt, len(rs.proposal_commits) + 1)

    def reveal_proposal(self, i: int, j: int, wrong: bool) -> None:
        owner, sender, rs = self.people[i], self.people[j], self.rs
        digest, salt, order = rs.proposal_commits.get(owner, (keccak(b"none"), b"\0" * 32, 0))
        if wrong:
            salt = keccak(b"wrong " + salt)
        ok = (
            self.phase() == Phase.PROPOSE_REVEAL
            and sender == owner
            and owner in rs.proposal_commits
            and owner not in rs.digests
            and digest != b"\0" * 32
            and not wrong
        )
        events = self.attempt(ok, "reveal_proposal", digest, salt, sender=sender)
        if events is None:
            return
        rs.digests[owner] = digest
        if digest in self.used:  # revealed in an earlier round: counts once in the whole task
            event("an earlier round's digest was revealed again")
            assert events[-1] == (
                "DuplicateProposal",
                {"round": self.round, "proposer": owner, "original": self.used[digest]},
            )
            return
        first = rs.owner.get(digest)
        if first is None:
            rs.owner[digest] = owner
            assert [name for name, _ in events] == ["ProposalRevealed"]
        else:
            event("a duplicate digest was revealed")
            earlier = order < rs.proposal_commits[first][2]
            dup, original = (first, owner) if earlier else (owner, first)
            rs.owner[digest] = original
            assert events[-1] == (
                "DuplicateProposal",
                {"round": self.round, "proposer": dup, "original": original},
            )

    def commit_vote(self, i: int, accepts: int) -> None:
        who, rs = self.people[i], self.rs
        salt = keccak(f"salt {self.round} {who} {accepts}".encode())
        ok = (
            self.phase() == Phase.VOTE_COMMIT
            and who in rs.voters
            and any(rs.valid(pr) for pr in rs.proposers)
            and who not in rs.ballots  # a second vote must fail
        )
        events = self.attempt(ok, "commit_vote", vote_commitment(accepts, salt, who), sender=who)
        if events is not None:
            rs.ballots[who] = (accepts, salt, 1)
            assert events[0][1]["weight"] == 1

    def reveal_vote(self, i: int, j: int, wrong: bool, flip: bool) -> None:
        """Open i's ballot, sent by j, possibly with the wrong salt or another verdict."""
        owner, sender, rs = self.people[i], self.people[j], self.rs
        accepts, salt, _ = rs.ballots.get(owner, (1, keccak(b"none"), 0))
        if wrong:
            salt = keccak(b"wrong " + salt)
        ok = (
            self.phase() == Phase.VOTE_REVEAL
            and owner == sender
            and owner in rs.ballots
            and owner not in rs.opened
            and not wrong
            and not flip
            and accepts >> len(rs.proposers) == 0
        )
        if self.attempt(ok, "reveal_vote", accepts ^ flip, salt, sender=sender) is not None:
            rs.opened.add(owner)

    # ------------------------------------------------------------ money out

    def claim(self, who: str) -> None:
        amount = self.unclaimed[who]
        events = self.attempt(amount > 0, "claim", sender=who)
        if events is not None:
            assert events == [("Claimed", {"participant": who, "amount": amount})]
            self.wallet[who] += amount
            self.unclaimed[who] = 0

    def withdraw(self, who: str) -> None:
        amount = self.stake[who]
        over = self.phase() in (Phase.ENDED, Phase.CANCELLED, Phase.STALLED)
        events = self.attempt(over and amount > 0, "withdraw", sender=who)
        if events is None:
            return
        assert events == [("Withdrawn", {"participant": who, "stake": amount})]
        self.stake[who] = 0
        self.wallet[who] += amount

    def exit(self, i: int) -> None:
        who, rs, phase = self.people[i], self.rs, self.phase()
        assigned = who in rs.proposers or who in rs.voters
        ok = who in self.members and (
            (phase == Phase.SEED_COMMIT and who not in rs.seeds)
            or (Phase.PROPOSE_COMMIT <= phase <= Phase.AWAIT_FINALIZE and not assigned)
        )
        events = self.attempt(ok, "exit", sender=who)
        if events is not None:
            event("a participant left with exit()")
            fee = self.slash(who, self.p.no_show_pct, 1, 1)  # leaving early is a missed duty
            amount = self.stake[who]
            slashed = {"round": self.round, "participant": who, "amount": fee}
            exited = {"participant": who, "round": self.round, "amount": amount}
            assert events == [
                ("Slashed", slashed | {"reason": SlashReason.EXIT}),
                ("Exited", exited),
            ]
            self.members.remove(who)
            self.stake[who] = 0
            self.wallet[who] += amount

    def reclaim_pool(self, who: str) -> None:
        """The creator takes back what no played round spent, once the task is over."""
        over = self.phase() in (Phase.CANCELLED, Phase.ENDED, Phase.STALLED)
        ok = who == self.w.creator and over and self.pool > 0
        if self.attempt(ok, "reclaim_pool", sender=who) is not None:
            self.wallet[who] += self.pool
            self.earned[who] += self.pool
            self.pool = 0

    # ------------------------------------------------------------ invariants

    @invariant()
    def phase_and_books_match_the_model(self) -> None:
        if self.task is None:
            return
        assert self.task.call("phase") == self.phase()
        if not self.dirty:
            return
        self.dirty = False
        staked, pool, unclaimed, burned = (
            self.task.call("total_staked"),
            self.task.call("pool"),
            self.task.call("total_unclaimed"),
            self.task.call("burned"),
        )
        assert staked == sum(self.stake.values())
        assert pool == self.pool
        assert unclaimed == sum(self.unclaimed.values())
        assert burned == self.burned
        balance = self.w.token.call("balanceOf", self.task.address)
        assert balance == staked + pool + unclaimed + burned

    def teardown(self) -> None:
        """Run the task out (mined to STALLED if it has not ended), cash everyone out: the
        contract holds only what was burned, and every account got its funds + earnings -
        slashes."""
        if self.task is None:
            return
        event(f"reached stage {self.stage}, round {self.round}")
        for name in sorted(self.done):
            event(f"succeeded: {name}")
        if self.phase() == Phase.STALLED:
            event("the task stalled")
        self.w.evm.mine(1000)
        assert self.phase() in (Phase.ENDED, Phase.CANCELLED, Phase.STALLED)
        self.cash_out(set())
        assert self.w.token.call("balanceOf", self.task.address) == self.burned
        for who in self.accounts:
            assert self.w.token.call("balanceOf", who) == self.wallet[who]
            assert self.stake[who] == self.unclaimed[who] == 0
            funded = self.p.reward_pool if who == self.w.creator else 0
            expected = self.start_wallet[who] - funded + self.earned[who] - self.lost[who]
            assert self.wallet[who] == expected, who


SEQUENCES = int(os.environ.get("COVEY_PROPERTY_SEQUENCES", "10000"))
_SETTINGS = dict(
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# The chain tier's 10,000 sequences run as four independent shards of 2,500 (Hypothesis draws each
# shard's sequences from its own random seed), so pytest-xdist can spread them over its workers.
_SHARD = settings(max_examples=-(-SEQUENCES // 4), **_SETTINGS)  # type: ignore[arg-type]


@pytest.mark.chain
class TestFlockPropertiesShard1(FlockMachine.TestCase):  # type: ignore[name-defined]
    settings = _SHARD


@pytest.mark.chain
class TestFlockPropertiesShard2(FlockMachine.TestCase):  # type: ignore[name-defined]
    settings = _SHARD


@pytest.mark.chain
class TestFlockPropertiesShard3(FlockMachine.TestCase):  # type: ignore[name-defined]
    settings = _SHARD


@pytest.mark.chain
class TestFlockPropertiesShard4(FlockMachine.TestCase):  # type: ignore[name-defined]
    settings = _SHARD


class TestFlockPropertiesQuick(FlockMachine.TestCase):  # type: ignore[name-defined]
    """The default tier's run: a hundred sequences, a few seconds."""

    settings = settings(max_examples=100, **_SETTINGS)  # type: ignore[arg-type]
