"""A FLock task across machines: create it, join it, watch it, fetch its adapter.

Each party runs one command on its own machine, with its own key and data:

    covey flock create RECIPE --chain-url URL --key-file creator.key --serve 0.0.0.0:8090
    covey flock join TASK --chain-url URL --key-file me.key --data mine.jsonl \\
        --listen 0.0.0.0:8091 --public-url http://me.example:8091 --gateway http://creator:8090
    covey flock status TASK --chain-url URL
    covey flock fetch TASK --chain-url URL --gateway URL --out final/

`create` deploys (or reuses) the ERC-20 and the task contract, funds the reward pool, and
publishes the task bundle (`covey.flock.bundle`: recipe, base model and its weights' hash,
initial adapter) by CID; the contract records the CID. `join` reads it from there, checks that
its base model has the bundle's weights, and runs a `covey.flock.agent.Participant` until the
task ends, serving every blob it holds over HTTP (`covey.store.gateway`). `fetch` derives the
global adapter from the chain and the gateways, as every participant does, and writes a PEFT
folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from covey.atomic import atomic_directory, atomic_write_bytes
from covey.config import FedConfig, RunConfig
from covey.data.prompts import tokenize_records
from covey.data.records import load_records
from covey.errors import ConfigError, CoveyError, DataError
from covey.fed.attacks import poison_records
from covey.fed.rounds import RunModel
from covey.flock.agent import (
    FINISHED,
    Behaviour,
    LocalState,
    Participant,
    data_split,
    stake_and_join,
)
from covey.flock.bundle import (
    TaskBundle,
    bundle_base_path,
    bundle_recipe,
    task_params,
    weights_sha256,
)
from covey.flock.chain import Chain, ChainError, ContractRevert
from covey.flock.history import TaskHistory, balances, finished_rounds, round_facts
from covey.flock.keys import load_private_key
from covey.flock.ledger import Blobs, Ledger, global_bytes
from covey.flock.params import TOKEN_UNIT, TaskParams, Timing, phase_windows
from covey.flock.task import FlockTask, Phase, Token
from covey.model.loading import base_model_id, load_base_model
from covey.model.lora import adapter_files, adapter_state
from covey.store.cid import cid_from_digest, digest_of
from covey.store.endpoints import address_refusal, check_endpoint, check_gateway_url
from covey.store.gateway import Gateway
from covey.store.local import LocalStore

log = logging.getLogger("covey.flock")

MAX_FAILURES = 30
"""Chain errors in a row after which `join` gives up (each is retried after a poll)."""


# ---------------------------------------------------------------- attaching to a task


def connect(chain_url: str, key_file: Path | None = None, *, signer: bool = True) -> Chain:
    """A JSON-RPC connection, signing with the key from `key_file` or COVEY_PRIVATE_KEY."""
    if not chain_url:
        raise ConfigError("--chain-url is required: the JSON-RPC URL of the task's chain")
    key = load_private_key(key_file) if signer else None
    return Chain.connect(chain_url, key=key)


def attach_task(chain: Chain, address: str) -> FlockTask:
    """The task at `address`, or a ConfigError saying it is not one."""
    try:
        task = FlockTask.attach(chain, address)
        task.task_bundle  # noqa: B018 (a Covey task answers; other contracts revert or fail)
        task.params  # noqa: B018
    except (ContractRevert, ValueError, TypeError) as e:
        raise ConfigError(
            f"{address} is not a Covey FLock task on {chain.label} ({type(e).__name__}); check "
            "the task address and --chain-url"
        ) from None
    except ChainError as e:
        raise ConfigError(f"task {address}: {e}") from None
    return task


def read_bundle(task: FlockTask, blobs: Blobs) -> tuple[TaskBundle, RunConfig]:
    """The task's bundle (its CID is on chain), fetched, verified and parsed."""
    cid = cid_from_digest(task.task_bundle)
    try:
        data = blobs.get(cid, task.creator())
    except DataError as e:
        raise CoveyError(
            f"task bundle {cid}: {e}; pass --gateway with a URL that serves it (the creator's "
            "`covey flock create --serve`, or any participant's)"
        ) from None
    bundle = TaskBundle.from_bytes(data, f"task bundle {cid}")
    return bundle, bundle.config(f"task bundle {cid}")


def task_model(cfg: RunConfig, bundle: TaskBundle) -> RunModel:
    """Load the base model named by `cfg.model` and check it has the bundle's weights."""
    path = bundle_base_path(cfg)
    if path is not None:  # read_bundle left it unread and no --base replaced it
        raise ConfigError(
            f"the task's bundle names a path as its base model ({path!r}); paths from a "
            f"bundle are never read: pass --base with this machine's copy of "
            f"{bundle.base_model!r}"
        )
    model, tokenizer = load_base_model(cfg.model)
    digest = weights_sha256(model)
    if digest != bundle.base_weights_sha256:
        raise ConfigError(
            f"model.base {cfg.model.base!r} is not the task's base model: its weights hash "
            f"{digest[:16]}..., the bundle's {bundle.base_weights_sha256[:16]}... (the creator "
            f"used {bundle.base_model!r}); pass --base with the same weights"
        )
    return RunModel.build(cfg, model, tokenizer, bundle.base_model)


# ---------------------------------------------------------------- create


@dataclass
class Created:
    task: str
    token: str
    bundle_cid: str
    initial_adapter: str
    params: TaskParams

    def as_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "token": self.token,
            "bundle": self.bundle_cid,
            "initial_adapter": self.initial_adapter,
            "params": asdict(self.params),
        }


def create_task(
    cfg: RunConfig,
    chain: Chain,
    store: LocalStore,
    *,
    token_address: str | None = None,
    participants: int = 4,
    max_participants: int | None = None,
    block_time_s: float = 12.0,
    train_s: float = 600.0,
    tx_s: float = 30.0,
    registration_s: float = 0.0,
    fund: dict[str, float] | None = None,
) -> Created:
    """Load the base model, make the initial adapter, publish the bundle, deploy the task."""
    model, tokenizer = load_base_model(cfg.model)
    base_hash = weights_sha256(model)
    base_id = base_model_id(cfg.model)
    peft = RunModel.build(
        cfg, model, tokenizer, base_id
    ).model  # the adapter every engine starts from
    initial_cid = store.put(global_bytes(adapter_state(peft), base_id))
    bundle = TaskBundle(
        recipe=bundle_recipe(cfg),
        base_model=base_id,
        base_weights_sha256=base_hash,
        initial_adapter=initial_cid,
    )
    bundle_cid = store.put(bundle.to_bytes())
    most = max_participants or participants
    timing = Timing(block_time_s=block_time_s, train_s=train_s, tx_s=tx_s)
    windows = phase_windows(timing, most)
    # registration also waits for every party to start its node and load the model
    windows["registration_blocks"] = max(
        windows["registration_blocks"], math.ceil(registration_s / block_time_s) + 1
    )
    params = task_params(cfg, participants, most, windows)
    params.validate()
    sender = chain.default_account
    token = (
        Token.attach(chain, token_address) if token_address else Token.deploy(chain, sender=sender)
    )
    if token.balance_of(sender) < params.reward_pool:
        raise ConfigError(
            f"{sender} holds {token.balance_of(sender) / TOKEN_UNIT:g} tokens of {token.address};"
            f" the reward pool is {params.reward_pool / TOKEN_UNIT:g}"
        )
    task = FlockTask.deploy(
        chain, token, params, digest_of(bundle_cid), sender=sender, timing=timing
    )
    for address, amount in (fund or {}).items():
        token.transfer(address, int(amount * TOKEN_UNIT), sender=sender)
    return Created(task.address, token.address, bundle_cid, initial_cid, params)


# ---------------------------------------------------------------- join


@dataclass
class JoinSettings:
    task: str
    chain_url: str
    data: Path
    state: Path
    key_file: Path | None = None
    listen: str = "127.0.0.1:0"
    public_url: str = ""
    gateways: tuple[str, ...] = ()
    base: str | None = None
    device: str | None = None
    poll_s: float = 1.0
    linger_s: float = 60.0
    """How long to keep serving blobs after the task ends."""
    behaviour: Behaviour = field(default_factory=Behaviour)


def join_task(settings: JoinSettings) -> Path:
    """Take part in a task until it ends; returns the folder of the final adapter."""
    chain = connect(settings.chain_url, settings.key_file)
    me = chain.default_account
    task = attach_task(chain, settings.task)
    state = settings.state
    store = LocalStore(state / "store")
    gateways = [check_gateway_url(g, "--gateway") for g in settings.gateways]
    blobs = Blobs(store, task, gateways)
    bundle, cfg = read_bundle(task, blobs)
    blobs.allow_private_endpoints = cfg.flock.allow_private_endpoints
    model_cfg = cfg.model
    if settings.base:
        model_cfg = replace(model_cfg, base=settings.base)
    if settings.device:
        model_cfg = replace(model_cfg, device=settings.device)
    cfg = replace(cfg, model=model_cfg)
    records = load_records(settings.data).records
    if settings.behaviour.update_attack == "backdoor":  # a robustness experiment's attacker
        records = poison_records(records, cfg.attack, int(me, 16))
    host, _, port = settings.listen.rpartition(":")
    with Gateway(store, host or "127.0.0.1", int(port or 0)) as gateway:
        endpoint = check_endpoint(settings.public_url or gateway.url, "--public-url")
        log.info("%s: serving blobs at %s (announced as %s)", me, gateway.url, endpoint)
        warn_if_unreachable(endpoint, cfg.flock.allow_private_endpoints)
        # before the model loads (minutes): stake while registration is open, and after a
        # restart on another address point peers at it, so our published blobs stay reachable
        if task.phase() == Phase.REGISTRATION and not task.joined(me):
            stake_and_join(task, me, endpoint, me[:10])
            local = LocalState(state, task.address, me)  # the join's gas, for benchmarks/
            local.data.setdefault("costs", {})["join"] = {"gas": sum(map(sum, chain.gas.values()))}
            local.save()
        elif task.joined(me) and task.endpoint_of(me) != endpoint:
            task.set_endpoint(endpoint, sender=me)
            log.info("%s: now serving blobs at %s", me[:10], endpoint)
        run_model = task_model(cfg, bundle)
        examples = tokenize_records(records, run_model.tokenizer, cfg.prompt)
        try:
            train, validation = data_split(examples, cfg.flock.validation_examples)
        except DataError as e:
            raise DataError(f"{settings.data}: {e}") from None
        ledger = Ledger(
            task,
            blobs,
            bundle.initial_adapter,
            cfg.fed,
            base_model=bundle.base_model,
            cache=state / "globals",
            train=cfg.train,
        )
        participant = Participant(
            task=task, address=me, cfg=cfg, model=run_model, train=train, validation=validation,
            folder=state, blobs=blobs, ledger=ledger, endpoint=endpoint,
            behaviour=settings.behaviour, name=me[:10],
        )  # fmt: skip
        failures = 0
        while not participant.done:
            try:
                acted = participant.step()
                failures = 0
            except ChainError as e:  # a node hiccup or a window missed by a block: try again
                failures += 1
                if failures > MAX_FAILURES:
                    raise
                log.warning("%s: %s (retrying, %d/%d)", me[:10], e, failures, MAX_FAILURES)
                acted = False
            if not acted:
                time.sleep(settings.poll_s)
        final = write_adapter(run_model, ledger, finished_rounds(task), state / "final")
        if settings.linger_s > 0:  # peers that still derive the last round may need our blobs
            log.info("%s: serving blobs for %.0f s more", me[:10], settings.linger_s)
            time.sleep(settings.linger_s)
    return final


def warn_if_unreachable(endpoint: str, allow_private: bool) -> None:
    """Say so when peers will refuse to fetch from `endpoint`: an address literal that is not
    public, in a task that does not allow private endpoints."""
    host = urlsplit(endpoint).hostname or ""
    try:
        why = None if allow_private else address_refusal(host)
    except ValueError:  # a host name: resolved by each peer when it fetches
        return
    if why:
        log.warning(
            "--public-url %s is %s: peers will not fetch from it (this task does not set "
            "flock.allow_private_endpoints); announce a public address",
            endpoint,
            why,
        )


def write_adapter(run_model: RunModel, ledger: Ledger, round_: int, out: Path) -> Path:
    """The global adapter after `round_` rounds as a PEFT folder (`covey serve --adapter`)."""
    state, cid = ledger.global_state(round_)
    files = adapter_files(run_model.model, state, run_model.base_model_id)
    with atomic_directory(out, overwrite=True) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / "covey-flock.json").write_text(
            json.dumps({"task": ledger.task.address, "round": round_, "cid": cid}, indent=2) + "\n"
        )
    log.info("global adapter after %d round(s): %s (%s)", round_, cid, out)
    return out


# ---------------------------------------------------------------- status and fetch


def task_status(task: FlockTask) -> dict[str, Any]:
    """Everything the chain says about the task, as plain data."""
    history = TaskHistory(task).read()
    done = finished_rounds(task)
    members = task.participants()
    return {
        "task": task.address,
        "token": task.token.address,
        "bundle": cid_from_digest(task.task_bundle),
        "phase": task.phase().name,
        "round": task.current_round(),
        "rounds": task.params.rounds,
        "pool": task.pool() / TOKEN_UNIT,
        "participants": [
            {
                "address": m,
                "endpoint": task.endpoint_of(m),
                "missed_rounds": task.missed_rounds(m),
            }
            for m in members
        ],
        "history": [round_facts(task, history, r) for r in range(done)],
        "balances": balances(task, sorted({str(e["participant"]) for e in history.joined})),
    }


def fetch_adapter(
    task: FlockTask, blobs: Blobs, out: Path, round_: int | None, base: str | None
) -> tuple[Path, str]:
    """Rebuild the global adapter of `round_` (default: the latest) from the chain and the
    gateways, checking every CID, and write it as a PEFT folder; (folder, CID)."""
    bundle, cfg = read_bundle(task, blobs)
    blobs.allow_private_endpoints = cfg.flock.allow_private_endpoints
    done = finished_rounds(task)
    target = done if round_ is None else round_
    if not 0 <= target <= done:
        raise ConfigError(f"--round {round_}: the task has finished {done} round(s) (0..{done})")
    if base:
        cfg = replace(cfg, model=replace(cfg.model, base=base))
    run_model = task_model(cfg, bundle)
    ledger = Ledger(
        task, blobs, bundle.initial_adapter, cfg.fed, base_model=bundle.base_model, train=cfg.train
    )
    write_adapter(run_model, ledger, target, out)
    return out, ledger.global_state(target)[1]


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def serve_until_done(
    created: Created, chain: Chain, store: LocalStore, listen: str, fed: FedConfig
) -> None:
    """Serve `store` at `listen` (HOST:PORT) and archive the task as it goes, until it ends
    (or Ctrl-C): the accepted updates of every finished round and the global adapters derived
    from them, so that `fetch` works after the participants have gone."""
    task = attach_task(chain, created.task)
    host, _, port = listen.rpartition(":")
    archive = task_archive(task, store, created, fed)
    with Gateway(store, host or "127.0.0.1", int(port or 0)) as gateway:
        log.info("serving the task's blobs at %s until it ends (Ctrl-C stops)", gateway.url)
        try:
            while True:
                archive_rounds(archive)
                if task.phase() in FINISHED:
                    break
                time.sleep(5)
        except KeyboardInterrupt:
            pass


def task_archive(task: FlockTask, store: LocalStore, created: Created, fed: FedConfig) -> Ledger:
    """The creator's ledger of `task` over its own store (which holds the bundle), for
    `archive_rounds`."""
    bundle = TaskBundle.from_bytes(store.get(created.bundle_cid))
    cfg = bundle.config()
    blobs = Blobs(store, task, allow_private_endpoints=cfg.flock.allow_private_endpoints)
    # the bound on updates comes from the task's training recipe
    return Ledger(task, blobs, created.initial_adapter, fed, bundle.base_model, train=cfg.train)


def archive_rounds(archive: Ledger) -> None:
    """Fetch and keep what the finished rounds accepted, and derive their global adapters."""
    try:
        archive.global_state(finished_rounds(archive.task))
    except DataError as e:
        log.warning("archive: %s (trying again)", e)
