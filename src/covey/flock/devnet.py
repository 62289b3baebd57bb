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
from contextlib import ExitStack
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


class Devnet:
    """A running devnet: anvil, the task, the creator's gateway and one `join` process per client.

    `run_devnet` (what `covey flock devnet` calls) enters it, waits for the task to end and
    finishes; a test enters it the same way and, in between, kills and restarts a participant
    (`kill`, `start`) as a crash would. Leaving the block stops every process it started, the
    gateway and anvil, in that order.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        *,
        block_time_s: int = 1,
        train_s: float = 60.0,
        tx_s: float = 3.0,
        registration_s: float = 180.0,
        attacks: dict[int, str] | None = None,
    ) -> None:
        self.files = check_data_dir(Path(cfg.data.dir))
        # every participant serves its blobs on loopback: peers may fetch from private addresses
        self.cfg = replace(cfg, flock=replace(cfg.flock, allow_private_endpoints=True))
        self.out = out
        self.block_time_s = block_time_s
        self.train_s, self.tx_s, self.registration_s = train_s, tx_s, registration_s
        self.attacks = attacks or {}
        self.folders = [out / f"participant_{i}" for i in range(len(self.files))]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * len(self.files)
        self._stack = ExitStack()

    def __enter__(self) -> Devnet:
        try:
            self._start_network()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start_network(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.url = self._stack.enter_context(run_anvil(block_time_s=self.block_time_s))
        self.node = Chain.connect(self.url)
        creator_dir = self.out / "creator"
        creator = new_key_file(creator_dir / "key")
        self.addresses = [new_key_file(f / "key") for f in self.folders]
        fund_eth(self.node, [creator, *self.addresses])
        self.chain = Chain.connect(self.url, key=load_private_key(creator_dir / "key"))
        self.store = LocalStore(creator_dir / "store")
        stake = self.cfg.flock.stake
        self.created = create_task(
            self.cfg, self.chain, self.store, participants=len(self.files),
            block_time_s=self.block_time_s, train_s=self.train_s, tx_s=self.tx_s,
            registration_s=self.registration_s, fund=dict.fromkeys(self.addresses, 2 * stake),
        )  # fmt: skip
        write_json(creator_dir / "task.json", self.created.as_json())
        log.info(
            "devnet: task %s on %s; %d participants", self.created.task, self.url, len(self.files)
        )
        self.task = attach_task(self.node, self.created.task)
        self.gateway = self._stack.enter_context(Gateway(self.store))
        self._stack.callback(self._stop_participants)
        self.archive = task_archive(self.task, self.store, self.created, self.cfg.fed)
        for i in range(len(self.files)):
            self.start(i)

    def command(self, i: int) -> list[str]:
        """Participant i's `covey flock join` command line."""
        return join_command(
            self.created.task, self.url, self.folders[i], self.files[i], self.gateway.url,
            self.cfg, self.attacks.get(i, "none"),
        )  # fmt: skip

    def log_path(self, i: int) -> Path:
        return self.folders[i] / "join.log"

    def start(self, i: int) -> None:
        """Start participant i's process (again, after `kill`: it resumes from its folder)."""
        with self.log_path(i).open("ab") as logfile:
            self.processes[i] = subprocess.Popen(
                self.command(i),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=participant_env(len(self.files)),
            )

    def kill(self, i: int) -> None:
        """SIGKILL participant i's process, as a crash or a power cut would stop it."""
        process = self.processes[i]
        if process is not None:
            process.kill()
            process.wait()

    def wait(self, timeout_s: float | None = None) -> None:
        """Until every participant's process has exited, archiving each round as it ends (as
        `create --serve` does); a participant that failed or a task that outlived its windows
        is an error."""
        params = self.created.params
        per_round = sum(
            getattr(params, w)
            for w in (
                "seed_commit_blocks", "seed_reveal_blocks", "propose_commit_blocks",
                "propose_reveal_blocks", "vote_commit_blocks", "vote_reveal_blocks",
            )
        )  # fmt: skip
        budget_s = timeout_s or self.block_time_s * (
            params.registration_blocks + params.rounds * (per_round + 3 * params.timeout_blocks)
        )
        deadline = time.monotonic() + budget_s
        while any(p is not None and p.poll() is None for p in self.processes):
            if time.monotonic() > deadline:
                raise CoveyError(f"devnet: the task did not end within {budget_s:.0f} s")
            archive_rounds(self.archive)
            time.sleep(1)
        archive_rounds(self.archive)
        failed = [
            self.log_path(i) for i, p in enumerate(self.processes) if p is None or p.returncode
        ]
        if failed:
            raise CoveyError(f"devnet: participant(s) failed; see {', '.join(map(str, failed))}")

    def finish(self) -> dict[str, Any]:
        """The task's status (written to OUT/status.json, with each round's timeline) and its
        global adapter, rebuilt in OUT/final by an outsider's fetch from chain and gateway."""
        status = task_status(self.task)
        status["timeline"] = round_timeline(self.node, self.task)
        write_json(self.out / "status.json", status)
        blobs = Blobs(LocalStore(self.out / "fetched"), self.task, [self.gateway.url])
        _, self.final_cid = fetch_adapter(
            self.task, blobs, self.out / "final", None, self.cfg.model.base
        )
        return status

    def _stop_participants(self) -> None:
        running = [p for p in self.processes if p is not None and p.poll() is None]
        for p in running:
            p.terminate()
        for p in running:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
    """Run a task to its end with one join process per client (participant 0 runs `attack`);
    the task's status at the end."""
    with Devnet(
        cfg, out, block_time_s=block_time_s, train_s=train_s, tx_s=tx_s,
        registration_s=registration_s, attacks={0: attack},
    ) as net:  # fmt: skip
        net.wait(timeout_s)
        status = net.finish()
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
