"""Gas of every FlockTask call on the embedded EVM, and of the largest calls at the participant cap.

Fills a task to the hard cap (64 participants, 16 proposers + 48 voters per round, so every
loop runs at its longest) and plays four rounds, every ballot judging all 16 proposals: one
accepted (two thirds of the voters accept everything: a third lose every verdict and are
slashed), one rejected (every proposer and two thirds of the voters are slashed), one mixed
(each voter accepts a random half of the proposals: some are accepted, and most voters are
both paid and partly slashed), and one of no-shows (15 proposers and all 48 voters miss their
duty: 63 no-show slashes and, with max_missed_rounds = 1, 63 evictions in one finalize). A
second task at the cap measures draw_roles when nobody committed a seed (64 slashes and 64
evictions). A keeper fee is paid on every transition. Records the gas of each call from the
chain client's gas log and compares the largest calls with a 30M block gas limit (the bound:
15% of it). Writes benchmarks/results/gas.json.

    .venv/bin/python benchmarks/bench_gas.py [--participants 64 --proposers 16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

from covey.flock.chain import Chain
from covey.flock.commitments import (
    accept_mask,
    new_secret,
    proposal_commitment,
    seed_commitment,
    vote_commitment,
)
from covey.flock.params import (
    EMBEDDED_TIMING,
    MAX_PARTICIPANTS,
    TOKEN_UNIT,
    TaskParams,
    phase_windows,
)
from covey.flock.task import FlockTask, Outcome, Phase, Token

ROOT = Path(__file__).resolve().parents[1]
BLOCK_GAS_LIMIT = 30_000_000
BOUND = 0.15  # no call may take more than this share of a block
BUNDLE = hashlib.sha256(b"bench_gas task bundle").digest()


def play_round(task: FlockTask, people: list[str], ballot: str) -> dict[str, int]:
    """All commit and reveal seeds, proposers propose, voters vote; returns the gas of the
    transitions and what finalize did.

    ballot: `accept` (2/3 of the voters accept everything), `reject` (1/3 do), `mixed` (each
    voter accepts a seeded random half of the proposals, so each agrees with some verdicts) or
    `no_show` (one proposer proposes, the voters commit and never reveal).
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
    proposers = task.proposers_of(r)
    proposing = proposers[:1] if ballot == "no_show" else proposers
    salts = {p: new_secret() for p in proposing}
    digests = {p: new_secret() for p in proposing}
    for p in proposing:
        task.commit_proposal(proposal_commitment(digests[p], salts[p], p), sender=p)
    task.advance_to_phase(Phase.PROPOSE_REVEAL)
    for p in proposing:
        task.reveal_proposal(digests[p], salts[p], sender=p)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    voters = task.voters_of(r)
    every = (1 << len(proposers)) - 1

    def verdicts(k: int) -> int:
        if ballot == "mixed":
            coin = random.Random(f"{r}/{k}")
            return accept_mask([coin.random() < 0.5 for _ in proposers])
        share = 1 / 3 if ballot == "reject" else 2 / 3
        return every if k < round(len(voters) * share) else 0

    ballots = {v: (verdicts(k), new_secret()) for k, v in enumerate(voters)}
    for v, (accepts, salt) in ballots.items():
        task.commit_vote(vote_commitment(accepts, salt, v), sender=v)
    task.advance_to_phase(Phase.VOTE_REVEAL)
    if ballot != "no_show":
        for v, (accepts, salt) in ballots.items():
            task.reveal_vote(accepts, salt, sender=v)
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    final = task.finalize()
    result = task.result(r)
    return {
        "draw_roles": draw.gas_used,
        "finalize": final.gas_used,
        "rewarded": len(final.named("Rewarded")),
        "slashed": len(final.named("Slashed")),
        "evicted": len(final.named("Evicted")),
        "outcome": int(result.outcome),
        "accepted_proposals": bin(result.accepted).count("1"),
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
    token = Token.deploy(chain, 10_000_000 * TOKEN_UNIT, sender=creator)
    for p in people:
        token.transfer(p, 1000 * TOKEN_UNIT, sender=creator)
    params = TaskParams(
        rounds=4,
        min_participants=n,
        max_participants=n,
        proposers_per_round=n_prop,
        voters_per_round=n - n_prop,
        keeper_fee=TOKEN_UNIT,
        max_missed_rounds=1,
        **phase_windows(EMBEDDED_TIMING, n),
    )
    task = FlockTask.deploy(chain, token, params, BUNDLE, sender=creator)
    for i, p in enumerate(people):
        # a 23-byte URL each
        task.join(f"http://10.0.0.{i}:8000", sender=p)
    task.set_endpoint("https://peer0.example", sender=people[0])
    task.advance_to_phase(Phase.AWAIT_START)
    task.start()
    kinds = ("accept", "reject", "mixed", "no_show")
    rounds = {kind: play_round(task, people, kind) for kind in kinds}
    assert rounds["accept"]["outcome"] == Outcome.ACCEPTED
    assert rounds["reject"]["outcome"] == Outcome.REJECTED
    assert rounds["mixed"]["outcome"] == Outcome.ACCEPTED
    assert rounds["no_show"]["evicted"] == n - 1
    for p in [creator, *people]:
        if task.reward_of(p):
            task.claim(sender=p)
        if task.stake_of(p):
            task.withdraw(sender=p)
    if task.pool():
        task.reclaim_pool(sender=creator)
    assert token.balance_of(task.address) == task.burned()

    # nobody commits a seed: draw_roles slashes and evicts every member
    idle = FlockTask.deploy(chain, token, params, BUNDLE, sender=creator)
    for p in people:
        idle.join(sender=p)
    idle.advance_to_phase(Phase.AWAIT_START)
    idle.start()
    idle.advance_to_phase(Phase.AWAIT_DRAW)
    void = idle.draw_roles()
    assert len(void.named("Evicted")) == n
    chain.gas["draw_roles (nobody revealed)"] = chain.gas["draw_roles"][-1:]
    del chain.gas["draw_roles"][-1]

    per_call = {
        name: {
            "calls": len(gas),
            "median": int(statistics.median(gas)),
            "min": min(gas),
            "max": max(gas),
        }
        for name, gas in sorted(chain.gas.items())
    }
    calls = {name: s for name, s in per_call.items() if not name.startswith("deploy")}
    worst = max(calls, key=lambda name: calls[name]["max"])
    share = per_call[worst]["max"] / BLOCK_GAS_LIMIT
    result = {
        "command": " ".join([".venv/bin/python benchmarks/bench_gas.py", *sys.argv[1:]]),
        "setup": {
            "participants": n,
            "proposers_per_round": n_prop,
            "voters_per_round": n - n_prop,
            "note": "every loop at its bound: all participants reveal seeds, every role acts;"
            " a round of no-shows (63 slashes and evictions in finalize), and a draw where"
            " nobody revealed (64 slashes and evictions)",
        },
        "gas_per_call": per_call,
        "at_cap": rounds | {"nobody_revealed": {"draw_roles": void.gas_used}},
        "block_gas_limit": BLOCK_GAS_LIMIT,
        "largest_call": {
            "function": worst,
            "gas": per_call[worst]["max"],
            "share_of_block": round(share, 4),
            "bound": BOUND,
            "within_bound": share <= BOUND,
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
    if share > BOUND:
        sys.exit(f"{worst} takes {share:.1%} of a block, above the {BOUND:.0%} bound")


if __name__ == "__main__":
    main()
