"""Gas of every FlockTask call on the embedded EVM, and of a round at the participant cap.

Fills a task to the hard cap (64 participants, 16 proposers + 48 voters per round, so every
loop runs at its longest) and plays three rounds, every ballot judging all 16 proposals: one
accepted (two thirds of the voters accept everything: a third lose every verdict and are
slashed), one rejected (every proposer and two thirds of the voters are slashed) and one mixed
(each voter accepts a random half of the proposals: some are accepted, and most voters are
both paid and partly slashed). Records the gas of each call from the chain client's gas log and
compares the largest calls (draw_roles, finalize) with a 30M block gas limit. Writes
benchmarks/results/gas.json.

    .venv/bin/python benchmarks/bench_gas.py [--participants 64 --proposers 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

from covey.flock.chain import (
    MAX_PARTICIPANTS,
    TOKEN_UNIT,
    Chain,
    FlockTask,
    Outcome,
    Phase,
    TaskParams,
    accept_mask,
    new_secret,
    seed_commitment,
    vote_commitment,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK_GAS_LIMIT = 30_000_000


def play_round(task: FlockTask, people: list[str], ballot: str) -> dict[str, int]:
    """All commit and reveal seeds, all proposers propose, all voters vote; returns gas.

    ballot: `accept` (2/3 of the voters accept everything), `reject` (1/3 do), or `mixed` (each
    voter accepts a seeded random half of the proposals, so each agrees with some verdicts).
    """
    r = task.current_round()
    seeds = {p: new_secret() for p in people}
    for p in people:
        task.commit_seed(seed_commitment(seeds[p], p), sender=p)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for p in people:
        task.reveal_seed(seeds[p], sender=p)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    draw = task.draw_roles()
    for p in task.proposers_of(r):
        task.propose(new_secret(), sender=p)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    voters = task.voters_of(r)
    n_prop = len(task.proposers_of(r))
    every = (1 << n_prop) - 1

    def verdicts(k: int) -> int:
        if ballot == "mixed":
            coin = random.Random(f"{r}/{k}")
            return accept_mask([coin.random() < 0.5 for _ in range(n_prop)])
        share = 2 / 3 if ballot == "accept" else 1 / 3
        return every if k < round(len(voters) * share) else 0

    ballots = {v: (verdicts(k), 1000 + k, new_secret()) for k, v in enumerate(voters)}
    for v, (accepts, score, salt) in ballots.items():
        task.commit_vote(vote_commitment(accepts, score, salt, v), sender=v)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    for v, (accepts, score, salt) in ballots.items():
        task.reveal_vote(accepts, score, salt, sender=v)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    final = task.finalize()
    return {
        "draw_roles": draw.gas_used,
        "finalize": final.gas_used,
        "rewarded": len(final.named("Rewarded")),
        "slashed": len(final.named("Slashed")),
        "outcome": int(task.result(r).outcome),
        "accepted_proposals": bin(task.result(r).accepted).count("1"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--participants", type=int, default=MAX_PARTICIPANTS)
    parser.add_argument("--proposers", type=int, default=16)
    args = parser.parse_args()
    n, n_prop = args.participants, args.proposers
    started = time.perf_counter()

    chain = Chain.embedded(accounts=n + 1, gas_limit=BLOCK_GAS_LIMIT)
    creator, *people = chain.accounts
    token = chain.deploy_token(10_000_000 * TOKEN_UNIT, sender=creator)
    for p in people:
        token.transfer(p, 1000 * TOKEN_UNIT, sender=creator)
    params = TaskParams(
        rounds=3,
        min_participants=n,
        max_participants=n,
        proposers_per_round=n_prop,
        voters_per_round=n - n_prop,
        registration_blocks=3 * n,
        seed_commit_blocks=n + 4,
        seed_reveal_blocks=n + 4,
        propose_blocks=n_prop + 4,
        vote_commit_blocks=n - n_prop + 4,
        vote_reveal_blocks=n - n_prop + 4,
    )
    task = chain.deploy_task(token, params, sender=creator)
    for i, p in enumerate(people):
        task.join((10 + i) * TOKEN_UNIT, sender=p)  # distinct stakes, so pro rata shares differ
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    rounds = {kind: play_round(task, people, kind) for kind in ("accept", "reject", "mixed")}
    assert rounds["accept"]["outcome"] == Outcome.ACCEPTED
    assert rounds["reject"]["outcome"] == Outcome.REJECTED
    assert rounds["mixed"]["outcome"] == Outcome.ACCEPTED
    for p in people:
        if task.reward_of(p):
            task.claim(sender=p)
        task.withdraw(sender=p)
    task.reclaim_pool(sender=creator)
    assert token.balance_of(task.address) == 0

    per_call = {
        name: {
            "calls": len(gas),
            "median": int(statistics.median(gas)),
            "min": min(gas),
            "max": max(gas),
        }
        for name, gas in sorted(chain.gas.items())
    }
    worst = max(
        ("draw_roles", "finalize"),
        key=lambda name: per_call[name]["max"],
    )
    result = {
        "command": " ".join([".venv/bin/python benchmarks/bench_gas.py", *sys.argv[1:]]),
        "setup": {
            "participants": n,
            "proposers_per_round": n_prop,
            "voters_per_round": n - n_prop,
            "note": "every loop at its bound: all participants reveal seeds, every role acts",
        },
        "gas_per_call": per_call,
        "at_cap": rounds,
        "block_gas_limit": BLOCK_GAS_LIMIT,
        "largest_call": {
            "function": worst,
            "gas": per_call[worst]["max"],
            "share_of_block": round(per_call[worst]["max"] / BLOCK_GAS_LIMIT, 4),
        },
        "versions": {
            "compiler": chain.artifacts["compiler"],
            "evm_target": "cancun (pragma); run on py-evm's Prague VM",
            "py-evm": version("py-evm"),
            "eth-tester": version("eth-tester"),
            "web3": version("web3"),
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
    }
    out = ROOT / "benchmarks" / "results" / "gas.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
