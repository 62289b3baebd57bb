"""FlockTask's rules on the embedded EVM: every payout and slash checked to the wei.

Roles are drawn from fixed seeds and the embedded chain's reproducible block hashes, so every
run draws the same roles; tests read the roles from the contract and decide votes from the
voters' stakes, so they do not depend on who was drawn. The five attacks on the first version
of the contract are in test_exploits.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_utils.crypto import keccak

from covey.errors import ConfigError
from covey.flock.chain import ContractRevert, TxResult
from covey.flock.commitments import proposal_commitment, seed_commitment, vote_commitment
from covey.flock.params import MAX_STAKE, TOKEN_UNIT, TaskParams
from covey.flock.task import FlockTask, Outcome, Phase, Role, RoundResult, SlashReason, Token
from tests.flock import (
    BUNDLE,
    FUNDS,
    SMALL,
    RoundPlan,
    World,
    beacon_block,
    contract_holdings,
    digest_of,
    draw_in_python,
    fixed_salt,
    fixed_seed,
    join_all,
    play_round,
    propose,
    propose_and_vote,
    seed_and_draw,
    start,
    update_digest,
)

pytestmark = pytest.mark.chain

T = TOKEN_UNIT


@pytest.fixture(scope="module")
def world() -> World:
    return World.create()


@pytest.fixture
def w(world: World) -> Iterator[World]:
    world.reset()
    yield world


def slashes(result: TxResult) -> dict[str, tuple[int, SlashReason]]:
    return {
        e["participant"]: (e["amount"], SlashReason(e["reason"])) for e in result.named("Slashed")
    }


def rewards(result: TxResult) -> dict[str, int]:
    return {e["participant"]: e["amount"] for e in result.named("Rewarded")}


# ---------------------------------------------------------------- the whole task


def test_happy_path_full_task(w: World) -> None:
    """join -> seeds -> roles -> propose -> vote -> finalize, twice; claim, then withdraw the
    stake. Every round pays the same budget at fixed rates and burns what it does not pay; at
    the end the creator takes back only the rounding dust no round could pay."""
    creator_start = w.token.balance_of(w.creator)
    task = w.task()
    assert task.phase() == Phase.REGISTRATION
    assert w.token.balance_of(task.address) == 1000 * T
    assert task.task_bundle == BUNDLE
    (created,) = task.events("TaskCreated")
    assert created == {
        "creator": w.creator,
        "token": w.token.address,
        "task_bundle": BUNDLE,
        "reward_pool": 1000 * T,
    }
    people = w.people[:4]
    join_all(task, people)
    assert task.participants() == people
    assert [task.stake_of(p) for p in people] == [10 * T] * 4
    assert start(task).named("TaskStarted") == [{"participants": 4}]
    assert task.round_budget() == SMALL.round_budget == 1000 * T // 2

    earned = dict.fromkeys(people, 0)
    burned = 0
    for r in range(2):
        assert task.current_round() == r
        assert task.phase() == Phase.SEED_COMMIT
        drawn = seed_and_draw(task, people)
        (roles,) = drawn.named("RolesDrawn")
        proposers, voters = task.proposers_of(r), task.voters_of(r)
        assert (roles["proposers"], roles["voters"]) == (proposers, voters)
        # the draw is the documented one: seeds and the beacon block's hash, then Fisher-Yates
        assert draw_in_python(task, r, people) == (proposers, voters)
        assert task.role_of(r, proposers[0]) == Role.PROPOSER
        assert {task.role_of(r, v) for v in voters} == {Role.VOTER}
        assert task.phase() == Phase.PROPOSE_COMMIT

        final = propose_and_vote(task)
        reward = 1000 * T // 2
        voter_budget = reward * 20 // 100
        # one proposal slot, two voter seats, each matched its one decided verdict
        expected = {proposers[0]: reward - voter_budget}
        expected |= dict.fromkeys(voters, voter_budget // 2)
        assert rewards(final) == expected
        paid = sum(expected.values())
        assert task.result(r) == RoundResult(Outcome.ACCEPTED, reward, paid, 0, 1, 0)
        assert task.tally(r).committed_weight == task.tally(r).revealed_weight == 2
        assert final.named("ProposalJudged") == [
            {
                "round": r,
                "proposer": proposers[0],
                "accept_votes": 2,
                "reject_votes": 0,
                "accepted": True,
                "rejected": False,
            }
        ]
        assert task.proposals(r) == [(proposers[0], update_digest(r, proposers[0]))]
        for who, amount in expected.items():
            earned[who] += amount
        burned += reward - paid
        assert task.burned() == burned
        assert task.pool() == 1000 * T - (r + 1) * reward
        assert contract_holdings(task) == w.token.balance_of(task.address)

    assert task.phase() == Phase.ENDED
    assert task.current_round() == 2
    for who in people:
        assert task.reward_of(who) == earned[who]
        if earned[who]:
            assert task.claim(sender=who).named("Claimed") == [
                {"participant": who, "amount": earned[who]}
            ]
        (withdrawn,) = task.withdraw(sender=who).named("Withdrawn")
        assert withdrawn == {"participant": who, "stake": 10 * T}
        # every wei accounted for: the stake back, plus rewards
        assert w.token.balance_of(who) == FUNDS + earned[who]
    leftover = 1000 * T - 2 * (1000 * T // 2)  # rounding dust (none here)
    assert task.pool() == leftover
    if leftover:
        task.reclaim_pool(sender=w.creator)
    else:
        with pytest.raises(ContractRevert, match="reclaim_pool: pool is empty"):
            task.reclaim_pool(sender=w.creator)
    assert w.token.balance_of(w.creator) == creator_start - 1000 * T + leftover
    assert w.token.balance_of(task.address) == task.burned() == burned


def test_every_transaction_emits_an_event(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    results = [task.join("http://127.0.0.1:9000", sender=p) for p in people]
    results.append(task.set_endpoint("https://peer.example", sender=people[0]))
    task.advance_to_phase(Phase.AWAIT_START)
    results.append(task.start())
    r = 0
    for p in people:
        results.append(task.commit_seed(seed_commitment(fixed_seed(r, p), p), sender=p))
    task.advance_to_phase(Phase.SEED_REVEAL)
    results += [task.reveal_seed(fixed_seed(r, p), sender=p) for p in people]
    task.advance_to_phase(Phase.AWAIT_DRAW)
    results.append(task.draw_roles())
    (proposer,) = task.proposers_of(r)
    salt = fixed_salt(r, proposer)
    commitment = proposal_commitment(digest_of("x"), salt, proposer)
    results.append(task.commit_proposal(commitment, sender=proposer))
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    results.append(task.reveal_proposal(digest_of("x"), salt, sender=proposer))
    task.advance_to_phase(Phase.VOTE_COMMIT)
    for v in task.voters_of(r):
        results.append(task.commit_vote(vote_commitment(1, fixed_salt(r, v), v), sender=v))
    task.advance_to_phase(Phase.VOTE_REVEAL)
    results += [task.reveal_vote(1, fixed_salt(r, v), sender=v) for v in task.voters_of(r)]
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    results.append(task.finalize())
    results.append(task.claim(sender=proposer))
    missing = [res.function for res in results if not res.events]
    assert not missing, f"no event from {missing}"


def test_task_bundle_deployment_block_and_endpoints(w: World) -> None:
    """What a participant on another machine needs: the bundle, where to start scanning events,
    and where each peer serves its blobs."""
    task = w.task()
    deployed = w.chain.block_number
    again = FlockTask.attach(w.chain, task.address)
    assert again.task_bundle == BUNDLE and again.deployed_at == deployed
    a, b = w.people[:2]
    task.join("http://10.0.0.1:8000", sender=a)
    task.join(sender=b)  # serves nothing (yet)
    assert again.endpoint_of(a) == "http://10.0.0.1:8000"
    assert again.endpoint_of(b) == ""
    assert task.set_endpoint("https://b.example", sender=b).named("EndpointSet") == [
        {"participant": b, "endpoint": "https://b.example"}
    ]
    assert again.endpoint_of(b) == "https://b.example"
    with pytest.raises(ContractRevert, match="set_endpoint: not a participant"):
        task.set_endpoint("https://c.example", sender=w.people[2])
    long = "https://" + "a" * 250 + ".example"
    paths = ("http://b.example/blobs", "http://b.example/?", "http://u@b.example")
    for bad in ("ftp://x", "not a url", "http://", long, *paths):
        with pytest.raises(ConfigError, match="endpoint"):
            task.set_endpoint(bad, sender=a)
    # events are read from the deployment block in ranges of log_range blocks
    w.chain.log_range = 2
    assert [e["participant"] for e in task.events("Joined")] == [a, b]
    assert task.events("Joined", from_block=w.chain.block_number + 1) == []
    with pytest.raises(ConfigError, match="task_bundle"):
        FlockTask.deploy(w.chain, w.token, SMALL, b"\0" * 32, sender=w.creator)


# ---------------------------------------------------------------- settlement rules


def two_proposers_three_voters(w: World) -> tuple[FlockTask, list[str], list[str]]:
    """Five participants, roles drawn for round 0: 2 proposers, 3 voters (in draw order)."""
    task = w.task(proposers_per_round=2, voters_per_round=3, min_participants=5)
    people = w.people[:5]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    return task, task.proposers_of(0), task.voters_of(0)


REWARD = 1000 * T // 2  # SMALL: 1000 tokens over 2 rounds, no keeper fee
VOTER_BUDGET = REWARD * 20 // 100
PER_SEAT = VOTER_BUDGET // 3  # three voters
PER_PROPOSAL = (REWARD - VOTER_BUDGET) // 2  # two proposers


def test_an_accepted_round_pays_each_winner_a_fixed_rate(w: World) -> None:
    """Two of three ballots accept both proposals: each accepted proposal earns its slot's
    part, each voter that matched its seat's part; the outvoted voter is slashed and its part
    burned, not shared among the winners."""
    task, proposers, (a, b, c) = two_proposers_three_voters(w)
    final = propose_and_vote(task, RoundPlan(votes={a: True, b: True, c: False}))
    expected = dict.fromkeys(proposers, PER_PROPOSAL) | {a: PER_SEAT, b: PER_SEAT}
    assert rewards(final) == expected
    assert slashes(final) == {c: (T, SlashReason.LOSING_VOTE)}
    result = task.result(0)
    assert (result.outcome, result.accepted, result.rejected) == (Outcome.ACCEPTED, 0b11, 0)
    assert (result.paid, result.slashed) == (sum(expected.values()), T)
    assert task.burned() == REWARD - result.paid + T
    assert task.pool() == 1000 * T - REWARD
    assert task.tally(0).revealed_count == 3
    for judged in final.named("ProposalJudged"):
        assert (judged["accept_votes"], judged["reject_votes"]) == (2, 1)
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_a_rejected_round_slashes_proposers_and_burns_their_part(w: World) -> None:
    """Two of three reject: both proposals rejected and slashed; the two right voters earn
    their seats' part, the proposers' part is burned (no later round gets it)."""
    task, proposers, (a, b, c) = two_proposers_three_voters(w)
    final = propose_and_vote(task, RoundPlan(votes={a: False, b: False, c: True}))
    result = task.result(0)
    assert result.outcome == Outcome.REJECTED and result.rejected == 0b11
    assert rewards(final) == {a: PER_SEAT, b: PER_SEAT}
    expected_slashes = dict.fromkeys(proposers, (T, SlashReason.PROPOSAL_REJECTED))
    assert slashes(final) == expected_slashes | {c: (T, SlashReason.LOSING_VOTE)}
    assert task.burned() == REWARD - 2 * PER_SEAT + 3 * T
    assert task.pool() == 1000 * T - REWARD
    assert task.total_staked() == 50 * T - 3 * T
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_each_proposal_is_judged_on_its_own(w: World) -> None:
    """A mixed round: the good proposal is paid, the bad one slashed; each voter is paid its
    seat's part times the share of verdicts it got right and slashed for the share it got
    wrong."""
    task, proposers, (a, b, c) = two_proposers_three_voters(w)
    # a accepts proposal 0 and rejects 1: that is the verdict; b accepts both, c neither
    votes = {a: 0b01, b: 0b11, c: 0b00}
    final = propose_and_vote(task, RoundPlan(votes=votes))
    result = task.result(0)
    assert result.outcome == Outcome.ACCEPTED
    assert (result.accepted, result.rejected) == (0b01, 0b10)
    assert result.accepted_proposers(proposers) == [proposers[0]]
    assert rewards(final) == {
        proposers[0]: PER_PROPOSAL,  # its slot's part, not the whole proposers' part
        a: PER_SEAT,
        b: PER_SEAT // 2,  # right on one of two
        c: PER_SEAT // 2,
    }
    assert slashes(final) == {
        proposers[1]: (T, SlashReason.PROPOSAL_REJECTED),
        b: (10 * T * 10 // 200, SlashReason.LOSING_VOTE),  # half a slash
        c: (10 * T * 10 // 200, SlashReason.LOSING_VOTE),
    }
    judged = {e["proposer"]: e for e in final.named("ProposalJudged")}
    assert [judged[p]["accept_votes"] for p in proposers] == [2, 1]
    assert [judged[p]["accepted"] for p in proposers] == [True, False]
    assert task.vote_of(0, b).accepts == 0b11
    assert contract_holdings(task) == w.token.balance_of(task.address)


@pytest.mark.parametrize("threshold", [40, 50, 60])
def test_a_tie_decides_nothing_at_threshold_50(w: World, threshold: int) -> None:
    """Two voters: one accepts both proposals, the other only the first. The second has one
    ballot each way: at threshold 50 (more than half to accept, more than half to reject)
    nobody is paid or slashed for it; at 40 one ballot accepts it, at 60 one rejects it."""
    task = w.task(
        proposers_per_round=2, voters_per_round=2, min_participants=4, threshold_pct=threshold
    )
    people = w.people[:4]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    proposers, (both, first_only) = task.proposers_of(0), task.voters_of(0)
    final = propose_and_vote(task, RoundPlan(votes={both: 0b11, first_only: 0b01}))
    result = task.result(0)
    per_proposal, per_seat = (REWARD - VOTER_BUDGET) // 2, VOTER_BUDGET // 2
    if threshold == 50:
        assert (result.accepted, result.rejected) == (0b01, 0)
        # one decided verdict, both voters matched it; the undecided proposer is untouched
        assert rewards(final) == {proposers[0]: per_proposal, both: per_seat, first_only: per_seat}
        assert slashes(final) == {}
    elif threshold == 40:
        assert (result.accepted, result.rejected) == (0b11, 0)
        assert rewards(final) == {
            proposers[0]: per_proposal,
            proposers[1]: per_proposal,
            both: per_seat,
            first_only: per_seat // 2,
        }
        assert slashes(final) == {first_only: (T // 2, SlashReason.LOSING_VOTE)}
    else:
        assert (result.accepted, result.rejected) == (0b01, 0b10)
        assert rewards(final) == {
            proposers[0]: per_proposal,
            both: per_seat // 2,
            first_only: per_seat,
        }
        assert slashes(final) == {
            proposers[1]: (T, SlashReason.PROPOSAL_REJECTED),
            both: (T // 2, SlashReason.LOSING_VOTE),
        }
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_verdicts_on_silent_proposers_are_ignored_and_extra_bits_refused(w: World) -> None:
    task, proposers, voters = two_proposers_three_voters(w)
    propose(task, RoundPlan(skip_propose={proposers[1]}))
    task.advance_to_phase(Phase.VOTE_COMMIT)
    too_wide = voters[0]
    masks = {too_wide: 0b111, voters[1]: 0b11, voters[2]: 0b01}  # bit 2: no such proposer
    for v, mask in masks.items():
        task.commit_vote(vote_commitment(mask, fixed_salt(0, v), v), sender=v)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    with pytest.raises(ContractRevert, match="reveal_vote: accepts has bits beyond"):
        task.reveal_vote(0b111, fixed_salt(0, too_wide), sender=too_wide)
    for v in voters[1:]:
        task.reveal_vote(masks[v], fixed_salt(0, v), sender=v)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    final = task.finalize()
    # judged against all three committed ballots: 2 of 3 accept, more than half
    assert task.result(0).accepted == 0b01
    # both revealed voters were right on the one valid proposal: paid alike, not slashed
    assert rewards(final) == {
        proposers[0]: PER_PROPOSAL,
        voters[1]: PER_SEAT,
        voters[2]: PER_SEAT,
    }
    # missing a duty costs no_show_pct (20%), more than being wrong (slash_pct, 10%)
    assert slashes(final) == {
        proposers[1]: (2 * T, SlashReason.NO_PROPOSAL),
        too_wide: (2 * T, SlashReason.VOTE_NOT_REVEALED),
    }


def test_no_shows_pay_more_than_losers_and_count_missed_rounds(w: World) -> None:
    """Seed not revealed, seed not committed, proposal not revealed, vote committed but not
    revealed, vote never committed: each loses no_show_pct and counts a missed round."""
    task = w.task(proposers_per_round=2, voters_per_round=3, min_participants=5)
    people = w.people[:7]
    join_all(task, people)
    start(task)
    withholder, sitter = people[5], people[6]
    drawn = seed_and_draw(task, people, RoundPlan(withhold_seed={withholder}, skip_seed={sitter}))
    # both sit the round out and lose 20% at the draw
    assert slashes(drawn) == {
        withholder: (2 * T, SlashReason.SEED_NOT_REVEALED),
        sitter: (2 * T, SlashReason.SEED_NOT_COMMITTED),
    }
    assert task.role_of(0, withholder) == Role.NONE
    assert task.role_of(0, sitter) == Role.NONE
    proposers, voters = task.proposers_of(0), task.voters_of(0)
    assert draw_in_python(task, 0, people[:5]) == (proposers, voters)

    silent_proposer = proposers[1]
    no_reveal, no_commit, _accepts = voters
    plan = RoundPlan(
        withhold_proposal={silent_proposer},
        skip_vote_commit={no_commit},
        skip_vote_reveal={no_reveal},
    )
    final = propose_and_vote(task, plan)
    assert slashes(final) == {
        silent_proposer: (2 * T, SlashReason.NO_PROPOSAL),
        no_reveal: (2 * T, SlashReason.VOTE_NOT_REVEALED),
        no_commit: (2 * T, SlashReason.VOTE_NOT_REVEALED),
    }
    # one of two committed ballots accepts: not more than half, the withheld one was pivotal
    assert rewards(final) == {}
    result = task.result(0)
    assert result.outcome == Outcome.NO_QUORUM
    # the round's slashes include the seed no-shows', taken at the draw
    everyone = [withholder, sitter, silent_proposer, no_reveal, no_commit]
    assert result.slashed == 2 * T * len(everyone)
    assert task.burned() == REWARD + result.slashed
    assert {p: task.missed_rounds(p) for p in people if task.missed_rounds(p)} == dict.fromkeys(
        everyone, 1
    )


def test_no_proposals_closes_voting_and_slashes_only_proposers(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    (proposer,) = task.proposers_of(0)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    voter = task.voters_of(0)[0]
    with pytest.raises(ContractRevert, match="commit_vote: no valid proposals this round"):
        task.commit_vote(vote_commitment(1, fixed_salt(0, voter), voter), sender=voter)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    final = task.finalize()
    assert task.result(0).outcome == Outcome.NO_PROPOSALS
    assert slashes(final) == {proposer: (2 * T, SlashReason.NO_PROPOSAL)}
    assert rewards(final) == {}
    assert task.burned() == REWARD + 2 * T


def test_no_quorum_pays_nobody_and_slashes_silent_voters(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    voters = task.voters_of(0)
    final = propose_and_vote(task, RoundPlan(skip_vote_commit=set(voters)))
    assert task.result(0).outcome == Outcome.NO_QUORUM
    # nobody judged the proposal: its proposer is neither paid nor slashed
    assert slashes(final) == {v: (2 * T, SlashReason.VOTE_NOT_REVEALED) for v in voters}
    assert rewards(final) == {}


def test_every_round_has_the_same_budget_and_burns_what_it_does_not_pay(w: World) -> None:
    """Rejected round, void round, accepted round: each has the budget fixed at creation;
    neither the rejected proposer's part nor the void round's budget nor any slash reaches a
    later round (that would pay whoever lies now in the rounds to come)."""
    task = w.task(rounds=3)
    people = w.people[:4]
    join_all(task, people)
    start(task)
    budget = 1000 * T // 3
    assert task.round_budget() == budget

    # round 0: everyone rejects
    seed_and_draw(task, people)
    propose_and_vote(task, RoundPlan(votes=dict.fromkeys(task.voters_of(0), False)))
    r0 = task.result(0)
    assert (r0.outcome, r0.reward) == (Outcome.REJECTED, budget)
    assert task.pool() == 1000 * T - budget
    assert task.burned() == budget - r0.paid + r0.slashed

    # round 1: only two reveal a seed, fewer than 1 proposer + 2 voters: void, nothing paid,
    # its budget burned; the two that did not commit are slashed
    void = seed_and_draw(task, people, RoundPlan(skip_seed=set(people[2:])))
    (finalized,) = void.named("RoundFinalized")
    assert (finalized["outcome"], finalized["reward"], finalized["paid"]) == (
        Outcome.VOID,
        budget,
        0,
    )
    assert task.result(1).outcome == Outcome.VOID
    assert finalized["slashed"] == sum(task.stake_of(p) for p in people[2:]) // 4  # 20% of 80%
    assert task.pool() == 1000 * T - 2 * budget
    assert task.current_round() == 2

    # round 2, the last: the same budget, not the whole pool
    play_round(task, people)
    r2 = task.result(2)
    assert (r2.outcome, r2.reward) == (Outcome.ACCEPTED, budget)
    assert task.phase() == Phase.ENDED
    assert task.pool() == 1000 * T - 3 * budget  # rounding dust, the creator's to reclaim
    assert task.burned() == 3 * budget - r0.paid - r2.paid + r0.slashed + finalized["slashed"]
    assert contract_holdings(task) == w.token.balance_of(task.address)


# ---------------------------------------------------------------- keepers, timeouts, evictions


def test_keeper_fee_pays_whoever_moves_the_phases(w: World) -> None:
    """start, draw_roles and finalize pay keeper_fee from the set-aside fees to their caller,
    anyone; the round budget is what is left after setting every fee aside."""
    task = w.task(keeper_fee=2 * T)
    people, keeper = w.people[:3], w.people[5]
    join_all(task, people)
    task.advance_to_phase(Phase.AWAIT_START)
    assert task.start(sender=keeper).named("KeeperPaid") == [
        {"round": 0, "keeper": keeper, "amount": 2 * T}
    ]
    seed_and_draw(task, people)  # draw_roles from the default account
    assert task.reward_of(keeper) == 2 * T
    assert task.pool() == 1000 * T - 4 * T
    propose(task)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    budget = (1000 * T - 2 * T * (1 + 2 * 2)) // 2
    assert task.round_budget() == budget
    final = task.finalize(sender=keeper)
    assert final.named("KeeperPaid") == [{"round": 0, "keeper": keeper, "amount": 2 * T}]
    assert task.result(0).reward == budget
    assert task.claim(sender=keeper).named("Claimed")[0]["amount"] == 4 * T
    assert w.token.balance_of(keeper) == FUNDS + 4 * T
    # every transition's fee together at most 5% of the pool: 7 x 7 = 49 of 1000 passes
    TaskParams(reward_pool=1000 * T, rounds=3, keeper_fee=7 * T).validate()
    with pytest.raises(ConfigError, match="keeper_fee at most 7142857142857142857 wei"):
        TaskParams(reward_pool=1000 * T, rounds=3, keeper_fee=8 * T).validate()


def test_a_stalled_task_lets_everyone_out(w: World) -> None:
    """Nobody finalizes for timeout_blocks: the task is STALLED, transitions are refused, each
    participant withdraws its stake and the creator takes back the budgets of the rounds that
    were not played (the stalled one included: nobody was paid for it)."""
    creator_start = w.token.balance_of(w.creator)
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    propose(task)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    assert task.phase_end() == task.stage_start() + 8 * 4 + SMALL.timeout_blocks
    task.advance_to_phase(Phase.STALLED)
    assert task.phase() == Phase.STALLED and task.phase_end() == 0
    with pytest.raises(ContractRevert, match="finalize: only in AWAIT_FINALIZE"):
        task.finalize()
    with pytest.raises(ContractRevert, match="reclaim_pool: only the creator"):
        task.reclaim_pool(sender=people[0])
    got = [task.withdraw(sender=p).named("Withdrawn")[0] for p in people]
    assert [g["stake"] for g in got] == [10 * T] * 3
    assert task.reclaim_pool(sender=w.creator).named("PoolReclaimed")[0]["amount"] == 1000 * T
    assert w.token.balance_of(w.creator) == creator_start
    assert w.token.balance_of(task.address) == 0


def test_a_task_never_started_returns_the_pool_to_its_creator(w: World) -> None:
    creator_start = w.token.balance_of(w.creator)
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    task.advance_to_phase(Phase.STALLED)  # nobody called start
    for p in people:
        assert task.withdraw(sender=p).named("Withdrawn")[0] == {"participant": p, "stake": 10 * T}
    task.reclaim_pool(sender=w.creator)
    assert w.token.balance_of(w.creator) == creator_start
    assert w.token.balance_of(task.address) == 0


def test_missed_rounds_evict_and_free_the_slot_for_a_latecomer(w: World) -> None:
    task = w.task(max_participants=3, max_missed_rounds=2, rounds=3)
    people = w.people[:3]
    absent, latecomer = people[2], w.people[3]
    join_all(task, people)
    start(task)
    with pytest.raises(ContractRevert, match="join: task is full"):
        task.join(sender=latecomer)
    seed_and_draw(task, people, RoundPlan(skip_seed={absent}))  # void: 2 < 3 revealers
    assert task.missed_rounds(absent) == 1 and absent in task.participants()
    drawn = seed_and_draw(task, people, RoundPlan(skip_seed={absent}))
    (evicted,) = drawn.named("Evicted")
    assert evicted == {"round": 1, "participant": absent, "refund": 10 * T * 8 // 10 * 8 // 10}
    assert absent not in task.participants() and task.stake_of(absent) == 0
    assert task.reward_of(absent) == evicted["refund"]  # its stake, less two no-show slashes
    # round 2: the freed slot takes a latecomer during SEED_COMMIT, who plays at once
    task.join(sender=latecomer)
    assert latecomer in task.participants()
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(sender=absent)
    play_round(task, [p for p in people if p != absent] + [latecomer])
    assert task.result(2).outcome == Outcome.ACCEPTED
    task.claim(sender=absent)
    assert w.token.balance_of(absent) == FUNDS - 10 * T + evicted["refund"]


def test_windows_are_sized_from_block_time_and_training() -> None:
    from covey.flock.params import EMBEDDED_TIMING, Timing, phase_windows

    mainnet = Timing(block_time_s=12, train_s=600, judge_s=120, tx_s=30, txs_per_block=50)
    windows = phase_windows(mainnet, participants=64)
    # training: 2 x (600 + 30) s / 12 s = 105 blocks, +1 for the block that opens the window
    assert windows["propose_commit_blocks"] == 106
    assert windows["vote_commit_blocks"] == 2 * 150 // 12 + 1
    # registration: approve + join for 64 people, 128 transactions at 50 a block
    assert windows["registration_blocks"] == max(2 * 60 // 12, 6) + 1
    assert windows["timeout_blocks"] == 106
    params = TaskParams(max_participants=64, **windows)
    params.check_windows(mainnet)
    with pytest.raises(ConfigError, match="propose_commit_blocks = 10 < 54"):
        TaskParams(max_participants=64).check_windows(mainnet)
    # the embedded chain: a block per transaction, no time passes while training
    # (+ the beacon block at the end of the reveal window)
    assert phase_windows(EMBEDDED_TIMING, participants=5)["seed_reveal_blocks"] == 12
    assert phase_windows(EMBEDDED_TIMING, participants=5)["registration_blocks"] == 21


def test_phase_at_predicts_the_block_a_transaction_lands_in(w: World) -> None:
    task = w.task()
    end = task.registration_end()
    assert task.phase_at(end - 1) == (Phase.REGISTRATION, end)
    assert task.phase_at(end) == (Phase.AWAIT_START, end + SMALL.timeout_blocks)
    assert task.phase_at(end + SMALL.timeout_blocks) == (Phase.STALLED, 0)
    for who in w.people[:2]:
        w.token.approve(task.address, 10 * T, sender=who)
    w.chain.advance_to(end - 1)  # the next transaction lands in the last registration block
    task.join(sender=w.people[0], approve=False)
    with pytest.raises(ContractRevert, match="join: only in REGISTRATION or SEED_COMMIT"):
        task.join(sender=w.people[1], approve=False)


# ---------------------------------------------------------------- commit-reveal integrity


def test_reveal_with_wrong_salt_or_from_another_address_fails(w: World) -> None:
    task = w.task()
    people = w.people[:4]
    join_all(task, people)
    start(task)
    r = 0
    for p in people:
        task.commit_seed(seed_commitment(fixed_seed(r, p), p), sender=p)
    task.advance_to_phase(Phase.SEED_REVEAL)
    a, b = people[:2]
    with pytest.raises(ContractRevert, match="reveal_seed: seed does not match commitment"):
        task.reveal_seed(fixed_seed(r, b), sender=a)  # someone else's seed
    with pytest.raises(ContractRevert, match="reveal_seed: seed does not match commitment"):
        task.reveal_seed(keccak(b"wrong"), sender=a)
    for p in people:
        task.reveal_seed(fixed_seed(r, p), sender=p)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    task.draw_roles()
    (proposer,) = task.proposers_of(r)
    v1, v2 = task.voters_of(r)
    outsider = next(p for p in people if task.role_of(r, p) == Role.NONE)
    digest, salt = digest_of("u"), fixed_salt(r, proposer)
    task.commit_proposal(proposal_commitment(digest, salt, proposer), sender=proposer)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    mismatch = "reveal_proposal: digest does not match commitment"
    with pytest.raises(ContractRevert, match=mismatch):
        task.reveal_proposal(digest_of("other"), salt, sender=proposer)
    with pytest.raises(ContractRevert, match=mismatch):
        task.reveal_proposal(digest, fixed_salt(r, v1), sender=proposer)
    with pytest.raises(ContractRevert, match="reveal_proposal: no proposal committed"):
        task.reveal_proposal(digest, salt, sender=v1)  # the proposer's opening, sent by v1
    task.reveal_proposal(digest, salt, sender=proposer)
    assert task.proposal_of(r, proposer).valid
    task.advance_to_phase(Phase.VOTE_COMMIT)
    task.commit_vote(vote_commitment(1, fixed_salt(r, v1), v1), sender=v1)
    task.commit_vote(vote_commitment(0, fixed_salt(r, v2), v2), sender=v2)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    mismatch = "reveal_vote: vote does not match commitment"
    with pytest.raises(ContractRevert, match=mismatch):
        task.reveal_vote(1, fixed_salt(r, v2), sender=v1)  # wrong salt
    with pytest.raises(ContractRevert, match=mismatch):
        task.reveal_vote(0, fixed_salt(r, v1), sender=v1)  # flipped vote
    with pytest.raises(ContractRevert, match=mismatch):
        task.reveal_vote(1, fixed_salt(r, v1), sender=v2)  # v1's opening, sent by v2
    with pytest.raises(ContractRevert, match="reveal_vote: no vote committed"):
        task.reveal_vote(1, fixed_salt(r, v1), sender=outsider)
    assert task.tally(r).revealed_count == 0
    task.reveal_vote(1, fixed_salt(r, v1), sender=v1)
    assert task.vote_of(r, v1).revealed and task.vote_of(r, v1).weight == 1


def test_the_beacon_block_takes_no_reveals(w: World) -> None:
    """The reveal window's last block is the beacon: a reveal cannot land in the block whose
    hash the draw mixes in, so no revealer's transaction can shape it."""
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    start(task)
    for p in people:
        task.commit_seed(seed_commitment(fixed_seed(0, p), p), sender=p)
    task.advance_to_phase(Phase.SEED_REVEAL)
    beacon = task.beacon_block()
    assert beacon == beacon_block(task, 0) == task.phase_end() - 1
    for p in people[:2]:
        task.reveal_seed(fixed_seed(0, p), sender=p)
    w.chain.advance_to(beacon)  # the next transaction lands in the beacon block
    assert task.phase() == Phase.SEED_REVEAL
    with pytest.raises(ContractRevert, match="reveal_seed: the reveal window's last block"):
        task.reveal_seed(fixed_seed(0, people[2]), sender=people[2])
    task.advance_to_phase(Phase.AWAIT_DRAW)
    drawn = task.draw_roles()
    assert slashes(drawn) == {people[2]: (2 * T, SlashReason.SEED_NOT_REVEALED)}


def test_a_digest_counts_once_in_the_whole_task(w: World) -> None:
    """A digest revealed in an earlier round is a duplicate in a later one (a missed duty),
    whoever reveals it: the author again, or a copier after a round that accepted nothing."""
    task = w.task(rounds=3, max_missed_rounds=5)
    people = w.people[:3]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    (author,) = task.proposers_of(0)
    # round 0: nothing is accepted (every voter withholds), so the global adapter is unchanged
    propose_and_vote(task, RoundPlan(skip_vote_commit=set(task.voters_of(0))))
    assert task.result(0).outcome == Outcome.NO_QUORUM
    old = update_digest(0, author)
    for r in (1, 2):
        seed_and_draw(task, people)
        (proposer,) = task.proposers_of(r)
        salt = fixed_salt(r, proposer)
        task.commit_proposal(proposal_commitment(old, salt, proposer), sender=proposer)
        task.advance_to_phase(Phase.PROPOSE_REVEAL)
        revealed = task.reveal_proposal(old, salt, sender=proposer)
        assert revealed.named("DuplicateProposal") == [
            {"round": r, "proposer": proposer, "original": author}
        ]
        assert task.proposal_count(r) == 0 and not task.proposal_of(r, proposer).valid
        task.advance_to_phase(Phase.AWAIT_FINALIZE)
        final = task.finalize()
        assert slashes(final)[proposer][1] == SlashReason.DUPLICATE_PROPOSAL
        assert rewards(final) == {}
    assert task.proposals(0) == [(author, old)]  # still the author's, in its own round


def test_double_actions_fail(w: World) -> None:
    """No second join, seed commit or reveal, proposal commit or reveal, vote commit or reveal."""
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(sender=people[0])
    start(task)
    p = people[0]
    task.commit_seed(seed_commitment(fixed_seed(0, p), p), sender=p)
    with pytest.raises(ContractRevert, match="commit_seed: already committed"):
        task.commit_seed(seed_commitment(fixed_seed(0, p), p), sender=p)
    for q in people[1:]:
        task.commit_seed(seed_commitment(fixed_seed(0, q), q), sender=q)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for q in people:
        task.reveal_seed(fixed_seed(0, q), sender=q)
    with pytest.raises(ContractRevert, match="reveal_seed: already revealed"):
        task.reveal_seed(fixed_seed(0, p), sender=p)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    task.draw_roles()
    (proposer,) = task.proposers_of(0)
    salt = fixed_salt(0, proposer)
    task.commit_proposal(proposal_commitment(digest_of("a"), salt, proposer), sender=proposer)
    with pytest.raises(ContractRevert, match="commit_proposal: already committed"):
        task.commit_proposal(proposal_commitment(digest_of("b"), salt, proposer), sender=proposer)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    task.reveal_proposal(digest_of("a"), salt, sender=proposer)
    with pytest.raises(ContractRevert, match="reveal_proposal: already revealed"):
        task.reveal_proposal(digest_of("a"), salt, sender=proposer)
    voter = task.voters_of(0)[0]
    task.advance_to_phase(Phase.VOTE_COMMIT)
    task.commit_vote(vote_commitment(1, fixed_salt(0, voter), voter), sender=voter)
    with pytest.raises(ContractRevert, match="commit_vote: already voted"):
        task.commit_vote(vote_commitment(0, fixed_salt(0, voter), voter), sender=voter)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    task.reveal_vote(1, fixed_salt(0, voter), sender=voter)
    with pytest.raises(ContractRevert, match="reveal_vote: already revealed"):
        task.reveal_vote(1, fixed_salt(0, voter), sender=voter)
    assert task.tally(0).revealed_count == 1


# ---------------------------------------------------------------- phases, roles, cap


CALLS = {
    "join": ("",),
    "start": (),
    "commit_seed": (b"\x01" * 32,),
    "reveal_seed": (b"\x02" * 32,),
    "draw_roles": (),
    "commit_proposal": (b"\x03" * 32,),
    "reveal_proposal": (b"\x03" * 32, b"\x04" * 32),
    "commit_vote": (b"\x04" * 32,),
    "reveal_vote": (1, b"\x05" * 32),
    "finalize": (),
    "withdraw": (),
}
ALLOWED = {
    Phase.REGISTRATION: {"join"},
    Phase.AWAIT_START: {"start"},
    Phase.SEED_COMMIT: {"join", "commit_seed"},
    Phase.SEED_REVEAL: {"reveal_seed"},
    Phase.AWAIT_DRAW: {"draw_roles"},
    Phase.PROPOSE_COMMIT: {"commit_proposal"},
    Phase.PROPOSE_REVEAL: {"reveal_proposal"},
    Phase.VOTE_COMMIT: {"commit_vote"},
    Phase.VOTE_REVEAL: {"reveal_vote"},
    Phase.AWAIT_FINALIZE: {"finalize"},
    Phase.ENDED: {"withdraw"},
}


def phase_errors(task: FlockTask, sender: str) -> dict[str, str]:
    """The revert reason of every phase-bound function, as an eth_call from `sender`."""
    out = {}
    for name, args in CALLS.items():
        try:
            task.contract.functions[name](*args).call(
                {"from": sender}, block_identifier=task.chain.call_block
            )
        except Exception as e:
            out[name] = str(e)
        else:
            out[name] = ""
    return out


def test_calls_outside_their_phase_fail(w: World) -> None:
    task = w.task(rounds=1)
    people = w.people[:3]
    seen = []

    def check(sender: str) -> None:
        phase = task.phase()
        seen.append(phase)
        for name, error in phase_errors(task, sender).items():
            if name not in ALLOWED.get(phase, set()):
                assert "only in" in error, (phase, name, error)
            else:
                assert "only in" not in error, (phase, name, error)

    check(people[0])
    join_all(task, people)
    task.advance_to_phase(Phase.AWAIT_START)
    check(people[0])
    task.start()
    check(people[0])
    for p in people:
        task.commit_seed(seed_commitment(fixed_seed(0, p), p), sender=p)
    task.advance_to_phase(Phase.SEED_REVEAL)
    check(people[0])
    for p in people:
        task.reveal_seed(fixed_seed(0, p), sender=p)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    check(people[0])
    task.draw_roles()
    (proposer,) = task.proposers_of(0)
    voter = task.voters_of(0)[0]
    check(proposer)
    salt = fixed_salt(0, proposer)
    task.commit_proposal(proposal_commitment(digest_of("p"), salt, proposer), sender=proposer)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    check(proposer)
    task.reveal_proposal(digest_of("p"), salt, sender=proposer)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    check(voter)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    check(voter)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    check(voter)
    task.finalize()  # the task has one round: this ends it
    check(voter)
    assert seen == list(Phase)[: Phase.ENDED + 1]
    with pytest.raises(ContractRevert, match="start: only in AWAIT_START"):
        task.start()


def test_roles_gate_propose_and_vote(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    join_all(task, people)
    start(task)
    seed_and_draw(task, people)
    (proposer,) = task.proposers_of(0)
    voter = task.voters_of(0)[0]
    salt = fixed_salt(0, voter)
    with pytest.raises(ContractRevert, match="commit_proposal: not a proposer this round"):
        task.commit_proposal(proposal_commitment(digest_of("v"), salt, voter), sender=voter)
    with pytest.raises(ContractRevert, match="commit_proposal: empty commitment"):
        task.commit_proposal(b"\x00" * 32, sender=proposer)
    empty = proposal_commitment(b"\x00" * 32, salt, proposer)
    task.commit_proposal(empty, sender=proposer)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    with pytest.raises(ContractRevert, match="reveal_proposal: empty digest"):
        task.reveal_proposal(b"\x00" * 32, salt, sender=proposer)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    with pytest.raises(ContractRevert, match="commit_vote: not a voter this round"):
        task.commit_vote(vote_commitment(1, b"s" * 32, proposer), sender=proposer)
    with pytest.raises(ContractRevert, match="commit_seed: only in SEED_COMMIT"):
        task.commit_seed(b"\x01" * 32, sender=voter)


def test_participant_cap_and_one_fixed_stake(w: World) -> None:
    """Every member stakes exactly `stake`: no stake buys more draws or more votes."""
    task = w.task(max_participants=3)
    a, b, c, d = w.people[:4]
    w.token.approve(task.address, 100 * T, sender=a)  # approving more does not stake more
    task.join(sender=a, approve=False)
    assert task.stake_of(a) == 10 * T and w.token.balance_of(a) == FUNDS - 10 * T
    (joined,) = task.events("Joined")
    assert joined["amount"] == 10 * T
    with pytest.raises(ContractRevert, match="exceeds allowance"):
        task.join(sender=b, approve=False)  # no allowance
    join_all(task, [b, c])
    with pytest.raises(ContractRevert, match="join: task is full"):
        task.join(sender=d)
    assert task.participant_count() == 3
    assert w.token.balance_of(d) == FUNDS - 0  # nothing taken from a refused joiner
    with pytest.raises(ConfigError, match=r"stake must be in 1\.\.2\*\*96"):
        TaskParams(stake=MAX_STAKE + 1).validate()


def test_hard_caps_are_enforced_on_chain_and_in_python(w: World) -> None:
    too_big = TaskParams(max_participants=65)
    with pytest.raises(ConfigError, match="max_participants is capped at 64"):
        too_big.validate()
    factory = w.chain.factory("FlockTask")
    cases = {
        "init: max_participants above the hard cap": too_big,
        "init: timeout_blocks not in 1..255": TaskParams(timeout_blocks=256),
        "init: need slash_pct < no_show_pct <= 100": TaskParams(slash_pct=20, no_show_pct=20),
        "init: reward_pool above MAX_POOL": TaskParams(reward_pool=2**96 + 1),
        "init: keeper fees for every transition exceed 5%": TaskParams(keeper_fee=8 * T),
        "init: threshold_pct not in 1..99": TaskParams(threshold_pct=100),
        "init: seed_reveal_blocks must be >= 2": TaskParams(seed_reveal_blocks=1),
        "init: stake not in 1..MAX_STAKE": TaskParams(stake=MAX_STAKE + 1),
    }
    for reason, params in cases.items():
        constructor = factory.constructor(w.token.address, params.as_tuple(), BUNDLE)
        with pytest.raises(ContractRevert, match=reason):
            w.chain.send("deploy FlockTask", constructor, w.creator)
        with pytest.raises(ConfigError):
            params.validate()
    with pytest.raises(ConfigError, match="proposers_per_round \\+ voters_per_round"):
        TaskParams(min_participants=3, proposers_per_round=2, voters_per_round=2).validate()


def test_cancelled_task_refunds_everyone(w: World) -> None:
    creator_start = w.token.balance_of(w.creator)
    task = w.task(min_participants=3)
    a, b = w.people[:2]
    join_all(task, [a, b])
    with pytest.raises(ContractRevert, match="withdraw: only in ENDED, CANCELLED or STALLED"):
        task.withdraw(sender=a)
    assert start(task).named("TaskCancelled") == [{"participants": 2}]
    assert task.phase() == Phase.CANCELLED
    with pytest.raises(ContractRevert, match="reclaim_pool: only the creator"):
        task.reclaim_pool(sender=a)
    task.withdraw(sender=a)
    task.withdraw(sender=b)
    with pytest.raises(ContractRevert, match="withdraw: no stake"):
        task.withdraw(sender=a)
    task.reclaim_pool(sender=w.creator)
    assert w.token.balance_of(a) == FUNDS and w.token.balance_of(b) == FUNDS
    assert w.token.balance_of(w.creator) == creator_start
    assert w.token.balance_of(task.address) == 0


def test_exit_only_between_rounds_or_unassigned(w: World) -> None:
    task = w.task()
    people = w.people[:5]
    join_all(task, people)
    with pytest.raises(ContractRevert, match="exit: only in SEED_COMMIT"):
        task.exit(sender=people[0])
    start(task)
    leaver, committed = people[4], people[0]
    # leaving early is a missed duty: no_show_pct of the stake is burned
    left = task.exit(sender=leaver)
    assert left.named("Exited") == [{"participant": leaver, "round": 0, "amount": 8 * T}]
    assert slashes(left) == {leaver: (2 * T, SlashReason.EXIT)}
    assert w.token.balance_of(leaver) == FUNDS - 2 * T and task.burned() == 2 * T
    assert leaver not in task.participants() and task.participant_count() == 4
    task.commit_seed(seed_commitment(fixed_seed(0, committed), committed), sender=committed)
    with pytest.raises(ContractRevert, match="exit: seed committed this round"):
        task.exit(sender=committed)
    with pytest.raises(ContractRevert, match="commit_seed: not a participant"):
        task.commit_seed(seed_commitment(fixed_seed(0, leaver), leaver), sender=leaver)
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(sender=leaver)  # SEED_COMMIT is open to joins, not to rejoins
    for p in people[1:4]:
        task.commit_seed(seed_commitment(fixed_seed(0, p), p), sender=p)
    task.advance_to_phase(Phase.SEED_REVEAL)
    with pytest.raises(ContractRevert, match="exit: only in SEED_COMMIT"):
        task.exit(sender=people[1])  # the draw's list is frozen once seeds are revealed
    for p in people[:4]:
        task.reveal_seed(fixed_seed(0, p), sender=p)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    task.draw_roles()
    assigned = task.proposers_of(0) + task.voters_of(0)
    (idle,) = [p for p in people[:4] if p not in assigned]
    with pytest.raises(ContractRevert, match="exit: has a role this round"):
        task.exit(sender=assigned[0])
    task.exit(sender=idle)
    with pytest.raises(ContractRevert, match="exit: not a participant"):
        task.exit(sender=idle)
    with pytest.raises(ContractRevert, match="join: only in REGISTRATION or SEED_COMMIT"):
        task.join(sender=w.people[6])
    assert sorted(task.participants()) == sorted(assigned)
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_claim_needs_a_reward(w: World) -> None:
    task = w.task()
    with pytest.raises(ContractRevert, match="claim: nothing to claim"):
        task.claim(sender=w.people[0])


# ---------------------------------------------------------------- artifacts


def test_artifacts_match_the_vyper_sources() -> None:
    """Recompile Token.vy and FlockTask.vy: artifacts.json must hold exactly their output."""
    vyper = pytest.importorskip(
        "vyper", reason="the vyper compiler is not installed (pip install vyper==0.4.3)"
    )
    from covey.flock.contracts import build

    if vyper.__version__ != build.VYPER_VERSION:
        pytest.skip(f"vyper {vyper.__version__} installed; artifacts use {build.VYPER_VERSION}")
    fresh = build.compile_contracts()
    committed = build.ARTIFACTS.read_text(encoding="utf-8")
    assert build.render(fresh) == committed, "stale: run python -m covey.flock.contracts.build"
    for name, art in fresh["contracts"].items():
        assert art["source_sha256"] == build.source_sha256(name)
        assert art["bytecode"].startswith("0x") and art["abi"]


# ---------------------------------------------------------------- reentrancy

EVIL_TOKEN = """
# pragma version ~=0.4.3
# pragma evm-version cancun
balanceOf: public(HashMap[address, uint256])
target: public(address)
probes: public(HashMap[uint256, bool])
replies: public(HashMap[uint256, Bytes[100]])

@deploy
def __init__():
    self.balanceOf[msg.sender] = 10**30

@external
def arm(target: address):
    self.target = target

@external
def approve(spender: address, amount: uint256) -> bool:
    return True

@external
def transfer(to: address, amount: uint256) -> bool:
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount
    return True

@internal
def _probe(slot: uint256, selector: Bytes[4]):
    ok: bool = False
    reply: Bytes[100] = b""
    ok, reply = raw_call(self.target, selector, max_outsize=100, revert_on_failure=False)
    self.probes[slot] = ok
    self.replies[slot] = reply

@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    if msg.sender == self.target:
        # call back into the task while it waits for this transfer
        self._probe(0, method_id("phase()"))
        self._probe(1, method_id("claim()"))
        self._probe(2, method_id("exit()"))
    return True
"""


def test_token_callbacks_cannot_reenter(w: World) -> None:
    """A token that calls back into the task mid-transfer hits the reentrancy lock."""
    vyper = pytest.importorskip("vyper", reason="compiling the test token needs vyper")
    out = vyper.compile_code(EVIL_TOKEN, output_formats=["abi", "bytecode"])
    factory = w.chain.w3.eth.contract(abi=out["abi"], bytecode=out["bytecode"])
    receipt = w.chain.send("deploy EvilToken", factory.constructor(), w.creator)
    evil = w.chain.w3.eth.contract(address=receipt["contractAddress"], abi=out["abi"])
    evil_token = Token(w.chain, receipt["contractAddress"])
    task = FlockTask.deploy(w.chain, evil_token, SMALL, BUNDLE, sender=w.creator)
    a = w.people[0]
    evil.functions.transfer(a, 100 * T).transact({"from": w.creator})
    evil.functions.arm(task.address).transact({"from": w.creator})
    task.join(sender=a, approve=False)  # join's transferFrom calls back
    probe = evil.functions.probes
    assert probe(0).call()  # a view answers: the callback itself works
    # claim and exit are refused by the lock (no reason), not by their own checks
    assert not probe(1).call() and evil.functions.replies(1).call() == b""
    assert not probe(2).call() and evil.functions.replies(2).call() == b""
    assert task.stake_of(a) == 10 * T
