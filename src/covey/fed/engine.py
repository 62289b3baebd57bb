"""The embedded engine: a whole federation in one process, one base model resident.

Each simulated client is only its tokenized data; training a client means copying the global
adapter into the model's LoRA parameters and running `train_local`. Memory therefore grows with
the clients' tokenized data, not with the number of clients trained: each accepted update is
summed into the round's aggregate as soon as it is validated.

Every update goes through `fed.transport` as it would on a network (encoded, serialized,
parsed, decoded against the global adapter), so a simulation shows what the codec costs in
accuracy and counts the bytes. Under `int8+topk` each client's error-feedback residual is saved
in the round folder of every round it trained in (`feedback.safetensors`), so a resumed run
continues with the residuals it had.

`run_federated` wires the in-process round (`play_round`: select, train, validate) into the
shared loop of `covey.fed.rounds`, which aggregates, evaluates and checkpoints.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.config import RunConfig
from covey.data.prompts import Example, tokenize_records
from covey.data.records import Record, load_records
from covey.errors import ConfigError
from covey.fed import runfolder
from covey.fed.attacks import UPDATE_ATTACKS, malicious_participants, poison_records
from covey.fed.client import UpdateAttack, client_update
from covey.fed.rounds import (
    Hooks,
    Played,
    RunFolder,
    RunHistory,
    RunModel,
    check_targets,
    run_rounds,
)
from covey.fed.runfolder import client_line, rejection
from covey.fed.selection import select_clients
from covey.fed.strategies import Accumulator
from covey.fed.transport import Codec, ErrorFeedback, decode_update, encode_update
from covey.fed.validation import validate_update
from covey.state import State
from covey.store.updates import deserialize_update, serialize_update

log = logging.getLogger("covey.fed")

FEEDBACK_FILE = "feedback.safetensors"
"""In a round folder (`int8+topk`): the residual of each client trained that round, its keys
prefixed `client_<i>/`."""


@dataclass
class ClientData:
    """One simulated client: its name and its tokenized examples."""

    name: str
    examples: list[Example]


@dataclass
class Federation:
    """Everything a simulation holds in memory between rounds: the resident model (with the
    held-out set) and every client's data."""

    run_model: RunModel
    clients: list[ClientData]

    @property
    def model(self) -> Any:
        """The base model wrapped with LoRA, shared by every client in turn."""
        return self.run_model.model


def client_seed(seed: int, round_index: int, client: int) -> int:
    """A distinct, reproducible seed for each (round, client) pair."""
    return (seed * 1_000_003 + round_index * 10_007 + client) % (2**31)


def check_data_dir(data_dir: Path) -> list[Path]:
    """The client files of a `covey data split` folder, or a ConfigError saying how to make it
    (cheap: run before anything is loaded or deleted)."""
    if not data_dir.is_dir():
        raise ConfigError(
            f"data.dir {data_dir}: no such folder; create it with "
            f"`covey data split --out {data_dir}`"
        )
    files = sorted(data_dir.glob("client_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise ConfigError(f"data.dir {data_dir}: no client_<i>.jsonl files; run `covey data split`")
    if not (data_dir / "test.jsonl").is_file():
        raise ConfigError(f"data.dir {data_dir}: no test.jsonl; run `covey data split`")
    return files


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no model or tokenization: the data folder, the base model's
    location and device, FLock's participant count. The CLI runs it before `--overwrite`
    deletes anything and before the model loads (seconds to minutes)."""
    from covey.model.loading import resolve_base, resolve_device

    files = check_data_dir(Path(cfg.data.dir))
    resolve_base(cfg.model.base)
    resolve_device(cfg.model.device)
    if cfg.fed.consensus == "flock":
        check_flock(cfg, len(files))


def check_flock(cfg: RunConfig, participants: int) -> None:
    """What the FLock simulation (`covey.flock.protocol`) needs beyond the recipe's own rules,
    for `participants` client files: run by `preflight`, before anything loads, and by the
    simulation itself."""
    if cfg.flock.chain_url:
        raise ConfigError(
            "flock.chain_url: the simulation drives every participant's account, which needs "
            "the embedded chain's test accounts; leave it empty here and run a network with "
            "`covey flock create` and `covey flock join`"
        )
    if cfg.flock.proposers_per_round + cfg.flock.voters_per_round > participants:
        raise ConfigError(
            "flock.proposers_per_round + flock.voters_per_round must be <= the "
            f"{participants} participants (client files in data.dir)"
        )


def load_client_data(data_dir: Path) -> tuple[list[list[Record]], list[Record]]:
    """The records of client_0.jsonl, client_1.jsonl, ... and test.jsonl in `data_dir`."""
    files = check_data_dir(data_dir)
    clients = [load_records(f).records for f in files]
    return clients, load_records(data_dir / "test.jsonl").records


def prepare(cfg: RunConfig, model: Any, tokenizer: Any, base_model_id: str) -> Federation:
    """Wrap the model with LoRA (seeded) and tokenize every client once for the whole run
    (a backdoor attacker's records poisoned first: experiment ground truth)."""
    client_records, test_records = load_client_data(Path(cfg.data.dir))
    if cfg.attack.kind == "backdoor":
        for i in malicious_participants(len(client_records), cfg.attack):
            client_records[i] = poison_records(client_records[i], cfg.attack, i)
    clients = [
        ClientData(name=f"client_{i}", examples=tokenize_records(records, tokenizer, cfg.prompt))
        for i, records in enumerate(client_records)
    ]
    for client in clients:
        check_targets(client.examples, client.name, cfg)
    run_model = RunModel.build(cfg, model, tokenizer, base_model_id, test_records)
    return Federation(run_model=run_model, clients=clients)


def run_federated(
    cfg: RunConfig,
    fed: Federation,
    resume: bool = False,
    hooks: Hooks | None = None,
    folder: RunFolder | None = None,
) -> RunHistory:
    """Run (or resume) the rounds of `cfg` on a prepared federation; return the round records.

    `folder` is the already checked run folder (the CLI checks it before loading the model).
    """
    hooks = hooks or Hooks()
    folder = folder or RunFolder.check(cfg, resume)
    feedback = load_feedback(folder) if Codec.of(cfg.fed).sparse else None

    def play(round_index: int, global_state: State, merge: Accumulator) -> Played:
        return play_round(cfg, fed, round_index, global_state, merge, hooks, feedback)

    return run_rounds(cfg, folder, fed.run_model, play, hooks)


def play_round(
    cfg: RunConfig,
    fed: Federation,
    round_index: int,
    global_state: State,
    merge: Accumulator,
    hooks: Hooks,
    feedback: dict[int, ErrorFeedback] | None = None,
) -> Played:
    """Select clients, train each from the global adapter, send its update through
    `fed.transport`, validate it and merge it at once (so a round holds one update at a time,
    however many clients train). `feedback`: every client's residual (int8+topk), updated."""
    # Shepherd seeds selection with the 0-based round number
    selected = select_clients(
        len(fed.clients), cfg.fed.client_fraction, round_index - 1, cfg.fed.selection_seed
    )
    hooks.round_start(round_index, cfg.fed.rounds, selected)
    # experiment ground truth: which clients attack (the server never reads this)
    attackers = malicious_participants(len(fed.clients), cfg.attack)
    played = Played(selected=selected, merge=merge)
    codec = Codec.of(cfg.fed)
    up_bytes = 0
    for client in selected:
        data = fed.clients[client]
        hooks.client_start(client, len(data.examples))
        seed = client_seed(cfg.run.seed, round_index, client)
        attacked = client in attackers and cfg.attack.kind in UPDATE_ATTACKS
        attack = UpdateAttack(cfg.attack.kind, cfg.attack.strength, cfg.attack.estimate_shards)
        residual = None if feedback is None else feedback.setdefault(client, ErrorFeedback())
        update = client_update(
            fed.model, fed.run_model.pad_id, data.examples, global_state, cfg.train, seed, codec,
            feedback=residual, attack=attack if attacked else None, on_step=hooks.step,
        )  # fmt: skip
        played.train_seconds += update.metrics["seconds"]
        blob = serialize_update(update.wire)
        up_bytes += len(blob)
        received = decode_update(deserialize_update(blob), global_state, codec)
        verdict = validate_update(
            received, global_state, update.num_samples, len(data.examples),
            cfg.fed.max_update_norm,
        )  # fmt: skip
        line = client_line(
            client, verdict.num_samples or update.num_samples, attacked, update.metrics,
            update_norm=verdict.update_norm,
        )  # fmt: skip
        played.trained.append(line)
        if not verdict.accepted:
            log.warning("round %d: rejected %s: %s", round_index, data.name, verdict.reason)
            played.rejected.append(rejection(client, verdict.reason, attacked))
            continue
        played.accept(received, float(verdict.num_samples), line)
    # what a deployment would move: each update as encoded, the global adapter to each client
    full = encode_update(global_state, global_state, Codec("fp32"))
    down = len(serialize_update(full)) * len(selected)
    played.traffic = {"transport": codec.transport, "up": up_bytes, "down": down}
    if feedback is not None:
        trained = {f"client_{c}/{k}": v for c in selected for k, v in feedback[c].residual.items()}
        played.files[FEEDBACK_FILE] = serialize_update(trained)
    return played


def load_feedback(folder: RunFolder) -> dict[int, ErrorFeedback]:
    """Each client's residual as of the folder's last complete round (empty for a new run)."""
    feedback: dict[int, ErrorFeedback] = {}
    for round_index in folder.done:
        path = runfolder.round_dir(folder.out, round_index) / FEEDBACK_FILE
        if not path.is_file():
            continue
        saved = ErrorFeedback.from_bytes(path.read_bytes(), str(path)).residual
        by_client: dict[int, State] = {}
        for name, tensor in saved.items():
            client, _, key = name.partition("/")
            by_client.setdefault(int(client.removeprefix("client_")), {})[key] = tensor
        feedback |= {c: ErrorFeedback(residual) for c, residual in by_client.items()}
    return feedback


def remove_run(out: Path) -> None:
    """Delete a previous run folder (the CLI's --overwrite, after the recipe has passed)."""
    if out.exists():
        shutil.rmtree(out)
