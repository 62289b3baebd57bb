"""A full FLock round on a real node: anvil with interval mining (a block a second).

Each participant is a separate account with its own key (read from a 0600 file by
covey.flock.keys) and its own `Chain.connect`, signing and sending its transactions from its
own thread, as participants on different machines would. Windows come from `phase_windows` for
a one-second block time; every participant waits for its phase (`wait_for_phase`), which the
client checks against the block its transaction will land in. The anvil binary comes from
`make anvil` (npm's @foundry-rs/anvil, installed under .tools/), PATH or COVEY_ANVIL; the test
skips if there is none. `covey.flock.devnode.run_anvil` starts it on a free loopback port and
stops it by its PID.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from covey.atomic import write_private_file
from covey.flock.chain import Chain
from covey.flock.commitments import (
    new_secret,
    proposal_commitment,
    seed_commitment,
    vote_commitment,
)
from covey.flock.devnode import find_anvil, run_anvil
from covey.flock.keys import load_private_key
from covey.flock.params import TOKEN_UNIT, TaskParams, Timing, phase_windows
from covey.flock.task import FlockTask, Outcome, Phase, PhaseError, Token

pytestmark = pytest.mark.chain

T = TOKEN_UNIT
PEOPLE = 4
TIMING = Timing(block_time_s=1, train_s=2, judge_s=2, tx_s=2, txs_per_block=50)


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    if find_anvil() is None:
        pytest.skip("no anvil binary: run `make anvil` (npm's @foundry-rs/anvil, into .tools/)")
    with run_anvil(block_time_s=1) as url:
        yield url


def keyed_chain(url: str, path: Path) -> Chain:
    """A participant's own connection, with a fresh key written to a private file."""
    write_private_file(path, (secrets.token_hex(32) + "\n").encode())
    return Chain.connect(url, key=load_private_key(path), log_range=5)


def all_at_once(actions: list[Callable[[], object]]) -> None:
    """Run each participant's action in its own thread; re-raise the first failure."""
    with ThreadPoolExecutor(len(actions)) as pool:
        for future in [pool.submit(action) for action in actions]:
            future.result()


def test_a_round_on_anvil_with_separate_signed_accounts(anvil_url: str, tmp_path: Path) -> None:
    faucet = Chain.connect(anvil_url)  # anvil's unlocked dev account: gas money only
    creator = keyed_chain(anvil_url, tmp_path / "creator.key")
    chains = [keyed_chain(anvil_url, tmp_path / f"p{i}.key") for i in range(PEOPLE)]
    for chain in [creator, *chains]:
        sent = faucet.w3.eth.send_transaction(
            {"from": faucet.default_account, "to": chain.default_account, "value": 10**20}
        )
        faucet.w3.eth.wait_for_transaction_receipt(sent)

    params = TaskParams(
        rounds=1,
        min_participants=PEOPLE,
        max_participants=PEOPLE,
        proposers_per_round=1,
        voters_per_round=2,
        **phase_windows(TIMING, PEOPLE),
    )
    token = Token.deploy(creator, 1_000_000 * T)
    bundle = hashlib.sha256(b"anvil round").digest()
    task = FlockTask.deploy(creator, token, params, bundle, timing=TIMING)
    for chain in chains:
        token.transfer(chain.default_account, 100 * T)
    tasks = [FlockTask.attach(chain, task.address) for chain in chains]
    me = [chain.default_account for chain in chains]

    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(PEOPLE)]
    all_at_once([lambda t=t, u=u: t.join(u) for t, u in zip(tasks, urls, strict=True)])
    assert sorted(task.participants()) == sorted(me)
    assert tasks[1].endpoint_of(me[2]) == "http://127.0.0.1:9002"

    task.wait_for_phase(Phase.AWAIT_START, timeout_s=60)
    task.start()  # the creator moves the phase and earns the keeper fee
    seeds = [new_secret() for _ in tasks]
    all_at_once(
        [
            lambda t=t, s=s, a=a: t.commit_seed(seed_commitment(s, a))
            for t, s, a in zip(tasks, seeds, me, strict=True)
        ]
    )
    for t in tasks:
        t.wait_for_phase(Phase.SEED_REVEAL, timeout_s=60)
    all_at_once([lambda t=t, s=s: t.reveal_seed(s) for t, s in zip(tasks, seeds, strict=True)])
    tasks[0].wait_for_phase(Phase.AWAIT_DRAW, timeout_s=60)
    tasks[0].draw_roles()  # participant 0 is the keeper this time
    # a reveal now would land outside SEED_REVEAL: refused before anything is sent
    with pytest.raises(PhaseError, match="reveal_seed needs SEED_REVEAL"):
        tasks[1].reveal_seed(seeds[1])

    (proposer,) = task.proposers_of(0)
    voters = task.voters_of(0)
    by_address = dict(zip(me, tasks, strict=True))
    digest, salt = hashlib.sha256(b"an update's CID digest").digest(), new_secret()
    by_address[proposer].commit_proposal(proposal_commitment(digest, salt, proposer))
    by_address[proposer].wait_for_phase(Phase.PROPOSE_REVEAL, timeout_s=60)
    by_address[proposer].reveal_proposal(digest, salt)
    salts = {v: new_secret() for v in voters}
    for v in voters:
        by_address[v].wait_for_phase(Phase.VOTE_COMMIT, timeout_s=60)
    ballots = {v: vote_commitment(1, salts[v], v) for v in voters}
    all_at_once([lambda v=v: by_address[v].commit_vote(ballots[v]) for v in voters])
    for v in voters:
        by_address[v].wait_for_phase(Phase.VOTE_REVEAL, timeout_s=60)
    all_at_once([lambda v=v: by_address[v].reveal_vote(1, salts[v]) for v in voters])
    task.wait_for_phase(Phase.AWAIT_FINALIZE, timeout_s=60)
    final = task.finalize()
    assert task.result(0).outcome == Outcome.ACCEPTED
    assert {e["participant"] for e in final.named("Rewarded")} == {proposer, *voters}
    assert task.phase() == Phase.ENDED

    def cash_out(t: FlockTask) -> None:
        if t.reward_of(t.chain.default_account):
            t.claim()
        t.withdraw()

    all_at_once([lambda t=t: cash_out(t) for t in tasks])
    task.claim()  # the creator's keeper fees
    if task.pool():  # what no round spent (rounding dust, unused keeper fees)
        task.reclaim_pool()
    assert token.balance_of(task.address) == task.burned()  # what the round did not pay
    # the pace a voter's fetch deadline is reckoned from: anvil mines a block a second
    assert 0.5 <= task.chain.seconds_per_block() <= 3.0
    # events are read from the deployment block, five blocks per request
    assert len(tasks[3].events("SeedRevealed")) == PEOPLE
    assert len(tasks[3].events("Withdrawn")) == PEOPLE
    assert tasks[3].chain.block_number - task.deployed_at > 5 * 4
