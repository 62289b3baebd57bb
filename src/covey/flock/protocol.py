"""FLock rounds on the training engine: stake, draw roles, propose, vote, let the contract decide.

Every participant is one of the federation's clients. Each keeps a few of its own examples out of
training as a private validation split. Per round (`run_flock`, top to bottom):

1. every participant commits and reveals a random seed; the contract draws proposers and voters;
2. proposers train locally from the current global adapter and publish their update as
   safetensors bytes under its CID (a content-addressed store); the digest goes on chain;
3. voters fetch every proposal by CID (bytes that do not match their hash are refused),
   validate it, score it against the current global adapter on their own validation split, and
   commit, then reveal, one ballot with a verdict per proposal: accept unless it makes their
   examples significantly worse (`judge`; an invalid or missing proposal is rejected);
4. anyone finalizes: the contract judges each proposal by stake-weighted vote, pays the accepted
   proposers and the voters, slashes the rejected proposers and the voters in proportion to the
   verdicts they voted against. The equal-weight average of the accepted proposals becomes the
   next global adapter (equal weights: nobody can check a claimed sample count); a round with
   none accepted keeps the previous one.

FLock votes once per round on the aggregate, so one bad proposal sinks every honest one in its
round; judging each proposal is the same rule with one proposer per round, and keeps the honest
work of a mixed round.

Malicious participants (`[attack]`) send attacked updates when proposing, and as voters either
collude (accept everything, with the update attacks and `always_accept`) or vote at random
(`random_vote`). Which participants attack is experiment ground truth recorded with each round;
nothing in the protocol reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covey.atomic import atomic_write_bytes
from covey.config import RunConfig
from covey.data.prompts import Example
from covey.errors import ConfigError, DataError
from covey.fed import checkpoint
from covey.fed.attacks import UPDATE_ATTACKS, attack_update, malicious_participants
from covey.fed.engine import Federation, client_seed
from covey.fed.rounds import (
    Hooks,
    Played,
    RunFolder,
    RunHistory,
    client_line,
    rejection,
    run_rounds,
)
from covey.fed.strategies import Accumulator
from covey.fed.validation import validate_update
from covey.flock.chain import (
    TOKEN_UNIT,
    Chain,
    FlockTask,
    Outcome,
    Phase,
    RoundResult,
    TaskParams,
    accept_mask,
    seed_commitment,
    vote_commitment,
)
from covey.flock.snapshot import dump_embedded, restore_embedded
from covey.model.lora import load_adapter_state
from covey.state import State
from covey.store.cid import cid_from_digest, digest_of
from covey.store.local import LocalStore
from covey.store.updates import deserialize_update, serialize_update
from covey.train.evaluate import example_losses
from covey.train.local import train_local

log = logging.getLogger("covey.flock")
SCORE_SCALE = 1_000_000
"""Votes carry the loss improvement in micro-nats as an integer (the contract stores uint64)."""
CHAIN_STATE = "chain_state.bin"
"""The embedded chain as it was when the round was saved (`covey.flock.snapshot`), so that a
killed simulation resumes from its last complete round like any run."""


@dataclass
class Participant:
    """A client in FLock mode: its account, training examples and private validation split."""

    index: int
    address: str
    train: list[Example]
    validation: list[Example]
    malicious: bool
    initial_balance: int = 0


@dataclass
class FlockSetup:
    """The chain side of a run."""

    chain: Chain
    task: FlockTask
    participants: list[Participant]
    store: LocalStore
    balances: dict[str, list[int]] = field(default_factory=dict)


def task_params(cfg: RunConfig, n: int) -> TaskParams:
    """Contract parameters from the recipe; phases long enough for every participant's tx."""
    blocks = 4 * n + 10  # the embedded chain mines one block per transaction
    return TaskParams(
        rounds=cfg.fed.rounds,
        min_participants=n,
        max_participants=n,
        min_stake=int(cfg.flock.stake * TOKEN_UNIT),
        reward_pool=int(cfg.flock.reward_pool * TOKEN_UNIT),
        proposers_per_round=cfg.flock.proposers_per_round,
        voters_per_round=cfg.flock.voters_per_round,
        slash_pct=cfg.flock.slash_pct,
        threshold_pct=cfg.flock.threshold_pct,
        voter_reward_pct=cfg.flock.voter_reward_pct,
        registration_blocks=blocks,
        seed_commit_blocks=blocks,
        seed_reveal_blocks=blocks,
        propose_blocks=blocks,
        vote_commit_blocks=blocks,
        vote_reveal_blocks=blocks,
    )


def check_flock(cfg: RunConfig, participants: int) -> None:
    """What the simulation needs beyond the recipe's own rules (run before anything loads)."""
    if cfg.flock.chain_url:
        raise ConfigError(
            "flock.chain_url: the simulation drives every participant's account, which needs "
            "the embedded chain's test accounts; leave flock.chain_url empty"
        )
    if cfg.flock.proposers_per_round + cfg.flock.voters_per_round > participants:
        raise ConfigError(
            "flock.proposers_per_round + flock.voters_per_round must be <= the "
            f"{participants} participants (client files in data.dir)"
        )


def setup_flock(
    cfg: RunConfig, fed: Federation, out: Path, resume_from: tuple[bytes, str] | None = None
) -> FlockSetup:
    """Deploy token and task on the embedded chain, fund and stake every participant; or, with
    `resume_from` (a saved chain state and the task's address), continue from there."""
    n = len(fed.clients)
    check_flock(cfg, n)
    chain = Chain.embedded(accounts=n + 1)
    deployer, *accounts = chain.accounts
    params = task_params(cfg, n)
    funds = 2 * params.min_stake
    attackers = malicious_participants(n, cfg.attack)
    participants = []
    for i, client in enumerate(fed.clients):
        keep = min(cfg.flock.validation_examples, len(client.examples) // 4)
        # every k-th example is private validation data, never trained on
        step = max(1, len(client.examples) // max(keep, 1))
        val_index = set(range(0, len(client.examples), step)[:keep]) if keep else set()
        participants.append(
            Participant(
                index=i,
                address=accounts[i],
                train=[e for j, e in enumerate(client.examples) if j not in val_index],
                validation=[e for j, e in enumerate(client.examples) if j in val_index]
                or client.examples[:1],
                malicious=i in attackers,
                initial_balance=funds,
            )
        )
    if resume_from is not None:
        state, task_address = resume_from
        restore_embedded(chain, state)
        return FlockSetup(
            chain=chain,
            task=chain.task(task_address),
            participants=participants,
            store=LocalStore(out / "store"),
        )
    token = chain.deploy_token(sender=deployer)
    task = chain.deploy_task(token, params, sender=deployer)
    for p in participants:
        token.transfer(p.address, funds, sender=deployer)
        task.join(params.min_stake, sender=p.address)
    task.advance_to_phase(Phase.AWAIT_START)
    task.start(sender=deployer)
    return FlockSetup(
        chain=chain, task=task, participants=participants, store=LocalStore(out / "store")
    )


def run_flock(
    cfg: RunConfig,
    fed: Federation,
    hooks: Hooks | None = None,
    resume: bool = False,
    folder: RunFolder | None = None,
) -> RunHistory:
    """Run (or resume) every round of a FLock task on the embedded chain; see the module
    docstring. The rounds go through the shared loop; the contract decides what is merged."""
    hooks = hooks or Hooks()
    folder = folder or RunFolder.check(cfg, resume)
    saved = None
    if folder.done:
        last = checkpoint.round_dir(folder.out, folder.done[-1])
        first = checkpoint.round_dir(folder.out, folder.done[0]) / checkpoint.ROUND_RECORD
        if not (last / CHAIN_STATE).is_file():
            raise ConfigError(f"{last / CHAIN_STATE}: missing; this FLock run cannot be resumed")
        saved = ((last / CHAIN_STATE).read_bytes(), json.loads(first.read_text())["flock"]["task"])
    flock = setup_flock(cfg, fed, folder.out, saved)

    def play(round_index: int, global_state: State, merge: Accumulator) -> Played:
        played = play_round(cfg, fed, flock, round_index, global_state, merge, hooks)
        played.files[CHAIN_STATE] = dump_embedded(flock.chain)
        return played

    history = run_rounds(
        cfg, folder, fed.run_model, play, hooks,
        baseline={"flock": {"task": flock.task.address} | _balances(flock)},
        baseline_files={CHAIN_STATE: dump_embedded(flock.chain)},
    )  # fmt: skip
    _settle(flock)
    summary = {
        "participants": [
            {"participant": p.index, "address": p.address, "attacker": p.malicious}
            for p in flock.participants
        ],
        "rounds": [r["flock"] for r in history.records],
        "settled": _balances(flock)["balances"],
        "gas": {name: sum(g) / len(g) for name, g in flock.chain.gas.items() if g},
    }
    atomic_write_bytes(folder.out / "flock.json", (json.dumps(summary, indent=2) + "\n").encode())
    from covey.flock.report import plot_rewards  # matplotlib loads only when needed

    plot_rewards(summary, folder.out / "rewards.png")
    return history


def play_round(
    cfg: RunConfig,
    fed: Federation,
    flock: FlockSetup,
    round_index: int,
    global_state: State,
    merge: Accumulator,
    hooks: Hooks,
) -> Played:
    """One FLock round: draw roles, propose, vote, finalize; the accepted and valid proposals
    are handed to the loop with equal weights (nobody can check a claimed sample count)."""
    task = flock.task
    proposers, voters = _draw_roles(flock, cfg.run.seed, round_index)
    hooks.round_start(round_index, cfg.fed.rounds, [p.index for p in proposers])
    proposals, lines = _propose(cfg, fed, flock, proposers, global_state, round_index, hooks)
    task.advance_to_phase(Phase.VOTE_COMMIT)
    vote_started = time.perf_counter()
    candidates = _fetch(cfg, flock, proposers, global_state)
    votes = _vote(cfg, fed, flock, voters, global_state, candidates, round_index)
    vote_seconds = time.perf_counter() - vote_started
    task.advance_to_phase(Phase.AWAIT_FINALIZE)
    chain_round = task.current_round()
    finalized = task.finalize(sender=flock.participants[0].address)
    outcome = task.result(chain_round)
    judged = {str(e["proposer"]).lower(): e for e in finalized.named("ProposalJudged")}
    for proposal in proposals:
        verdict = judged.get(proposal["address"].lower())
        proposal["valid"] = candidates[proposal["position"]] is not None
        proposal["accepted"] = bool(verdict and verdict["accepted"])
        if verdict:
            proposal["accept_stake"] = verdict["accept_stake"] / TOKEN_UNIT
            proposal["reject_stake"] = verdict["reject_stake"] / TOKEN_UNIT
    played = Played(
        selected=[p.index for p in proposers],
        merge=merge,
        trained=lines,
        train_seconds=sum(line.get("seconds", 0.0) for line in lines),
        seconds={"vote": vote_seconds},
    )
    for proposal, line in zip(proposals, lines, strict=True):
        state = candidates[proposal["position"]]
        # an update joins the global adapter when the contract accepted it and it is valid
        # here (a colluding majority could accept one that does not even load)
        if proposal["accepted"] and state is not None:
            played.accept(state, 1.0, line)
        else:
            reason = _why_not_merged(proposal, outcome)
            played.rejected.append(rejection(line["client"], reason, line["attacker"]))
    played.engine["flock"] = {
        "proposers": [p.index for p in proposers],
        "voters": [v.index for v in voters],
        "proposals": proposals,
        "votes": votes,
        "outcome": outcome.outcome.name.lower(),
        "round_reward": outcome.reward / TOKEN_UNIT,
        "paid": outcome.paid / TOKEN_UNIT,
        "slashed": outcome.slashed / TOKEN_UNIT,
        "rewards": _by_participant(flock, finalized.named("Rewarded")),
        "slashes": _by_participant(flock, finalized.named("Slashed")),
        "gas_finalize": finalized.gas_used,
    } | _balances(flock)
    return played


def _why_not_merged(proposal: dict[str, Any], outcome: RoundResult) -> str:
    if proposal["accepted"]:
        return "accepted on chain but invalid here (not merged)"
    if outcome.outcome == Outcome.NO_QUORUM:
        return "no quorum: no vote was revealed"
    return "voted down" if proposal["valid"] else "invalid, voted down"


def simulated_secret(seed: int, round_index: int, participant: int, purpose: str) -> bytes:
    """A participant's 32-byte secret, derived from the run seed so simulations repeat exactly.

    Real participants use `new_secret()` (os randomness); in one process, a seeded secret per
    participant keeps role draws and votes reproducible without changing the protocol.
    """
    return hashlib.sha256(f"{seed}/{round_index}/{participant}/{purpose}".encode()).digest()


def _draw_roles(
    flock: FlockSetup, seed: int, round_index: int
) -> tuple[list[Participant], list[Participant]]:
    """Commit and reveal every participant's seed, then draw the round's roles on chain."""
    task = flock.task
    seeds = {}
    for p in flock.participants:
        seeds[p.address] = simulated_secret(seed, round_index, p.index, "seed")
        task.commit_seed(seed_commitment(seeds[p.address], p.address), sender=p.address)
    task.advance_to_phase(Phase.SEED_REVEAL)
    for p in flock.participants:
        task.reveal_seed(seeds[p.address], sender=p.address)
    task.advance_to_phase(Phase.AWAIT_DRAW)
    task.draw_roles(sender=flock.participants[0].address)
    round_ = task.current_round()
    by_address = {p.address: p for p in flock.participants}
    proposers = [by_address[a] for a in task.proposers_of(round_)]
    voters = [by_address[a] for a in task.voters_of(round_)]
    return proposers, voters


def _propose(
    cfg: RunConfig,
    fed: Federation,
    flock: FlockSetup,
    proposers: list[Participant],
    global_state: State,
    round_index: int,
    hooks: Hooks,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each proposer trains (or attacks), publishes its update by CID and proposes its digest:
    (proposal entries, client lines)."""
    proposals, lines = [], []
    for p in proposers:
        hooks.client_start(p.index, len(p.train))
        seed = client_seed(cfg.run.seed, round_index, p.index)
        if p.malicious and cfg.attack.kind == "free_rider":
            state, metrics = global_state, {}
        else:
            update = train_local(
                fed.model, p.train, global_state, cfg.train, seed, fed.run_model.pad_id,
                on_step=hooks.step,
            )  # fmt: skip
            state, metrics = update.state, update.metrics
        if p.malicious and cfg.attack.kind in UPDATE_ATTACKS:
            state = attack_update(cfg.attack.kind, global_state, state, cfg.attack.strength, seed)
        data = serialize_update(state, {"round": str(round_index), "proposer": p.address})
        cid = flock.store.put(data)
        flock.task.propose(digest_of(cid), sender=p.address)
        proposals.append(
            {
                "participant": p.index,
                "address": p.address,
                "position": proposers.index(p),
                "cid": cid,
                "attacker": p.malicious,
            }
        )
        lines.append(client_line(p.index, len(p.train), p.malicious, metrics))
    return proposals, lines


def _fetch(
    cfg: RunConfig, flock: FlockSetup, proposers: list[Participant], global_state: State
) -> list[State | None]:
    """What every voter sees: each drawn proposer's update, in draw order (the order of the
    ballot's bits), or None when it did not propose, its bytes do not match the digest on chain,
    or it fails validation."""
    digests = dict(flock.task.proposals(flock.task.current_round()))
    candidates: list[State | None] = []
    for p in proposers:
        digest = next((d for a, d in digests.items() if a.lower() == p.address.lower()), None)
        state: State | None = None
        if digest is not None:
            cid = cid_from_digest(digest)
            try:
                state = deserialize_update(flock.store.get(cid))  # re-hashed: must match
            except (DataError, OSError) as e:  # a missing or corrupted blob: rejected
                log.warning("proposal %s from %s refused: %s", cid, p.address, e)
            if state is not None:
                verdict = validate_update(state, global_state, 1, 1, cfg.fed.max_update_norm)
                if not verdict.accepted:
                    log.warning("proposal %s from %s invalid: %s", cid, p.address, verdict.reason)
                    state = None
        candidates.append(state)
    return candidates


@dataclass(frozen=True)
class Judgement:
    """A voter's view of one proposal: loss changes on its own validation examples."""

    gain: float
    """Mean loss decrease per example (positive: the proposal helps)."""
    harm_z: float
    """The mean loss increase in standard errors of the paired per-example differences."""
    accept: bool


def judge(before: torch.Tensor, after: torch.Tensor, harm_z: float) -> Judgement:
    """Accept unless the proposal makes these examples significantly worse.

    A paired test over the voter's examples: with d the per-example loss increase, reject when
    mean(d) >= harm_z * stderr(d). An honest update trained on other data moves a voter's loss
    by a little either way, most of all late in training when the gains are small, and requiring
    a strict improvement would slash honest proposers for that noise; an attacked update raises
    the loss on nearly every example and is rejected at any sensible harm_z. harm_z = 0 is the
    strict rule: accept only a lower mean loss. Examples without target tokens are skipped.
    """
    keep = ~(before.isnan() | after.isnan())
    diff = (after - before)[keep].double()
    if diff.numel() == 0:
        return Judgement(gain=0.0, harm_z=0.0, accept=False)
    mean = float(diff.mean())
    stderr = float(diff.std(unbiased=True)) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    z = mean / stderr if stderr > 0 else 0.0  # one example, or all equal: no spread to test
    accept = mean < 0 if harm_z == 0 or stderr == 0 else mean < harm_z * stderr
    return Judgement(gain=-mean, harm_z=z, accept=accept)


def _vote(
    cfg: RunConfig,
    fed: Federation,
    flock: FlockSetup,
    voters: list[Participant],
    global_state: State,
    candidates: list[State | None],
    round_index: int,
) -> list[dict[str, Any]]:
    """Each voter scores every proposal on its own validation split, then commits and reveals
    one ballot: a verdict per proposal (`judge`). The score is its mean gain over what it
    accepts, in micro-nats."""
    task = flock.task
    if task.proposal_count(task.current_round()) == 0:
        return []  # the contract closes voting on a round without proposals
    pad = fed.run_model.pad_id
    rng = np.random.default_rng(client_seed(cfg.run.seed, round_index, 7919))
    ballots: list[dict[str, Any]] = []
    salts: dict[int, bytes] = {}
    for v in voters:
        load_adapter_state(fed.model, global_state)
        before = example_losses(fed.model, v.validation, cfg.eval.batch_size, pad)
        judged: list[Judgement | None] = []
        for state in candidates:
            if state is None:
                judged.append(None)
                continue
            load_adapter_state(fed.model, state)
            after = example_losses(fed.model, v.validation, cfg.eval.batch_size, pad)
            judged.append(judge(before, after, cfg.flock.harm_z))
        verdicts = [j is not None and j.accept for j in judged]
        gains = [None if j is None else j.gain for j in judged]
        if v.malicious and cfg.attack.kind == "random_vote":
            verdicts = [bool(rng.integers(2)) for _ in candidates]
        elif v.malicious and cfg.attack.kind != "none":
            verdicts = [True] * len(candidates)  # colluding with the malicious proposers
        accepted_gains = [g for g, ok in zip(gains, verdicts, strict=True) if ok and g is not None]
        score = int(max(0.0, float(np.mean(accepted_gains))) * SCORE_SCALE) if accepted_gains else 0
        salts[v.index] = simulated_secret(cfg.run.seed, round_index, v.index, "salt")
        mask = accept_mask(verdicts)
        task.commit_vote(vote_commitment(mask, score, salts[v.index], v.address), sender=v.address)
        ballots.append(
            {
                "participant": v.index,
                "accepts": verdicts,
                "gains": [None if g is None else round(g, 6) for g in gains],
                "harm_z": [None if j is None else round(j.harm_z, 3) for j in judged],
                "score": score,
                "attacker": v.malicious,
            }
        )
    task.advance_to_phase(Phase.VOTE_REVEAL)
    for v, b in zip(voters, ballots, strict=True):
        task.reveal_vote(accept_mask(b["accepts"]), b["score"], salts[v.index], sender=v.address)
    return ballots


def _settle(flock: FlockSetup) -> None:
    """After the last round every participant claims its rewards and withdraws its stake."""
    for p in flock.participants:
        if flock.task.reward_of(p.address) > 0:
            flock.task.claim(sender=p.address)
        if flock.task.stake_of(p.address) > 0:
            flock.task.withdraw(sender=p.address)


def _balances(flock: FlockSetup) -> dict[str, Any]:
    task, token = flock.task, flock.task.token
    return {
        "balances": [
            {
                "participant": p.index,
                "attacker": p.malicious,
                "stake": task.stake_of(p.address) / TOKEN_UNIT,
                "unclaimed": task.reward_of(p.address) / TOKEN_UNIT,
                "wallet": token.balance_of(p.address) / TOKEN_UNIT,
                "net": (
                    token.balance_of(p.address)
                    + task.stake_of(p.address)
                    + task.reward_of(p.address)
                    - p.initial_balance
                )
                / TOKEN_UNIT,
            }
            for p in flock.participants
        ],
        "pool": task.pool() / TOKEN_UNIT,
    }


def _by_participant(flock: FlockSetup, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reward or slash events as (participant index, tokens)."""
    index = {p.address.lower(): p.index for p in flock.participants}
    return [
        {"participant": index[str(e["participant"]).lower()], "amount": e["amount"] / TOKEN_UNIT}
        for e in events
    ]
