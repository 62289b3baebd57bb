"""A FLock network on one machine, started the way separate parties would start it.

`covey flock devnet` runs anvil (a real EVM node mining a block every `block_time_s`), makes a
fresh key per party (written owner-only, never printed), funds the accounts with the node's
ETH, creates the task from the creator's key (`covey.flock.network.create_task`), serves the
creator's blobs over HTTP, and starts one `covey flock join` *process* per client file of
data.dir, each with its own key file, data file, folder, port and log:

    OUT/creator/      key, task.json, store/ (bundle, first adapter, and an archive of every
                      accepted update and global adapter, served for `fetch`)
    OUT/participant_i/key, join.log, state.json, store/, globals/, final/
    OUT/final/        the task's global adapter, rebuilt by `fetch` from chain and gateways
    OUT/status.json   `covey flock status --json` at the end

Nothing is shared between the participants but the chain and HTTP, exactly as across machines.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from covey.atomic import write_private_file
from covey.config import RunConfig
from covey.errors import CoveyError
from covey.fed.engine import check_data_dir
from covey.flock.chain import Chain
from covey.flock.devnode import run_anvil
from covey.flock.keys import load_private_key
from covey.flock.ledger import Blobs
from covey.flock.network import (
    archive_rounds,
    attach_task,
    create_task,
    fetch_adapter,
    task_archive,
    task_status,
    write_json,
)
from covey.flock.task import FlockTask
from covey.store.gateway import Gateway
from covey.store.local import LocalStore

log = logging.getLogger("covey.flock")

ETH_PER_ACCOUNT = 10**20  # 100 ETH of anvil's: gas for every transaction of a task


def new_key_file(path: Path) -> str:
    """A fresh account key written owner-only to `path`; its address."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path, (secrets.token_hex(32) + "\n").encode())
    return str(load_private_key(path).address)


def fund_eth(node: Chain, addresses: list[str]) -> None:
    """Send gas money from the node's first unlocked account (a dev node's)."""
    sender = node.accounts[0]
    hashes = [
        node.w3.eth.send_transaction({"from": sender, "to": a, "value": ETH_PER_ACCOUNT})  # type: ignore[typeddict-item]
        for a in addresses
    ]
    for h in hashes:
        node.w3.eth.wait_for_transaction_receipt(h, timeout=60)


def participant_env(participants: int) -> dict[str, str]:
    """The environment of one participant process on a shared machine: its share of the cores
    for torch's threads (oversubscribed threads made a 2-core devnet train ~20x slower), unless
    OMP_NUM_THREADS is set already. On its own machine a participant uses all of them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // participants)))
    return env


def join_command(
    task: str, url: str, folder: Path, data: Path, gateway: str, cfg: RunConfig, attack: str
) -> list[str]:
    """The `covey flock join` command line of one participant (no key on it: a key file)."""
    command = [
        sys.executable, "-m", "covey", "flock", "join", task, "--chain-url", url,
        "--key-file", str(folder / "key"), "--data", str(data), "--state", str(folder),
        "--gateway", gateway, "--base", cfg.model.base, "--poll-seconds", "0.5",
        "--linger-seconds", "5",
    ]  # fmt: skip
    if attack != "none":
        command += ["--attack", attack, "--attack-strength", str(cfg.attack.strength)]
    return command


def run_devnet(
    cfg: RunConfig,
    out: Path,
    *,
    block_time_s: int = 1,
    train_s: float = 60.0,
    tx_s: float = 3.0,
    registration_s: float = 180.0,
    attack: str = "none",
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run a task to its end with one join process per client; the task's status at the end."""
    files = check_data_dir(Path(cfg.data.dir))
    out.mkdir(parents=True, exist_ok=True)
    # every participant serves its blobs on loopback: peers may fetch from private addresses
    cfg = replace(cfg, flock=replace(cfg.flock, allow_private_endpoints=True))
    with run_anvil(block_time_s=block_time_s) as url:
        node = Chain.connect(url)
        creator_dir = out / "creator"
        creator = new_key_file(creator_dir / "key")
        folders = [out / f"participant_{i}" for i in range(len(files))]
        addresses = [new_key_file(f / "key") for f in folders]
        fund_eth(node, [creator, *addresses])
        chain = Chain.connect(url, key=load_private_key(creator_dir / "key"))
        store = LocalStore(creator_dir / "store")
        stake = cfg.flock.stake
        created = create_task(
            cfg, chain, store, participants=len(files), block_time_s=block_time_s,
            train_s=train_s, tx_s=tx_s, registration_s=registration_s,
            fund=dict.fromkeys(addresses, 2 * stake),
        )  # fmt: skip
        write_json(creator_dir / "task.json", created.as_json())
        log.info("devnet: task %s on %s; %d participants", created.task, url, len(files))
        task = attach_task(node, created.task)
        with Gateway(store) as gateway:
            processes = []
            for i, (folder, data) in enumerate(zip(folders, files, strict=True)):
                command = join_command(
                    created.task, url, folder, data, gateway.url, cfg, attack if i == 0 else "none"
                )
                with (folder / "join.log").open("ab") as logfile:
                    processes.append(
                        subprocess.Popen(
                            command,
                            stdout=logfile,
                            stderr=subprocess.STDOUT,
                            env=participant_env(len(files)),
                        )
                    )
            params = created.params
            per_round = sum(
                getattr(params, w)
                for w in (
                    "seed_commit_blocks", "seed_reveal_blocks", "propose_commit_blocks",
                    "propose_reveal_blocks", "vote_commit_blocks", "vote_reveal_blocks",
                )
            )  # fmt: skip
            budget = timeout_s or block_time_s * (
                params.registration_blocks + params.rounds * (per_round + 3 * params.timeout_blocks)
            )
            archive = task_archive(task, store, created, cfg.fed)
            try:
                _wait_all(processes, budget, folders, lambda: archive_rounds(archive))
            finally:
                for p in processes:
                    if p.poll() is None:
                        p.terminate()
                for p in processes:
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            blobs = Blobs(LocalStore(out / "fetched"), task, [gateway.url])
            status = task_status(task)
            status["timeline"] = round_timeline(node, task)
            write_json(out / "status.json", status)
            fetch_adapter(task, blobs, out / "final", None, cfg.model.base)
    log.info(
        "devnet: %s; balances: %s",
        status["phase"].lower(),
        json.dumps({b["address"][:10]: round(b["wallet"], 2) for b in status["balances"]}),
    )
    return status


def round_timeline(chain: Chain, task: FlockTask) -> list[dict[str, Any]]:
    """Each round's first block and its timestamp, and the last block's (the task's end)."""

    def at(block: int) -> float:
        return float(chain.w3.eth.get_block(block)["timestamp"])

    starts = [
        {"round": int(e["round"]), "block": int(e["start_block"])}
        for e in task.events("RoundStarted")
    ]
    last = chain.block_number
    return [s | {"time": at(s["block"])} for s in starts] + [
        {"round": None, "block": last, "time": at(last)}
    ]


def _wait_all(
    processes: list[subprocess.Popen[bytes]],
    budget_s: float,
    folders: list[Path],
    meanwhile: Callable[[], None],
) -> None:
    deadline = time.monotonic() + budget_s
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline:
            raise CoveyError(f"devnet: the task did not end within {budget_s:.0f} s")
        meanwhile()
        time.sleep(1)
    meanwhile()
    failed = [f / "join.log" for p, f in zip(processes, folders, strict=True) if p.returncode]
    if failed:
        raise CoveyError(f"devnet: participant(s) failed; see {', '.join(map(str, failed))}")
