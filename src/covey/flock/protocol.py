"""The FLock simulation: N participant agents on one embedded chain, in one process.

Every client of a `covey data split` folder becomes a `covey.flock.agent.Participant`, the
same agent `covey flock join` runs against a real node, with its own account, folder and
private validation split; they share the embedded chain (eth-tester), one resident model and
one content-addressed store. Nothing here plays a participant's move: the simulation only does
what a real chain and network would do on their own:

- it mines blocks when no participant has anything to do (a real chain's clock);
- it decides, as experiment ground truth, which participants attack (`[attack]`), and records
  that with each round; the agents' votes never read it.

Per round the loop of `covey.fed.rounds` gets the next global adapter from the chain, derived
exactly as every participant derives it (`covey.flock.ledger`), plus the round's facts from the
chain (`covey.flock.history`) and what each agent knows of its own moves (scores, training).
A killed simulation resumes from its last complete round: each round folder holds the embedded
chain's state, and each agent's own folder holds its secrets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from covey.atomic import atomic_write_bytes
from covey.config import RunConfig
from covey.errors import ConfigError, DataError
from covey.fed import runfolder
from covey.fed.attacks import malicious_participants
from covey.fed.engine import Federation, check_flock
from covey.fed.rounds import (
    Hooks,
    Played,
    RunFolder,
    RunHistory,
    run_rounds,
)
from covey.fed.runfolder import client_line, rejection
from covey.fed.strategies import Accumulator
from covey.flock.agent import FINISHED, Behaviour, Participant, data_split, seeded_secret
from covey.flock.bundle import TaskBundle, bundle_recipe, task_params, weights_sha256
from covey.flock.chain import Chain
from covey.flock.history import TaskHistory, balances, round_facts
from covey.flock.ledger import Blobs, Ledger, global_bytes
from covey.flock.params import EMBEDDED_TIMING, TOKEN_UNIT, phase_windows
from covey.flock.snapshot import dump_embedded, restore_embedded
from covey.flock.task import FlockTask, Phase, Token
from covey.model.lora import adapter_state
from covey.state import State
from covey.store.cid import digest_of
from covey.store.local import LocalStore

log = logging.getLogger("covey.flock")

CHAIN_STATE = "chain_state.bin"
"""The embedded chain as it was when the round was saved (`covey.flock.snapshot`)."""


@dataclass
class Simulation:
    chain: Chain
    task: FlockTask
    agents: list[Participant]
    ledger: Ledger
    history: TaskHistory
    attackers: set[int]
    funds: int
    """Tokens each participant was given before staking (its starting position)."""

    def drive(self, until: Callable[[], bool]) -> None:
        """Step the agents in turn until `until()`; mine to the end of the phase when none
        acts (a real chain's clock)."""
        while not until():
            acted = False
            for agent in self.agents:
                if until():
                    return
                acted = agent.step() or acted
            if not acted and not until():
                phase, end = self.task.phase_at(self.chain.next_block)
                if not end:
                    raise RuntimeError(f"no participant acts in phase {phase.name}")
                self.chain.advance_to(end)

    def index(self, address: str) -> int:
        return next(i for i, a in enumerate(self.agents) if a.address.lower() == address.lower())


def setup(
    cfg: RunConfig, fed: Federation, out: Path, saved_chain: tuple[bytes, str] | None
) -> Simulation:
    """Deploy (or restore) the task, and make one agent per client."""
    n = len(fed.clients)
    check_flock(cfg, n)
    chain = Chain.embedded(accounts=n + 1)
    deployer, *accounts = chain.accounts
    store = LocalStore(out / "store")
    initial = adapter_state(fed.model)
    base_id = fed.run_model.base_model_id
    initial_cid = store.put(global_bytes(initial, base_id))
    params = task_params(cfg, n, n, phase_windows(EMBEDDED_TIMING, n))
    funds = 2 * params.stake
    if saved_chain is None:
        # the base named by its weights' id, not a local path: the chain's history (and so
        # every draw, which mixes in block hashes) must not depend on where folders are
        shared = replace(cfg, model=replace(cfg.model, base=base_id))
        bundle = TaskBundle(
            recipe=bundle_recipe(shared),
            base_model=base_id,
            base_weights_sha256=weights_sha256(fed.model),
            initial_adapter=initial_cid,
        )
        bundle_cid = store.put(bundle.to_bytes())
        token = Token.deploy(chain, sender=deployer)
        task = FlockTask.deploy(chain, token, params, digest_of(bundle_cid), sender=deployer)
        for address in accounts:
            token.transfer(address, funds, sender=deployer)
    else:
        state, task_address = saved_chain
        restore_embedded(chain, state)
        task = FlockTask.attach(chain, task_address)
    attackers = malicious_participants(n, cfg.attack)
    behaviour = Behaviour.from_attack(cfg.attack.kind, cfg.attack.strength)
    blobs = Blobs(store)
    ledger = Ledger(task, blobs, initial_cid, cfg.fed, base_id, train=cfg.train)
    agents = []
    for i, client in enumerate(fed.clients):
        try:
            train, validation = data_split(client.examples, cfg.flock.validation_examples)
        except DataError as e:
            raise DataError(f"{Path(cfg.data.dir) / client.name}.jsonl: {e}") from None
        agents.append(
            Participant(
                task=task,
                address=accounts[i],
                cfg=cfg,
                model=fed.run_model,
                train=train,
                validation=validation,
                folder=out / "participants" / f"participant_{i}",
                blobs=blobs,
                ledger=ledger,
                behaviour=behaviour if i in attackers else Behaviour(),
                secret=seeded_secret(cfg.run.seed, i),
                name=f"participant {i}",
            )
        )
    sim = Simulation(chain, task, agents, ledger, TaskHistory(task), attackers, funds)
    # registration and start, as a network's participants would (a restored chain is past it)
    sim.drive(lambda: task.phase() not in (Phase.REGISTRATION, Phase.AWAIT_START))
    return sim


def run_flock(
    cfg: RunConfig,
    fed: Federation,
    hooks: Hooks | None = None,
    resume: bool = False,
    folder: RunFolder | None = None,
) -> RunHistory:
    """Run (or resume) every round of a FLock task in simulation; see the module docstring."""
    hooks = hooks or Hooks()
    folder = folder or RunFolder.check(cfg, resume)
    saved = None
    if folder.done:
        last = runfolder.round_dir(folder.out, folder.done[-1])
        if not (last / CHAIN_STATE).is_file():
            raise ConfigError(f"{last / CHAIN_STATE}: missing; this FLock run cannot be resumed")
        first = runfolder.read_record(folder.out, folder.done[0])
        saved = ((last / CHAIN_STATE).read_bytes(), first.engine["flock"]["task"])
    sim = setup(cfg, fed, folder.out, saved)

    def play(round_index: int, global_state: State, merge: Accumulator) -> Played:
        played = play_round(sim, round_index - 1, merge, hooks)
        played.files[CHAIN_STATE] = dump_embedded(sim.chain)
        return played

    history = run_rounds(
        cfg, folder, fed.run_model, play, hooks,
        baseline={"flock": {"task": sim.task.address} | _balances(sim)},
        baseline_files={CHAIN_STATE: dump_embedded(sim.chain)},
    )  # fmt: skip
    sim.drive(lambda: all(a.done for a in sim.agents))  # everyone claims and withdraws
    summary = {
        "task": sim.task.address,
        "participants": [
            {"participant": i, "address": a.address, "attacker": i in sim.attackers}
            for i, a in enumerate(sim.agents)
        ],
        "rounds": [r.engine["flock"] for r in history.rounds],
        "settled": _balances(sim)["balances"],
        "gas": {name: sum(g) / len(g) for name, g in sim.chain.gas.items() if g},
    }
    atomic_write_bytes(folder.out / "flock.json", (json.dumps(summary, indent=2) + "\n").encode())
    from covey.flock.report import plot_rewards  # matplotlib loads only when needed

    plot_rewards(summary, folder.out / "rewards.png")
    return history


def play_round(sim: Simulation, round_: int, merge: Accumulator, hooks: Hooks) -> Played:
    """Let the agents play chain round `round_` to its settlement; report it. The next global
    adapter comes from the chain's ledger, so `merge` stays unused."""
    task = sim.task
    sim.drive(lambda: task.current_round() > round_ or task.phase() in FINISHED)
    facts = round_facts(task, sim.history.read(), round_)
    proposers = [sim.index(a) for a in facts["proposers"]]
    hooks.round_start(round_ + 1, task.params.rounds, proposers)
    next_state, _ = sim.ledger.global_state(round_ + 1)
    merged = {proposer for proposer, _ in sim.ledger.accepted_updates(round_)}
    played = Played(
        selected=proposers, merge=merge, next_state=next_state,
        aggregation=sim.ledger.aggregation(round_ + 1),
    )  # fmt: skip
    # uplink: the blobs proposers published (no downlink: everyone derives the global adapter)
    published = 0
    for proposal in facts["proposals"]:
        i = sim.index(proposal["address"])
        agent = sim.agents[i]
        attacker = i in sim.attackers
        proposal |= {"participant": i, "attacker": attacker}
        proposed = agent.state.round(round_).get("proposal", {})
        training = proposed.get("training", {})
        published += proposed.get("bytes", 0)
        line = client_line(i, len(agent.train), attacker, training)
        played.trained.append(line)
        played.train_seconds += training.get("seconds", 0.0)
        if proposal["address"] in merged:
            played.merged.append(line)
        else:
            played.rejected.append(rejection(i, _why_not_merged(proposal, facts), attacker))
    for vote in facts["votes"]:
        i = sim.index(vote["address"])
        ballot = sim.agents[i].state.round(round_).get("ballot", {})
        played.seconds["vote"] = played.seconds.get("vote", 0.0) + ballot.get("seconds", 0.0)
        vote |= {
            "participant": i,
            "attacker": i in sim.attackers,
            "gains": ballot.get("gains", []),
            "harm_z": ballot.get("harm_z", []),
            "reasons": ballot.get("reasons", []),
            "refused": ballot.get("refused", []),
            "round_views": ballot.get("round_views", []),
        }
    for key in ("rewards", "slashes", "keeper_fees"):
        for entry in facts[key]:
            entry["participant"] = sim.index(entry["address"])
    facts["proposers"] = proposers
    facts["voters"] = [sim.index(a) for a in facts["voters"]]
    facts["evicted"] = [sim.index(a) for a in facts["evicted"]]
    played.engine["flock"] = facts | _balances(sim)
    played.traffic = {"transport": sim.ledger.codec.transport, "up": published}
    return played


def _why_not_merged(proposal: dict[str, Any], facts: dict[str, Any]) -> str:
    if not proposal["committed"]:
        return "no proposal committed"
    if proposal["duplicate"]:
        return "a duplicate of an earlier commitment"
    if not proposal["valid"]:
        return "not revealed"
    if proposal["accepted"]:
        return "accepted on chain but invalid (not merged)"
    if proposal["rejected"]:
        return "voted down"
    return f"undecided ({facts['outcome']})"


def _balances(sim: Simulation) -> dict[str, Any]:
    rows = balances(sim.task, [a.address for a in sim.agents])
    for i, row in enumerate(rows):
        start = sim.funds / TOKEN_UNIT
        row |= {
            "participant": i,
            "attacker": i in sim.attackers,
            "net": row["stake"] + row["unclaimed"] + row["wallet"] - start,
        }
    return {"balances": rows, "pool": sim.task.pool() / TOKEN_UNIT}
