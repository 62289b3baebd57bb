"""`covey flock`: a FLock task across machines, one command per party.

  create   deploy a task (token, contract, reward pool) and publish its bundle by CID
  join     take part as one participant, with its own key, data and folder, until the task ends
  status   what the chain says: phase, members, per-round roles, verdicts, rewards, slashes
  fetch    rebuild the task's global adapter from the chain and the gateways (a PEFT folder)
  devnet   all of it on this machine: anvil, a task, one `join` process per client file

Keys come from `--key-file` (hex on its first line, mode 0600) or the COVEY_PRIVATE_KEY
environment variable, never from the command line, and are never printed.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from covey.console import console, quiet_libraries
from covey.errors import ConfigError, CoveyError

flock_app = typer.Typer(
    help="FLock as a network: stake, propose, vote and earn on a real chain, one process each.",
    no_args_is_help=True,
)
log = logging.getLogger("covey.flock")

_CHAIN_URL = typer.Option(
    ..., "--chain-url", envvar="COVEY_CHAIN_URL", help="JSON-RPC URL (or .ipc path) of the chain."
)
_KEY_FILE = typer.Option(
    None,
    "--key-file",
    help="File holding this account's private key (hex, mode 0600); default: the "
    "COVEY_PRIVATE_KEY environment variable. Never passed on the command line.",
)
_GATEWAY = typer.Option(
    [], "--gateway", help="HTTP gateway serving /ipfs/{cid} to fetch blobs from (repeatable)."
)


def _stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


@flock_app.command("create")
def create(
    recipe: Path | None = typer.Argument(None, help="TOML recipe; omitted: the defaults."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable)."),
    chain_url: str = _CHAIN_URL,
    key_file: Path | None = _KEY_FILE,
    participants: int = typer.Option(4, help="Members needed to start (min_participants)."),
    max_participants: int | None = typer.Option(None, help="Most members (default: as many)."),
    block_time: float = typer.Option(12.0, help="The chain's seconds per block."),
    train_seconds: float = typer.Option(600.0, help="A proposer's training time to allow."),
    tx_seconds: float = typer.Option(30.0, help="Time to allow for one transaction to land."),
    token: str | None = typer.Option(None, help="An existing ERC-20 (default: deploy one)."),
    fund: list[str] = typer.Option(
        [], help="ADDRESS=TOKENS: send tokens to a participant for its stake (repeatable)."
    ),
    out: Path = typer.Option(Path("flock-task"), help="Folder for task.json and the blobs."),
    serve: str | None = typer.Option(
        None, help="HOST:PORT: serve the bundle and blobs here until the task ends."
    ),
) -> None:
    """Deploy a FLock task and publish its bundle (recipe, base weights' hash, first adapter)."""
    from covey.config import load_recipe
    from covey.flock.network import connect, create_task, serve_until_done
    from covey.store.local import LocalStore

    quiet_libraries()
    cfg = load_recipe(recipe, overrides)
    funding = {}
    for item in fund:
        address, _, amount = item.partition("=")
        try:
            funding[address] = float(amount)
        except ValueError:
            raise ConfigError(f"--fund {item!r}: expected ADDRESS=TOKENS") from None
    chain = connect(chain_url, key_file)
    store = LocalStore(out / "store")
    created = create_task(
        cfg, chain, store, token_address=token, participants=participants,
        max_participants=max_participants, block_time_s=block_time, train_s=train_seconds,
        tx_s=tx_seconds, fund=funding,
    )  # fmt: skip
    from covey.flock.network import write_json

    write_json(out / "task.json", created.as_json())
    console.print(f"task {created.task} (token {created.token}) on {chain.label}")
    console.print(f"bundle {created.bundle_cid}; first adapter {created.initial_adapter}")
    console.print(f"participants join with: covey flock join {created.task} --chain-url URL ...")
    if serve:
        _stop_on_sigterm()
        serve_until_done(created, chain, store, serve, cfg.fed)


@flock_app.command("join")
def join(
    task: str = typer.Argument(..., help="The task contract's address."),
    chain_url: str = _CHAIN_URL,
    key_file: Path | None = _KEY_FILE,
    data: Path = typer.Option(..., help="This participant's private instruction data file."),
    state: Path = typer.Option(..., help="This participant's folder: secrets, blobs, adapters."),
    listen: str = typer.Option("127.0.0.1:0", help="HOST:PORT this participant serves blobs on."),
    public_url: str = typer.Option(
        "",
        help="http(s)://HOST[:PORT] others reach that server at, no path (default: http://"
        "HOST:PORT of --listen); a task without flock.allow_private_endpoints needs a public one.",
    ),
    gateway: list[str] = _GATEWAY,
    base: str | None = typer.Option(None, help="This machine's copy of the base model."),
    device: str | None = typer.Option(None, help="cpu, cuda, mps (default: the recipe's)."),
    poll_seconds: float = typer.Option(1.0, help="How often to look at the chain when idle."),
    linger_seconds: float = typer.Option(
        60.0, help="Keep serving blobs this long after the task ends, for slower peers."
    ),
    attack: str = typer.Option(
        "none", help="Robustness experiments only: behave maliciously (sign_flip, noise, ...)."
    ),
    attack_strength: float = typer.Option(1.0, help="Strength of --attack."),
) -> None:
    """Take part in a task until it ends; killed and started again, it carries on."""
    from covey.flock.agent import Behaviour
    from covey.flock.network import JoinSettings, join_task

    quiet_libraries()
    _stop_on_sigterm()
    settings = JoinSettings(
        task=task, chain_url=chain_url, key_file=key_file, data=data, state=state, listen=listen,
        public_url=public_url, gateways=tuple(gateway), base=base, device=device,
        poll_s=poll_seconds, linger_s=linger_seconds,
        behaviour=Behaviour.from_attack(attack, attack_strength),
    )  # fmt: skip
    final = join_task(settings)
    console.print(f"task over; its global adapter: {final}")


@flock_app.command("status")
def status(
    task: str = typer.Argument(..., help="The task contract's address."),
    chain_url: str = _CHAIN_URL,
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """What the chain says about a task: members, rounds, verdicts, rewards and slashes."""
    from covey.flock.network import attach_task, connect, task_status

    chain = connect(chain_url, signer=False)
    facts = task_status(attach_task(chain, task))
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    console.print(
        f"task {facts['task']}: {facts['phase'].lower()}, round {facts['round']} of "
        f"{facts['rounds']}, pool {facts['pool']:.2f} tokens, bundle {facts['bundle']}"
    )
    console.print(_status_table(facts))


def _status_table(facts: dict[str, Any]) -> Table:
    table = Table(title="per round: roles, verdicts, rewards (+) and slashes (-)")
    for name in ("round", "outcome", "address", "role", "proposal / ballot", "tokens"):
        table.add_column(name)
    for r in facts["history"]:
        table.add_section()
        amounts: dict[str, float] = {}
        for entry in r["rewards"]:
            amounts[entry["address"]] = amounts.get(entry["address"], 0.0) + entry["amount"]
        for entry in r["slashes"]:
            amounts[entry["address"]] = amounts.get(entry["address"], 0.0) - entry["amount"]
        for p in r["proposals"]:
            verdict = "accepted" if p["accepted"] else "rejected" if p["rejected"] else "-"
            shown = f"{p['cid'] or 'none'} {verdict}"
            row = [r["round"], r["outcome"], p["address"], "proposer", shown]
            table.add_row(*map(str, row), f"{amounts.get(p['address'], 0.0):+.2f}")
        for v in r["votes"]:
            ballot = "".join("+-"[not a] for a in v["accepts"]) if v["revealed"] else "unrevealed"
            row = [r["round"], r["outcome"], v["address"], "voter", ballot]
            table.add_row(*map(str, row), f"{amounts.get(v['address'], 0.0):+.2f}")
    return table


@flock_app.command("fetch")
def fetch(
    task: str = typer.Argument(..., help="The task contract's address."),
    chain_url: str = _CHAIN_URL,
    gateway: list[str] = _GATEWAY,
    out: Path = typer.Option(..., help="Folder to write the adapter to (PEFT layout)."),
    round_: int | None = typer.Option(
        None, "--round", help="After this many rounds (default: all)."
    ),
    base: str | None = typer.Option(None, help="This machine's copy of the base model."),
    store: Path | None = typer.Option(
        None, help="Keep fetched blobs here (default: OUT.store beside OUT)."
    ),
) -> None:
    """Rebuild the task's global adapter from the chain and the blobs (every CID checked)."""
    from covey.flock.ledger import Blobs
    from covey.flock.network import attach_task, connect, fetch_adapter
    from covey.store.endpoints import check_gateway_url
    from covey.store.local import LocalStore

    quiet_libraries()
    chain = connect(chain_url, signer=False)
    flock_task = attach_task(chain, task)
    gateways = [check_gateway_url(g, "--gateway") for g in gateway]
    blobs = Blobs(LocalStore(store or out.with_name(out.name + ".store")), flock_task, gateways)
    folder, cid = fetch_adapter(flock_task, blobs, out, round_, base)
    console.print(f"{folder}: the global adapter {cid}")


@flock_app.command("devnet")
def devnet(
    recipe: Path | None = typer.Argument(None, help="TOML recipe; omitted: the defaults."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable)."),
    out: Path = typer.Option(Path("runs/flock-devnet"), help="Folder for every party's files."),
    block_time: int = typer.Option(1, help="anvil's seconds per block."),
    train_seconds: float = typer.Option(60.0, help="A proposer's training time to allow."),
    attack: str = typer.Option("none", help="Participant 0 behaves maliciously (sign_flip, ...)."),
    overwrite: bool = typer.Option(False, help="Delete OUT first."),
) -> None:
    """A whole FLock network on this machine: anvil, a task, one `covey flock join` process per
    client file of data.dir, each with its own key file, data and folder."""
    from covey.config import load_recipe
    from covey.flock.devnet import run_devnet

    quiet_libraries()
    _stop_on_sigterm()
    cfg = load_recipe(recipe, overrides)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CoveyError(f"{out} is not empty: pass --overwrite or choose another --out")
        import shutil

        shutil.rmtree(out)
    result = run_devnet(cfg, out, block_time_s=block_time, train_s=train_seconds, attack=attack)
    console.print(_status_table(result))
    console.print(f"final adapter: {out / 'final'}; every party's log: {out}/*/join.log")
