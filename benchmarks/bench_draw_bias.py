"""Role-draw bias from withheld seeds: the share of proposer roles colluding accounts get.

Eight participants, one proposer and two voters per round; k of them (2 or 3) collude. In each
trial every participant commits a fresh seed, the honest ones reveal, and the colluders reveal
last: they compute the draw each choice of withheld seeds would give, from everything they can
see (all revealed seeds), and withhold the fewest seeds that make one of them the proposer, if
any. Then anyone calls draw_roles and the trial records who was drawn. Fair share: k / 8.

FlockTask v1 (kept as tests/flock/fixtures/flocktask_v1.json) drew from the seeds alone, so the
colluders' prediction was exact. FlockTask v2 and v3 (today's) also mix in the hash of a block
mined after the reveals (v3: the beacon block, the reveal window's last, which takes no
reveals), which nobody knows when deciding; the colluders run the same strategy (their best
guess is the same seed-only draw). The contracts run on anvil (`make anvil`), a block per
transaction, whose block hashes cover each block's contents and time like a real chain's; every
trial starts from a snapshot of the same task at SEED_COMMIT. Writes
benchmarks/results/draw_bias.json.

    .venv/bin/python benchmarks/bench_draw_bias.py [--trials 500]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from covey.flock.chain import BoundContract, Chain, contract_address
from covey.flock.commitments import seed_commitment
from covey.flock.devnode import run_anvil
from covey.flock.params import TOKEN_UNIT, TaskParams
from covey.flock.task import FlockTask, Phase, Token

ROOT = Path(__file__).resolve().parents[1]
V1_ARTIFACT = ROOT / "tests" / "flock" / "fixtures" / "flocktask_v1.json"
PARTICIPANTS = 8
T = TOKEN_UNIT


@dataclass(frozen=True)
class V1Params:
    """FlockTask v1's Params, in its order."""

    rounds: int = 1
    min_participants: int = PARTICIPANTS
    max_participants: int = PARTICIPANTS
    min_stake: int = 10 * T
    reward_pool: int = 1000 * T
    proposers_per_round: int = 1
    voters_per_round: int = 2
    slash_pct: int = 10
    threshold_pct: int = 50
    voter_reward_pct: int = 20
    registration_blocks: int = 40
    seed_commit_blocks: int = 9  # 8 transactions and the block that opens the window
    seed_reveal_blocks: int = 9
    propose_blocks: int = 8
    vote_commit_blocks: int = 8
    vote_reveal_blocks: int = 8


V3_PARAMS = TaskParams(
    rounds=1,
    min_participants=PARTICIPANTS,
    max_participants=PARTICIPANTS,
    proposers_per_round=1,
    voters_per_round=2,
    keeper_fee=0,
    registration_blocks=40,
    seed_commit_blocks=9,
    seed_reveal_blocks=10,  # 8 reveals, the block that opens the window, the beacon block
)


class V1Task(BoundContract):
    artifact = "FlockTaskV1"
    SEED_REVEAL, AWAIT_DRAW = 3, 4


def deploy(chain: Chain, token: Token, version: str, people: list[str]) -> BoundContract:
    """A started task of `version` ('v1' or 'v3', today's) with every participant joined."""
    creator = chain.accounts[0]
    if version == "v3":
        bundle = hashlib.sha256(b"draw bias").digest()
        task: BoundContract = FlockTask.deploy(chain, token, V3_PARAMS, bundle, sender=creator)
    else:
        chain.artifacts["contracts"][V1Task.artifact] = json.loads(V1_ARTIFACT.read_text())[
            "contracts"
        ]["FlockTask"]
        nonce = chain.w3.eth.get_transaction_count(creator)
        token.approve(contract_address(creator, nonce + 1), 1000 * T, sender=creator)
        args = (token.address, tuple(asdict(V1Params()).values()))
        receipt = chain.send("deploy v1", chain.factory(V1Task.artifact).constructor(*args))
        task = V1Task(chain, str(receipt["contractAddress"]))
    for who in people:
        token.approve(task.address, 10 * T, sender=who)
        args = ("",) if version == "v3" else (10 * T,)
        task.transact("join", *args, sender=who)
    advance(task, 1)  # AWAIT_START, in both versions
    task.transact("start")
    return task


def dev_rpc(chain: Chain, method: str, *params: Any) -> Any:
    """anvil's development methods: evm_snapshot, evm_revert, anvil_mine."""
    return chain.w3.provider.make_request(method, list(params))["result"]  # type: ignore[arg-type]


def advance(task: BoundContract, phase: int) -> None:
    """Mine until the next transaction lands in `phase` (timed phases only)."""
    chain = task.chain
    while True:
        if isinstance(task, FlockTask):
            current, end = task.phase_at(chain.next_block)
        else:  # v1 has no phase_at: ask about the pending block
            views = task.contract.functions
            current = views.phase().call(block_identifier="pending")
            end = views.phase_end().call(block_identifier="pending")
        if current == phase:
            return
        dev_rpc(chain, "anvil_mine", hex(end - chain.next_block))


def seed_only_proposer(task: BoundContract, revealed: list[str], seeds: dict[str, bytes]) -> str:
    """v1's draw of the proposer (position 0 of the shuffle): all a colluder can compute."""
    xor = 0
    for who in revealed:
        xor ^= int.from_bytes(seeds[who], "big")
    seed = keccak(abi_encode(["uint256", "uint256", "address"], [xor, 0, task.address]))
    pick = int.from_bytes(keccak(abi_encode(["bytes32", "uint256"], [seed, 0])), "big")
    return revealed[pick % len(revealed)]


def trial(
    task: BoundContract, people: list[str], colluders: list[str], seeds: dict[str, bytes]
) -> tuple[bool, int, int]:
    """One round's draw under attack: (a colluder is the proposer, seeds withheld, slashed)."""
    current = isinstance(task, FlockTask)
    for who in people:
        task.transact("commit_seed", seed_commitment(seeds[who], who), sender=who)
    advance(task, Phase.SEED_REVEAL if current else V1Task.SEED_REVEAL)
    honest = [p for p in people if p not in colluders]
    for who in honest:
        task.transact("reveal_seed", seeds[who], sender=who)
    withheld: tuple[str, ...] = ()
    for k in range(len(colluders)):  # the fewest seeds to withhold, none if nothing helps
        for option in combinations(colluders, k):
            revealed = [p for p in people if p not in option]
            if seed_only_proposer(task, revealed, seeds) in colluders:
                withheld = option
                break
        else:
            continue
        break
    for who in colluders:
        if who not in withheld:
            task.transact("reveal_seed", seeds[who], sender=who)
    advance(task, Phase.AWAIT_DRAW if current else V1Task.AWAIT_DRAW)
    drawn = task.transact("draw_roles")
    (roles,) = drawn.named("RolesDrawn")
    slashed = sum(e["amount"] for e in drawn.named("Slashed"))
    return roles["proposers"][0] in colluders, len(withheld), slashed


def measure(url: str, version: str, k: int, trials: int) -> dict[str, Any]:
    # anvil's unlocked dev accounts; the next transaction always lands in the next block
    chain = Chain.connect(url, margin_blocks=0)
    creator, *people = chain.accounts[: PARTICIPANTS + 1]
    token = Token.deploy(chain, 1_000_000 * T, sender=creator)
    for who in people:
        token.transfer(who, 1000 * T, sender=creator)
    task = deploy(chain, token, version, people)
    colluders = people[-k:]
    at_seed_commit = dev_rpc(chain, "evm_snapshot")
    wins = withheld = slashed = 0
    for t in range(trials):
        dev_rpc(chain, "evm_revert", at_seed_commit)
        at_seed_commit = dev_rpc(chain, "evm_snapshot")  # a snapshot is used up by a revert
        seeds = {p: hashlib.sha256(f"{version}/{k}/{t}/{p}".encode()).digest() for p in people}
        won, held, lost = trial(task, people, colluders, seeds)
        wins, withheld, slashed = wins + won, withheld + held, slashed + lost
    share = wins / trials
    return {
        "contract": version,
        "colluders": k,
        "participants": PARTICIPANTS,
        "trials": trials,
        "proposer_share": round(share, 4),
        "stderr": round(math.sqrt(share * (1 - share) / trials), 4),
        "fair_share": k / PARTICIPANTS,
        "seeds_withheld_per_trial": round(withheld / trials, 3),
        "tokens_slashed_per_trial": round(slashed / trials / T, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=500)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for v in ("v1", "v3"):
        for k in (2, 3):
            with run_anvil() as url:
                rows.append(row := measure(url, v, k, args.trials))
            print(
                f"{v} {k} of {PARTICIPANTS}: {row['proposer_share']:.1%} ± {row['stderr']:.1%}"
                f" (fair {row['fair_share']:.1%})",
                flush=True,
            )
    result = {
        "command": " ".join([".venv/bin/python benchmarks/bench_draw_bias.py", *sys.argv[1:]]),
        "setup": "8 participants, 1 proposer and 2 voters per round; colluders reveal last and"
        " withhold the fewest seeds that make one of them the proposer by the seed-only draw;"
        " on anvil, a block per transaction",
        "results": rows,
        "wall_s": round(time.perf_counter() - started, 1),
        "python": platform.python_version(),
    }
    out = ROOT / "benchmarks" / "results" / "draw_bias.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
