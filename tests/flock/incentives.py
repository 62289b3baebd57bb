"""What cheating gains under FlockTask v2 (main 6617e05) and under today's rules (v3).

Each scenario of issue 26 is played on an embedded chain under both contracts, once with the
cheat and once without it, from the same state; a party's net is what its addresses hold at the
end (wallets, after every claim and withdrawal) minus what they held before. The gain from
cheating is net(cheat) - net(honest): a positive gain means the rules pay that party to lie.
test_incentives.py asserts the gain is positive under v2 and nil or negative under v3;
benchmarks/bench_incentives.py records the table.

v2 is kept compiled in fixtures/flocktask_v2.json; `FlockTaskV2` drives it through the same
typed client as today's contract (its join takes an amount; it has no beacon block, burned
counter or fixed round budget). Roles are drawn from seeds, so a scenario that needs a party in
a given role remakes the beacon block until the draw gives it (`draw_until`), as a party
could not: the scenarios measure the rules, not the draw's odds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eth_utils.crypto import keccak

from covey.flock.chain import TxResult, contract_address
from covey.flock.commitments import seed_commitment
from covey.flock.params import TOKEN_UNIT, TaskParams
from covey.flock.task import FlockTask, Phase
from tests.flock import BUNDLE, SMALL, RoundPlan, World, draw_in_python, propose_and_vote

T = TOKEN_UNIT
V2_ARTIFACT = Path(__file__).parent / "fixtures" / "flocktask_v2.json"
RULES = ("v2", "v3")


class FlockTaskV2(FlockTask):
    """FlockTask v2 (main 6617e05): stake-weighted ballots over a uniform draw, the last
    round's reward is the whole pool, leftovers shared by stake at withdrawal."""

    artifact = "FlockTaskV2"

    def join(
        self,
        endpoint: str = "",
        *,
        sender: str | None = None,
        approve: bool = True,
        amount: int | None = None,
    ) -> TxResult:
        """v2's join(amount, endpoint): `amount` defaults to its min_stake."""
        stake = self.params.stake if amount is None else amount
        who = sender or self.chain.default_account
        if approve:
            self.token.approve(self.address, stake, sender=who)
        return self.transact("join", stake, endpoint, sender=who)

    def reveal_seed(self, seed: bytes, *, sender: str | None = None) -> TxResult:
        return self.transact("reveal_seed", seed, sender=sender)

    def beacon_block(self) -> int:
        """v2 mixed in the hash of the reveal window's last block, which took reveals."""
        p = self.params
        return self.stage_start() + p.seed_commit_blocks + p.seed_reveal_blocks - 1


def deploy(w: World, rules: str, params: TaskParams) -> FlockTask:
    """A task under `rules` ("v2" or "v3") with `params` (v2 reads `stake` as its min_stake,
    and had none of v3's checks: keeper fees up to the whole pool)."""
    if rules == "v3":
        return FlockTask.deploy(w.chain, w.token, params, BUNDLE, sender=w.creator)
    art = json.loads(V2_ARTIFACT.read_text())["contracts"]["FlockTask"]
    w.chain.artifacts["contracts"][FlockTaskV2.artifact] = art
    nonce = int(w.chain.w3.eth.get_transaction_count(w.creator, "pending"))
    w.token.approve(contract_address(w.creator, nonce + 1), params.reward_pool, sender=w.creator)
    constructor = w.chain.factory(FlockTaskV2.artifact).constructor(
        w.token.address, params.as_tuple(), BUNDLE
    )
    receipt = w.chain.send("deploy FlockTask v2", constructor, w.creator)
    return FlockTaskV2(w.chain, str(receipt["contractAddress"]), params=params)


# ---------------------------------------------------------------- bookkeeping


def wallets(w: World, who: Iterable[str]) -> dict[str, int]:
    return {a: w.token.balance_of(a) for a in who}


def cash_out(task: FlockTask, people: Iterable[str]) -> None:
    """After the task: everyone claims and withdraws what it can."""
    for who in people:
        if task.reward_of(who):
            task.claim(sender=who)
        if task.stake_of(who):
            task.withdraw(sender=who)


def net(w: World, before: dict[str, int], party: Iterable[str]) -> int:
    return sum(w.token.balance_of(a) - before[a] for a in party)


def seed_round(task: FlockTask, members: list[str], salt: int, skip: Iterable[str] = ()) -> None:
    """Every member but `skip` commits a seed made from `salt`, then reveals it."""
    r = task.current_round()
    seeds = {who: keccak(f"{salt}/{r}/{who}".encode()) for who in members if who not in skip}
    for who, seed in seeds.items():
        task.commit_seed(seed_commitment(seed, who), sender=who)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for who, seed in seeds.items():
        task.reveal_seed(seed, sender=who)
    task.advance_to_phase(Phase.AWAIT_DRAW)


def draw_until(
    w: World, task: FlockTask, members: list[str], want: Callable[[list[str], list[str]], bool]
) -> None:
    """Draw the current round's roles so that `want(proposers, voters)` holds.

    A test harness's shortcut, not a party's power: everyone seeds once, then the beacon block
    is made again with another filler transaction in it (a token transfer of k wei) until the
    draw, computed off chain as the contract will, gives the roles wanted; then draw_roles."""
    r = task.current_round()
    seeds = {who: keccak(f"draw/{r}/{who}".encode()) for who in members}
    for who, seed in seeds.items():
        task.commit_seed(seed_commitment(seed, who), sender=who)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for who, seed in seeds.items():
        task.reveal_seed(seed, sender=who)
    beacon = task.beacon_block()
    for k in range(1, 2000):
        snapshot = w.chain.snapshot()
        w.chain.advance_to(beacon)
        w.token.transfer(w.creator, k, sender=w.creator)  # lands in the beacon block
        proposers, voters = draw_in_python(task, r, members, seeds=seeds, block=beacon)
        if want(proposers, voters):
            task.advance_to_phase(Phase.AWAIT_DRAW)
            task.draw_roles()
            assert (task.proposers_of(r), task.voters_of(r)) == (proposers, voters)
            return
        w.chain.revert(snapshot)
    raise AssertionError("no beacon block in 2000 gave the roles the scenario needs")


@dataclass
class Outcome:
    """One scenario under one set of rules: the cheating party's net both ways, in tokens."""

    rules: str
    honest: float
    cheat: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return round(self.cheat - self.honest, 6)

    def as_json(self) -> dict[str, Any]:
        return {
            "rules": self.rules,
            "honest": self.honest,
            "cheat": self.cheat,
            "gain": self.gain,
            **self.details,
        }


def both_ways(w: World, play: Callable[[bool], float]) -> tuple[float, float]:
    """(net honest, net cheating) of `play(cheat)`, each from the same chain state."""
    snapshot = w.chain.snapshot()
    honest = play(False)
    w.chain.revert(snapshot)
    cheat = play(True)
    return honest, cheat


# ---------------------------------------------------------------- the scenarios


def majority_lies_in_the_last_round(w: World, rules: str) -> Outcome:
    """Finding 5: a party that decides the last round's vote rejects a good proposal.

    v2: a 200-token voter among three 10-token participants (as the issue measured): its
    ballot outweighs the other voter's, the rejected proposer's part stays in the pool and the
    leftover is shared by stake at withdrawal, so the whale takes most of it. v3 refuses a
    200-token stake: the same party must run members, and holds the vote with two of the three
    voter seats; each seat's pay is fixed and what the round does not pay is burned.
    """
    pool = 100 * T
    before = wallets(w, w.people[:5])
    if rules == "v2":
        whale, *others = w.people[:4]
        party = [whale]
        params = replace(SMALL, rounds=1, min_participants=4, reward_pool=pool)
        task = deploy(w, rules, params)
        task.join(sender=whale, amount=200 * T)
        for who in others:
            task.join(sender=who)
        members = [whale, *others]
    else:
        party, others = w.people[:2], w.people[2:5]
        params = replace(SMALL, rounds=1, min_participants=5, voters_per_round=3, reward_pool=pool)
        task = deploy(w, rules, params)
        members = [*party, *others]
        for who in members:
            task.join(sender=who)
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    draw_until(w, task, members, lambda p, v: p[0] in others and set(party) <= set(v))

    def play(cheat: bool) -> float:
        votes = {v: not (cheat and v in party) for v in task.voters_of(0)}
        propose_and_vote(task, RoundPlan(votes=votes))
        cash_out(task, members)
        return net(w, before, party) / T

    honest, cheated = both_ways(w, play)
    return Outcome(rules, honest, cheated, {"party_members": len(party)})


def heavy_voter_passes_garbage(w: World, rules: str) -> Outcome:
    """Finding 6: a coalition with 25% of the stake, drawn voter, accepts its partner's garbage.

    v2 drew roles uniformly but weighed ballots by stake: a 30-token voter (of 120 staked)
    outweighed two 10-token honest voters, so the garbage was accepted, the colluding proposer
    paid and both honest voters slashed. v3: every ballot weighs one; the same coalition (two
    members of ten) is one ballot of three and is outvoted. Cheating: the colluding voter
    accepts the garbage; honest: it votes its judgement (reject).
    """
    heavy, partner, *honest = w.people[:10]
    members = [heavy, partner, *honest]
    party = [heavy, partner]
    before = wallets(w, members)
    params = replace(SMALL, rounds=1, min_participants=10, max_participants=10, voters_per_round=3)
    task = deploy(w, rules, params)
    for who in members:
        if rules == "v2" and who == heavy:
            assert isinstance(task, FlockTaskV2)
            task.join(sender=who, amount=30 * T)
        else:
            task.join(sender=who)
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    draw_until(w, task, members, lambda p, v: p == [partner] and heavy in v)

    def play(cheat: bool) -> float:
        votes = {v: cheat and v == heavy for v in task.voters_of(0)}  # honest voters reject
        propose_and_vote(task, RoundPlan(votes=votes))
        cash_out(task, members)
        return net(w, before, party) / T

    honest_net, cheated = both_ways(w, play)
    return Outcome(rules, honest_net, cheated, {"stake_share": 0.25 if rules == "v2" else 0.2})


def copy_after_an_empty_round(w: World, rules: str) -> Outcome:
    """Finding 7: after a round that accepted nothing, a copier re-reveals the author's digest.

    The global adapter did not move, so the author's update is as good as it was and the
    voters accept it again. v2 checked duplicates within a round only: the copier was paid
    for no work. v3: a digest counts once in the whole task, so the copy is a duplicate, a
    missed duty. Honest (for a party that did not train): propose nothing, also a missed duty.
    """
    members = w.people[:4]
    before = wallets(w, members)
    task = deploy(w, rules, replace(SMALL, rounds=2, min_participants=4, max_missed_rounds=5))
    for who in members:
        task.join(sender=who)
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    draw_until(w, task, members, lambda p, v: True)
    (author,) = task.proposers_of(0)
    # round 0: the voters do not vote: nothing is accepted, the global adapter stays
    propose_and_vote(task, RoundPlan(skip_vote_commit=set(task.voters_of(0))))
    digest = task.proposal_of(0, author).digest
    draw_until(w, task, members, lambda p, v: p[0] != author)
    (copier,) = task.proposers_of(1)

    def play(cheat: bool) -> float:
        from covey.flock.commitments import proposal_commitment

        salt = keccak(b"copier's salt")
        if cheat:
            task.commit_proposal(proposal_commitment(digest, salt, copier), sender=copier)
            task.advance_to_phase(Phase.PROPOSE_REVEAL)
            task.reveal_proposal(digest, salt, sender=copier)
            task.advance_to_phase(Phase.VOTE_COMMIT)
            if task.proposal_count(1):  # the voters judge the tensors: as good as in round 0
                from tests.flock import vote

                vote(task, RoundPlan(votes=dict.fromkeys(task.voters_of(1), True)))
        task.advance_to_phase(Phase.AWAIT_FINALIZE)
        task.finalize()
        cash_out(task, members)
        return net(w, before, [copier]) / T

    honest, cheated = both_ways(w, play)
    return Outcome(rules, honest, cheated)


def keeper_fees_return_the_pool(w: World, rules: str) -> Outcome:
    """Finding 8: the creator sets a keeper fee that adds up to the pool and keeps every
    transition to itself. v2 allowed keeper_fee x (1 + 2 x rounds) = pool: the creator took
    most of its pool back over three successful rounds. v3 caps every fee together at 5% of
    the pool: the largest fee v3 accepts is used. Honest: someone else is the keeper. The
    party is the creator; its net counts the pool it funded."""
    members = w.people[:3]
    pool, rounds = 100 * T, 3
    fee = pool // (1 + 2 * rounds) if rules == "v2" else pool * 5 // (100 * (1 + 2 * rounds))
    params = replace(SMALL, rounds=rounds, reward_pool=pool, keeper_fee=fee)
    keeper_else = w.people[9]

    def play(cheat: bool) -> float:
        before = wallets(w, [w.creator])
        keeper = w.creator if cheat else keeper_else
        task = deploy(w, rules, params)
        for who in members:
            task.join(sender=who)
        task.advance_to_phase(Phase.AWAIT_START)
        task.start(sender=keeper)
        for r in range(rounds):
            seed_round(task, members, salt=r)
            task.draw_roles(sender=keeper)
            propose_and_vote_with(task, keeper)
        cash_out(task, [*members, keeper])
        if task.pool():
            task.reclaim_pool(sender=w.creator)
        return net(w, before, [w.creator]) / T

    honest, cheated = both_ways(w, play)
    return Outcome(rules, honest, cheated, {"keeper_fee": fee / T, "pool": pool / T})


def propose_and_vote_with(task: FlockTask, keeper: str) -> None:
    """propose_and_vote, with `keeper` calling finalize."""
    from tests.flock import propose, vote

    propose(task)
    vote(task)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    task.finalize(sender=keeper)


def squatter_exits_at_once(w: World, rules: str) -> Outcome:
    """Finding 9: squatters fill registration, then exit() in round 0. v2 refunded the whole
    stake: holding a slot, and keeping others out, cost nothing. v3: exit() costs no_show_pct.
    The party is one squatter; honest: it does not join at all."""
    members, squatter = w.people[:3], w.people[3]

    def play(cheat: bool) -> float:
        before = wallets(w, [squatter])
        task = deploy(w, rules, replace(SMALL, min_participants=3, max_participants=4))
        for who in [*members, *([squatter] if cheat else [])]:
            task.join(sender=who)
        task.advance_to_phase(Phase.AWAIT_START)
        task.start()
        if cheat:
            task.exit(sender=squatter)
        return net(w, before, [squatter]) / T

    # squatting buys a slot (others kept out) for what it costs: positive gain = free squatting
    honest, cheated = both_ways(w, play)
    return Outcome(rules, honest, cheated)


def last_revealer_grinds(w: World, rules: str, trials: int = 12, candidates: int = 16) -> Outcome:
    """Finding 9: on a chain that makes a block per transaction, the last revealer tries
    `candidates` versions of its reveal (another gas limit: another transaction hash, another
    block hash) and keeps one that makes it the proposer, by computing the draw from the hash
    of the block its reveal landed in. Under v2 that block was the one the draw used; under v3
    the draw uses the beacon block, which takes no reveals and is mined after it. Eight
    members, one proposer; the party's net is its proposer share over `trials` rounds (fair:
    1/8), as tokens: share x 100."""
    members = w.people[:8]
    attacker = members[-1]
    params = replace(SMALL, min_participants=8, rounds=1, seed_reveal_blocks=12)
    task = deploy(w, rules, params)
    for who in members:
        task.join(sender=who)
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    start = w.chain.snapshot()

    def play(cheat: bool) -> float:
        wins = 0
        for trial in range(trials):
            w.chain.revert(start)
            seeds = {who: keccak(f"grind/{trial}/{who}".encode()) for who in members}
            for who, seed in seeds.items():
                task.commit_seed(seed_commitment(seed, who), sender=who)
            task.advance_to_phase(Phase.SEED_REVEAL)
            for who in members[:-1]:
                task.reveal_seed(seeds[who], sender=who)
            # the attacker reveals in the last block that takes reveals
            last = task.beacon_block() - (1 if rules == "v3" else 0)
            w.chain.advance_to(last)
            chosen = 0
            if cheat:
                for k in range(candidates):
                    probe = w.chain.snapshot()
                    block = _reveal(task, attacker, seeds[attacker], gas=200_000 + k)
                    guess = _predicted_proposer(task, seeds, members, block)
                    w.chain.revert(probe)
                    if guess == attacker:
                        chosen = k
                        break
            _reveal(task, attacker, seeds[attacker], gas=200_000 + chosen)
            task.advance_to_phase(Phase.AWAIT_DRAW)
            task.draw_roles()
            wins += task.proposers_of(0) == [attacker]
        w.chain.revert(start)
        return 100 * wins / trials

    honest, cheated = both_ways(w, play)
    return Outcome(rules, honest, cheated, {"trials": trials, "candidates": candidates})


def _reveal(task: FlockTask, who: str, seed: bytes, gas: int) -> int:
    """Send `who`'s reveal with gas limit `gas`; the block it landed in."""
    tx = task.contract.functions.reveal_seed(seed).transact({"from": who, "gas": gas})
    return int(task.chain.w3.eth.get_transaction_receipt(tx)["blockNumber"])


def _predicted_proposer(
    task: FlockTask, seeds: dict[str, bytes], members: list[str], block: int
) -> str:
    """The proposer the attacker expects if the draw mixes in `block`'s hash (as v2's did)."""
    proposers, _ = draw_in_python(task, 0, members, seeds=seeds, block=block)
    return proposers[0]


SCENARIOS: dict[str, Callable[[World, str], Outcome]] = {
    "majority lies in the last round (5)": majority_lies_in_the_last_round,
    "stake-heavy voter passes garbage (6)": heavy_voter_passes_garbage,
    "copy after an empty round (7)": copy_after_an_empty_round,
    "creator as keeper takes fees (8)": keeper_fees_return_the_pool,
    "squatter exits at once (9)": squatter_exits_at_once,
    "last revealer grinds the draw (9)": last_revealer_grinds,
}
