"""A FLock task's story, read from the chain alone: who staked, and per round the roles,
proposals (by CID), ballots, verdicts, rewards and slashes, and the balances now.

`covey flock status` prints it; the simulation adds what only a participant knows (its scores,
whether it attacked) and records it with each round. Events are read once, from the task's
deployment block in bounded ranges, and grouped by round.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from covey.flock.params import TOKEN_UNIT
from covey.flock.task import FlockTask, Outcome, Phase, SlashReason
from covey.store.cid import cid_from_digest

ROUND_EVENTS = (
    "Rewarded",
    "Slashed",
    "Evicted",
    "KeeperPaid",
    "ProposalJudged",
    "DuplicateProposal",
)


@dataclass
class TaskHistory:
    """The events of one task by round (refreshed with `read`)."""

    task: FlockTask
    by_round: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    joined: list[dict[str, Any]] = field(default_factory=list)
    _next_block: int | None = None

    def read(self) -> TaskHistory:
        """Read the events since the last read (the first read starts at deployment)."""
        start = self._next_block if self._next_block is not None else self.task.deployed_at
        last = self.task.chain.block_number
        if start > last:
            return self
        for name in ROUND_EVENTS:
            for event in self.task.events(name, start, last):
                rounds = self.by_round.setdefault(int(event["round"]), defaultdict(list))
                rounds[name].append(event)
        self.joined += self.task.events("Joined", start, last)
        self._next_block = last + 1
        return self

    def of(self, round_: int, name: str) -> list[dict[str, Any]]:
        return list(self.by_round.get(round_, {}).get(name, []))


def round_facts(task: FlockTask, history: TaskHistory, round_: int) -> dict[str, Any]:
    """Everything the chain says about one finished round (addresses, CIDs, tokens)."""
    proposers, voters = task.proposers_of(round_), task.voters_of(round_)
    result = task.result(round_)
    judged = {str(e["proposer"]).lower(): e for e in history.of(round_, "ProposalJudged")}
    duplicates = {str(e["proposer"]).lower() for e in history.of(round_, "DuplicateProposal")}
    proposals = []
    for position, proposer in enumerate(proposers):
        status = task.proposal_of(round_, proposer)
        verdict = judged.get(proposer.lower())
        proposals.append(
            {
                "address": proposer,
                "position": position,
                "cid": cid_from_digest(status.digest) if any(status.digest) else None,
                "committed": any(status.commitment),
                "valid": status.valid,
                "duplicate": proposer.lower() in duplicates,
                "accepted": bool(result.accepted >> position & 1),
                "rejected": bool(result.rejected >> position & 1),
                "accept_votes": verdict["accept_votes"] if verdict else 0,
                "reject_votes": verdict["reject_votes"] if verdict else 0,
            }
        )
    votes = []
    for voter in voters:
        vote = task.vote_of(round_, voter)
        votes.append(
            {
                "address": voter,
                "committed": any(vote.commitment),
                "revealed": vote.revealed,
                "accepts": [bool(vote.accepts >> i & 1) for i in range(len(proposers))]
                if vote.revealed
                else [],
            }
        )
    return {
        "round": round_,
        "proposers": proposers,
        "voters": voters,
        "proposals": proposals,
        "votes": votes,
        "outcome": result.outcome.name.lower(),
        "round_reward": result.reward / TOKEN_UNIT,
        "paid": result.paid / TOKEN_UNIT,
        "slashed": result.slashed / TOKEN_UNIT,
        "rewards": _amounts(history.of(round_, "Rewarded")),
        "slashes": [
            {
                "address": str(e["participant"]),
                "amount": e["amount"] / TOKEN_UNIT,
                "reason": SlashReason(int(e["reason"])).name.lower(),
            }
            for e in history.of(round_, "Slashed")
        ],
        "keeper_fees": [
            {"address": str(e["keeper"]), "amount": e["amount"] / TOKEN_UNIT}
            for e in history.of(round_, "KeeperPaid")
        ],
        "evicted": [str(e["participant"]) for e in history.of(round_, "Evicted")],
    }


def _amounts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"address": str(e["participant"]), "amount": e["amount"] / TOKEN_UNIT} for e in events]


def balances(task: FlockTask, addresses: list[str]) -> list[dict[str, Any]]:
    """Stake, unclaimed credit and wallet of each address, in tokens."""
    token = task.token
    return [
        {
            "address": a,
            "stake": task.stake_of(a) / TOKEN_UNIT,
            "unclaimed": task.reward_of(a) / TOKEN_UNIT,
            "wallet": token.balance_of(a) / TOKEN_UNIT,
        }
        for a in addresses
    ]


def finished_rounds(task: FlockTask) -> int:
    """How many rounds have been settled (finalized or void)."""
    phase = task.phase()
    if phase in (Phase.ENDED,):
        return task.params.rounds
    if phase in (Phase.REGISTRATION, Phase.AWAIT_START, Phase.CANCELLED):
        return 0
    round_ = task.current_round()
    # STALLED stops mid-round: the current round is settled only if its result says so
    if phase == Phase.STALLED and task.result(round_).outcome != Outcome.PENDING:
        return round_ + 1
    return round_
