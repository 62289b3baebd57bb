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
from covey.flock.task import (
    MAX_STAKE,
    TOKEN_UNIT,
    FlockTask,
    Outcome,
    Phase,
    Role,
    RoundResult,
    SlashReason,
    TaskParams,
    Token,
)
from tests.flock import (
    BUNDLE,
    FUNDS,
    SMALL,
    RoundPlan,
    World,
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
# doubling stakes: any participant's stake exceeds the sum of all smaller ones
DOUBLING = [10 * T, 20 * T, 40 * T, 80 * T, 160 * T, 320 * T, 640 * T]


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
    stake with a pro-rata share of what is left of the pool (the creator gets none of it)."""
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
    stakes = dict(zip(people, [10 * T, 20 * T, 30 * T, 40 * T], strict=True))
    join_all(task, stakes)
    assert task.participants() == people
    assert [task.stake_of(p) for p in people] == list(stakes.values())
    assert start(task).named("TaskStarted") == [{"participants": 4}]

    earned = dict.fromkeys(people, 0)
    pool = 1000 * T
    for r in range(2):
        assert task.current_round() == r
        assert task.phase() == Phase.SEED_COMMIT
        drawn = seed_and_draw(task, people)
        (roles,) = drawn.named("RolesDrawn")
        proposers, voters = task.proposers_of(r), task.voters_of(r)
        assert (roles["proposers"], roles["voters"]) == (proposers, voters)
        # the draw is the documented one: seeds and a block hash, then Fisher-Yates
        assert draw_in_python(task, r, people) == (proposers, voters)
        assert task.role_of(r, proposers[0]) == Role.PROPOSER
        assert {task.role_of(r, v) for v in voters} == {Role.VOTER}
        assert task.phase() == Phase.PROPOSE_COMMIT

        assert task.round_reward() == pool // (2 - r)
        final = propose_and_vote(task)
        reward = pool // (2 - r)
        voter_budget = reward * 20 // 100
        weights = {v: stakes[v] for v in voters}
        expected = {proposers[0]: reward - voter_budget}
        expected |= {v: voter_budget * weights[v] // sum(weights.values()) for v in voters}
        assert rewards(final) == expected
        paid = sum(expected.values())
        assert task.result(r) == RoundResult(Outcome.ACCEPTED, reward, paid, 0, 1, 0)
        assert (
            task.tally(r).committed_weight == task.tally(r).revealed_weight == sum(weights.values())
        )
        assert final.named("ProposalJudged") == [
            {
                "round": r,
                "proposer": proposers[0],
                "accept_stake": sum(weights.values()),
                "reject_stake": 0,
                "accepted": True,
                "rejected": False,
            }
        ]
        assert task.proposals(r) == [(proposers[0], update_digest(r, proposers[0]))]
        for who, amount in expected.items():
            earned[who] += amount
        pool -= sum(expected.values())
        assert task.pool() == pool
        assert contract_holdings(task) == w.token.balance_of(task.address)

    assert task.phase() == Phase.ENDED
    assert task.current_round() == 2
    with pytest.raises(ContractRevert, match="reclaim_pool: only after a cancelled"):
        task.reclaim_pool(sender=w.creator)
    total = sum(stakes.values())
    shares = {}
    for who in people:
        assert task.reward_of(who) == earned[who]
        if earned[who]:
            assert task.claim(sender=who).named("Claimed") == [
                {"participant": who, "amount": earned[who]}
            ]
        (withdrawn,) = task.withdraw(sender=who).named("Withdrawn")
        assert withdrawn["stake"] == stakes[who]
        shares[who] = withdrawn["share"]
        if who != people[-1]:
            assert shares[who] == pool * stakes[who] // total
        # every wei accounted for: funds back, plus rewards and a share of the leftover
        assert w.token.balance_of(who) == FUNDS + earned[who] + shares[who]
    assert sum(shares.values()) == pool  # the last one out took the rounding dust
    assert task.pool() == 0 and w.token.balance_of(task.address) == 0
    assert w.token.balance_of(w.creator) == creator_start - 1000 * T
    with pytest.raises(ContractRevert, match="reclaim_pool: pool is empty"):
        task.reclaim_pool(sender=w.creator)


def test_every_transaction_emits_an_event(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    results = [task.join(10 * T, "http://127.0.0.1:9000", sender=p) for p in people]
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
    task.join(10 * T, "http://10.0.0.1:8000", sender=a)
    task.join(10 * T, sender=b)  # serves nothing (yet)
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


def two_proposers_three_voters(w: World) -> tuple[FlockTask, dict[str, int], list[str], list[str]]:
    """Five participants with doubling stakes, roles drawn for round 0: 2 proposers, 3 voters.
    Returns the task, the stakes and the proposers and voters in draw order."""
    task = w.task(proposers_per_round=2, voters_per_round=3, min_participants=5)
    people = w.people[:5]
    stakes = dict(zip(people, DOUBLING, strict=False))
    join_all(task, stakes)
    start(task)
    seed_and_draw(task, people)
    return task, stakes, task.proposers_of(0), task.voters_of(0)


def test_accepted_round_pays_proposers_pro_rata_and_winning_voters(w: World) -> None:
    """2 proposers share by stake; the accept side (by stake) shares the voters' part."""
    task, stakes, proposers, voters = two_proposers_three_voters(w)
    by_stake = sorted(voters, key=stakes.__getitem__)
    # the two smaller voters reject, the largest accepts: it outweighs both (doubling stakes)
    votes = {by_stake[0]: False, by_stake[1]: False, by_stake[2]: True}
    final = propose_and_vote(task, RoundPlan(votes=votes))

    reward = 1000 * T // 2
    voter_budget = reward * 20 // 100
    proposer_budget = reward - voter_budget
    p_stake = sum(stakes[p] for p in proposers)
    expected = {p: proposer_budget * stakes[p] // p_stake for p in proposers}
    expected[by_stake[2]] = voter_budget  # the only winning voter takes the whole voters' part
    assert rewards(final) == expected
    assert expected[proposers[0]] != expected[proposers[1]]  # pro rata, not equal
    assert slashes(final) == {
        by_stake[0]: (stakes[by_stake[0]] // 10, SlashReason.LOSING_VOTE),
        by_stake[1]: (stakes[by_stake[1]] // 10, SlashReason.LOSING_VOTE),
    }
    result = task.result(0)
    assert result.outcome == Outcome.ACCEPTED
    assert result.slashed == (stakes[by_stake[0]] + stakes[by_stake[1]]) // 10
    paid = sum(expected.values())
    assert task.pool() == 1000 * T - paid + result.slashed
    for who in by_stake[:2]:
        assert task.stake_of(who) == stakes[who] - stakes[who] // 10
    assert (result.accepted, result.rejected) == (0b11, 0)  # both proposals
    assert task.tally(0).revealed_count == 3
    assert len(final.named("ProposalJudged")) == 2
    for judged in final.named("ProposalJudged"):
        assert judged["accept_stake"] == stakes[by_stake[2]]
        assert judged["reject_stake"] == stakes[by_stake[0]] + stakes[by_stake[1]]


def test_rejected_round_slashes_proposers_and_pays_reject_voters(w: World) -> None:
    """Stake decides, not heads: one big reject outweighs two accepts."""
    task, stakes, proposers, voters = two_proposers_three_voters(w)
    by_stake = sorted(voters, key=stakes.__getitem__)
    votes = {by_stake[0]: True, by_stake[1]: True, by_stake[2]: False}
    final = propose_and_vote(task, RoundPlan(votes=votes))

    reward = 1000 * T // 2
    voter_budget = reward * 20 // 100
    result = task.result(0)
    assert result.outcome == Outcome.REJECTED and result.rejected == 0b11
    assert rewards(final) == {by_stake[2]: voter_budget}
    expected_slashes = {p: (stakes[p] // 10, SlashReason.PROPOSAL_REJECTED) for p in proposers}
    expected_slashes |= {v: (stakes[v] // 10, SlashReason.LOSING_VOTE) for v in by_stake[:2]}
    assert slashes(final) == expected_slashes
    slashed = sum(a for a, _ in expected_slashes.values())
    # the proposers' part stays in the pool; slashes come back to it
    assert task.pool() == 1000 * T - voter_budget + slashed
    assert task.total_staked() == sum(stakes.values()) - slashed
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_each_proposal_is_judged_on_its_own(w: World) -> None:
    """A mixed round: the good proposal is paid, the bad one slashed; each voter is paid by
    weight x verdicts it got right and slashed for the share it got wrong."""
    task, stakes, proposers, voters = two_proposers_three_voters(w)
    small, middle, big = sorted(voters, key=stakes.__getitem__)
    # big (outweighing both others) accepts proposal 0 and rejects 1: that is the verdict.
    # middle accepts both (right on 0, wrong on 1); small accepts only 1 (wrong on both).
    votes = {big: 0b01, middle: 0b11, small: 0b10}
    final = propose_and_vote(task, RoundPlan(votes=votes))

    result = task.result(0)
    assert result.outcome == Outcome.ACCEPTED
    assert (result.accepted, result.rejected) == (0b01, 0b10)
    assert result.accepted_proposers(proposers) == [proposers[0]]
    reward = 1000 * T // 2
    voter_budget = reward * 20 // 100
    agreement = stakes[big] * 2 + stakes[middle] * 1  # small got none right
    assert rewards(final) == {
        proposers[0]: reward - voter_budget,  # the only accepted proposal takes the whole part
        big: voter_budget * stakes[big] * 2 // agreement,
        middle: voter_budget * stakes[middle] * 1 // agreement,
    }
    assert slashes(final) == {
        proposers[1]: (stakes[proposers[1]] // 10, SlashReason.PROPOSAL_REJECTED),
        middle: (stakes[middle] * 10 * 1 // (100 * 2), SlashReason.LOSING_VOTE),  # half a slash
        small: (stakes[small] // 10, SlashReason.LOSING_VOTE),  # wrong on both: a full slash
    }
    judged = {e["proposer"]: e for e in final.named("ProposalJudged")}
    assert judged[proposers[0]]["accept_stake"] == stakes[big] + stakes[middle]
    assert judged[proposers[1]]["accept_stake"] == stakes[middle] + stakes[small]
    assert [judged[p]["accepted"] for p in proposers] == [True, False]
    assert task.vote_of(0, middle).accepts == 0b11
    assert contract_holdings(task) == w.token.balance_of(task.address)


@pytest.mark.parametrize("threshold", [50, 51])
def test_threshold_per_proposal_and_a_rejected_round_with_split_ballots(
    w: World, threshold: int
) -> None:
    """Two voters of equal stake: one accepts both proposals, the other only the first. The
    second proposal has exactly half the weight: accepted at threshold 50, rejected at 51."""
    task = w.task(
        proposers_per_round=2, voters_per_round=2, min_participants=4, threshold_pct=threshold
    )
    people = w.people[:4]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    seed_and_draw(task, people)
    proposers, (both, first_only) = task.proposers_of(0), task.voters_of(0)
    final = propose_and_vote(task, RoundPlan(votes={both: 0b11, first_only: 0b01}))
    result = task.result(0)
    reward = 1000 * T // 2
    voter_budget = reward * 20 // 100
    if threshold == 50:  # equality accepts: both accepted, first_only wrong on one of two
        assert result.accepted == 0b11
        assert result.accepted_proposers(proposers) == proposers
        agreement = 10 * T * 2 + 10 * T * 1
        assert rewards(final) == {
            proposers[0]: (reward - voter_budget) // 2,
            proposers[1]: (reward - voter_budget) // 2,
            both: voter_budget * 10 * T * 2 // agreement,
            first_only: voter_budget * 10 * T * 1 // agreement,
        }
        assert slashes(final) == {first_only: (10 * T * 10 // 200, SlashReason.LOSING_VOTE)}
    else:  # 5 < 51% of 10: the second is rejected; now `both` is wrong on one of two
        assert (result.accepted, result.rejected) == (0b01, 0b10)
        assert result.accepted_proposers(proposers) == [proposers[0]]
        agreement = 10 * T * 1 + 10 * T * 2
        assert rewards(final) == {
            proposers[0]: reward - voter_budget,
            both: voter_budget * 10 * T * 1 // agreement,
            first_only: voter_budget * 10 * T * 2 // agreement,
        }
        assert slashes(final) == {
            proposers[1]: (T, SlashReason.PROPOSAL_REJECTED),
            both: (10 * T * 10 // 200, SlashReason.LOSING_VOTE),
        }
    assert contract_holdings(task) == w.token.balance_of(task.address)


def test_a_rejected_round_pays_only_voters_by_their_right_verdicts(w: World) -> None:
    """Everything rejected: proposers slashed; voters paid by right verdicts (2 + 2 + 1 parts,
    equal weights), and the one right on one of two loses half a slash."""
    task = w.task(proposers_per_round=2, voters_per_round=3, min_participants=5)
    people = w.people[:5]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    seed_and_draw(task, people)
    proposers, (a, b, c) = task.proposers_of(0), task.voters_of(0)
    final = propose_and_vote(task, RoundPlan(votes={a: 0, b: 0, c: 0b10}))
    result = task.result(0)
    assert result.outcome == Outcome.REJECTED and result.accepted == 0
    voter_budget = (1000 * T // 2) * 20 // 100
    agreement = 10 * T * (2 + 2 + 1)
    assert rewards(final) == {
        a: voter_budget * 10 * T * 2 // agreement,
        b: voter_budget * 10 * T * 2 // agreement,
        c: voter_budget * 10 * T * 1 // agreement,
    }
    assert slashes(final) == {
        proposers[0]: (T, SlashReason.PROPOSAL_REJECTED),
        proposers[1]: (T, SlashReason.PROPOSAL_REJECTED),
        c: (T // 2, SlashReason.LOSING_VOTE),
    }
    # the proposers' part of the reward stays in the pool
    assert task.pool() == 1000 * T - result.paid + result.slashed


def test_verdicts_on_silent_proposers_are_ignored_and_extra_bits_refused(w: World) -> None:
    task = w.task(proposers_per_round=2, voters_per_round=3, min_participants=5)
    people = w.people[:5]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    seed_and_draw(task, people)
    proposers, voters = task.proposers_of(0), task.voters_of(0)
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
    # judged against all three committed ballots: 20 of 30 accept, 50% needed
    assert task.result(0).accepted == 0b01
    # both revealed voters were right on the one valid proposal: paid alike, not slashed
    reward = 1000 * T // 2
    voter_budget = reward * 20 // 100
    assert rewards(final) == {
        proposers[0]: reward - voter_budget,
        voters[1]: voter_budget // 2,
        voters[2]: voter_budget // 2,
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
    stakes = dict(zip(people, DOUBLING, strict=False))
    join_all(task, stakes)
    start(task)
    withholder, sitter = people[5], people[6]
    drawn = seed_and_draw(task, people, RoundPlan(withhold_seed={withholder}, skip_seed={sitter}))
    # both sit the round out and lose 20% at the draw
    assert slashes(drawn) == {
        withholder: (stakes[withholder] // 5, SlashReason.SEED_NOT_REVEALED),
        sitter: (stakes[sitter] // 5, SlashReason.SEED_NOT_COMMITTED),
    }
    assert task.role_of(0, withholder) == Role.NONE
    assert task.role_of(0, sitter) == Role.NONE
    proposers, voters = task.proposers_of(0), task.voters_of(0)
    assert draw_in_python(task, 0, people[:5]) == (proposers, voters)

    silent_proposer = proposers[1]
    # the honest voter outweighs the other two: its accept decides the proposal either way
    no_reveal, no_commit, honest = sorted(voters, key=stakes.__getitem__)
    plan = RoundPlan(
        withhold_proposal={silent_proposer},
        skip_vote_commit={no_commit},
        skip_vote_reveal={no_reveal},
    )
    final = propose_and_vote(task, plan)
    assert slashes(final) == {
        silent_proposer: (stakes[silent_proposer] // 5, SlashReason.NO_PROPOSAL),
        no_reveal: (stakes[no_reveal] // 5, SlashReason.VOTE_NOT_REVEALED),
        no_commit: (stakes[no_commit] // 5, SlashReason.VOTE_NOT_REVEALED),
    }
    # the proposer who did reveal takes the whole proposers' part; the honest voter the rest
    reward = (1000 * T + (stakes[withholder] + stakes[sitter]) // 5) // 2
    voter_budget = reward * 20 // 100
    assert rewards(final) == {proposers[0]: reward - voter_budget, honest: voter_budget}
    result = task.result(0)
    assert result.outcome == Outcome.ACCEPTED
    # the round's slashes include the seed no-shows', taken at the draw
    everyone = [withholder, sitter, silent_proposer, no_reveal, no_commit]
    assert result.slashed == sum(stakes[p] // 5 for p in everyone)
    assert {p: task.missed_rounds(p) for p in people if task.missed_rounds(p)} == dict.fromkeys(
        everyone, 1
    )


def test_no_proposals_closes_voting_and_slashes_only_proposers(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    join_all(task, dict.fromkeys(people, 10 * T))
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


def test_no_quorum_pays_nobody_and_slashes_silent_voters(w: World) -> None:
    task = w.task()
    people = w.people[:3]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    seed_and_draw(task, people)
    voters = task.voters_of(0)
    final = propose_and_vote(task, RoundPlan(skip_vote_commit=set(voters)))
    assert task.result(0).outcome == Outcome.NO_QUORUM
    # nobody judged the proposal: its proposer is neither paid nor slashed
    assert slashes(final) == {v: (2 * T, SlashReason.VOTE_NOT_REVEALED) for v in voters}
    assert rewards(final) == {}


def test_reward_per_round_is_remaining_pool_over_remaining_rounds(w: World) -> None:
    """Rejected round (pool keeps the proposers' part + slashes), void round, accepted round."""
    task = w.task(rounds=3)
    people = w.people[:4]
    stakes = dict(zip(people, DOUBLING, strict=False))
    join_all(task, stakes)
    start(task)

    # round 0: everyone rejects
    seed_and_draw(task, people)
    propose_and_vote(task, RoundPlan(votes=dict.fromkeys(task.voters_of(0), False)))
    r0 = task.result(0)
    assert r0.outcome == Outcome.REJECTED
    assert r0.reward == 1000 * T // 3
    pool1 = 1000 * T - r0.paid + r0.slashed
    assert task.pool() == pool1

    # round 1: only two reveal a seed, fewer than 1 proposer + 2 voters: void, nothing paid;
    # the two that did not commit are slashed, into the pool
    void = seed_and_draw(task, people, RoundPlan(skip_seed=set(people[2:])))
    (finalized,) = void.named("RoundFinalized")
    assert finalized["outcome"] == Outcome.VOID
    assert task.result(1).outcome == Outcome.VOID
    pool2 = pool1 + finalized["slashed"]
    assert finalized["slashed"] == sum(task.stake_of(p) for p in people[2:]) // 4  # 20% of 80%
    assert task.pool() == pool2
    assert task.current_round() == 2

    # round 2, the last: its reward is the whole pool
    assert task.round_reward() == pool2
    play_round(task, people)
    r2 = task.result(2)
    assert r2.outcome == Outcome.ACCEPTED
    assert r2.reward == pool2
    assert pool2 - r2.paid < 3  # only rounding dust is left
    assert task.phase() == Phase.ENDED


# ---------------------------------------------------------------- keepers, timeouts, evictions


def test_keeper_fee_pays_whoever_moves_the_phases(w: World) -> None:
    """start, draw_roles and finalize pay keeper_fee from the pool to their caller, anyone;
    the round's reward is what is left over the rounds left."""
    task = w.task(keeper_fee=2 * T)
    people, keeper = w.people[:3], w.people[5]
    join_all(task, dict.fromkeys(people, 10 * T))
    task.advance_to_phase(Phase.AWAIT_START)
    assert task.start(sender=keeper).named("KeeperPaid") == [
        {"round": 0, "keeper": keeper, "amount": 2 * T}
    ]
    seed_and_draw(task, people)  # draw_roles from the default account
    assert task.reward_of(keeper) == 2 * T
    assert task.pool() == 1000 * T - 4 * T
    propose(task)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    assert task.round_reward() == (1000 * T - 6 * T) // 2
    final = task.finalize(sender=keeper)
    assert final.named("KeeperPaid") == [{"round": 0, "keeper": keeper, "amount": 2 * T}]
    assert task.result(0).reward == (1000 * T - 6 * T) // 2
    assert task.claim(sender=keeper).named("Claimed")[0]["amount"] == 4 * T
    assert w.token.balance_of(keeper) == FUNDS + 4 * T
    with pytest.raises(ConfigError, match="keeper_fee"):
        TaskParams(reward_pool=10 * T, rounds=3, keeper_fee=2 * T).validate()


def test_a_stalled_task_lets_everyone_out(w: World) -> None:
    """Nobody finalizes for timeout_blocks: the task is STALLED, transitions are refused and
    each participant withdraws its stake with its share of the pool."""
    task = w.task()
    people = w.people[:3]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    seed_and_draw(task, people)
    propose(task)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    assert task.phase_end() == task.stage_start() + 8 * 4 + SMALL.timeout_blocks
    task.advance_to_phase(Phase.STALLED)
    assert task.phase() == Phase.STALLED and task.phase_end() == 0
    with pytest.raises(ContractRevert, match="finalize: only in AWAIT_FINALIZE"):
        task.finalize()
    with pytest.raises(ContractRevert, match="reclaim_pool: only after a cancelled"):
        task.reclaim_pool(sender=w.creator)
    pool = task.pool()
    got = [task.withdraw(sender=p).named("Withdrawn")[0] for p in people]
    assert [g["stake"] for g in got] == [10 * T] * 3
    assert [g["share"] for g in got] == [pool // 3, pool // 3, pool - 2 * (pool // 3)]
    assert w.token.balance_of(task.address) == 0


def test_a_task_never_started_returns_the_pool_to_its_creator(w: World) -> None:
    creator_start = w.token.balance_of(w.creator)
    task = w.task()
    people = w.people[:3]
    join_all(task, dict.fromkeys(people, 10 * T))
    task.advance_to_phase(Phase.STALLED)  # nobody called start
    for p in people:
        assert task.withdraw(sender=p).named("Withdrawn")[0] == {
            "participant": p,
            "stake": 10 * T,
            "share": 0,
        }
    task.reclaim_pool(sender=w.creator)
    assert w.token.balance_of(w.creator) == creator_start
    assert w.token.balance_of(task.address) == 0


def test_missed_rounds_evict_and_free_the_slot_for_a_latecomer(w: World) -> None:
    task = w.task(max_participants=3, max_missed_rounds=2, rounds=3)
    people = w.people[:3]
    absent, latecomer = people[2], w.people[3]
    join_all(task, dict.fromkeys(people, 10 * T))
    start(task)
    with pytest.raises(ContractRevert, match="join: task is full"):
        task.join(10 * T, sender=latecomer)
    seed_and_draw(task, people, RoundPlan(skip_seed={absent}))  # void: 2 < 3 revealers
    assert task.missed_rounds(absent) == 1 and absent in task.participants()
    drawn = seed_and_draw(task, people, RoundPlan(skip_seed={absent}))
    (evicted,) = drawn.named("Evicted")
    assert evicted == {"round": 1, "participant": absent, "refund": 10 * T * 8 // 10 * 8 // 10}
    assert absent not in task.participants() and task.stake_of(absent) == 0
    assert task.reward_of(absent) == evicted["refund"]  # its stake, less two no-show slashes
    # round 2: the freed slot takes a latecomer during SEED_COMMIT, who plays at once
    task.join(10 * T, sender=latecomer)
    assert latecomer in task.participants()
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(10 * T, sender=absent)
    play_round(task, [p for p in people if p != absent] + [latecomer])
    assert task.result(2).outcome == Outcome.ACCEPTED
    task.claim(sender=absent)
    assert w.token.balance_of(absent) == FUNDS - 10 * T + evicted["refund"]


def test_windows_are_sized_from_block_time_and_training() -> None:
    from covey.flock.task import EMBEDDED_TIMING, Timing, phase_windows

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
    assert phase_windows(EMBEDDED_TIMING, participants=5)["seed_reveal_blocks"] == 11
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
    task.join(10 * T, sender=w.people[0], approve=False)
    with pytest.raises(ContractRevert, match="join: only in REGISTRATION or SEED_COMMIT"):
        task.join(10 * T, sender=w.people[1], approve=False)


# ---------------------------------------------------------------- commit-reveal integrity


def test_reveal_with_wrong_salt_or_from_another_address_fails(w: World) -> None:
    task = w.task()
    people = w.people[:4]
    join_all(task, dict.fromkeys(people, 10 * T))
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
    assert task.vote_of(r, v1).revealed and task.vote_of(r, v1).weight == 10 * T


def test_double_actions_fail(w: World) -> None:
    """No second join, seed commit or reveal, proposal commit or reveal, vote commit or reveal."""
    task = w.task()
    people = w.people[:3]
    join_all(task, dict.fromkeys(people, 10 * T))
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(10 * T, sender=people[0])
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
    "join": (10 * T, ""),
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
    join_all(task, dict.fromkeys(people, 10 * T))
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
    join_all(task, dict.fromkeys(people, 10 * T))
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


def test_participant_cap_and_stake_bounds(w: World) -> None:
    task = w.task(max_participants=3)
    a, b, c, d = w.people[:4]
    with pytest.raises(ContractRevert, match="join: stake below min_stake"):
        task.join(10 * T - 1, sender=a)
    with pytest.raises(ContractRevert, match="join: stake above MAX_STAKE"):
        task.join(MAX_STAKE + 1, sender=a, approve=False)
    join_all(task, {a: 10 * T, b: 10 * T, c: 11 * T})
    with pytest.raises(ContractRevert, match="join: task is full"):
        task.join(10 * T, sender=d)
    assert task.participant_count() == 3
    assert w.token.balance_of(d) == FUNDS


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
        "init: keeper fees for every transition exceed": TaskParams(keeper_fee=200 * T),
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
    join_all(task, {a: 10 * T, b: 15 * T})
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
    join_all(task, dict.fromkeys(people, 10 * T))
    with pytest.raises(ContractRevert, match="exit: only in SEED_COMMIT"):
        task.exit(sender=people[0])
    start(task)
    leaver, committed = people[4], people[0]
    assert task.exit(sender=leaver).named("Exited") == [
        {"participant": leaver, "round": 0, "amount": 10 * T}
    ]
    assert w.token.balance_of(leaver) == FUNDS
    assert leaver not in task.participants() and task.participant_count() == 4
    task.commit_seed(seed_commitment(fixed_seed(0, committed), committed), sender=committed)
    with pytest.raises(ContractRevert, match="exit: seed committed this round"):
        task.exit(sender=committed)
    with pytest.raises(ContractRevert, match="commit_seed: not a participant"):
        task.commit_seed(seed_commitment(fixed_seed(0, leaver), leaver), sender=leaver)
    with pytest.raises(ContractRevert, match="join: already joined"):
        task.join(10 * T, sender=leaver)  # SEED_COMMIT is open to joins, not to rejoins
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
        task.join(10 * T, sender=w.people[6])
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
    task.join(10 * T, sender=a, approve=False)  # join's transferFrom calls back
    probe = evil.functions.probes
    assert probe(0).call()  # a view answers: the callback itself works
    # claim and exit are refused by the lock (no reason), not by their own checks
    assert not probe(1).call() and evil.functions.replies(1).call() == b""
    assert not probe(2).call() and evil.functions.replies(2).call() == b""
    assert task.stake_of(a) == 10 * T
