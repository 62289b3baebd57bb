"""`covey flower`: Covey's commands for Flower.

  certs / node-key       TLS certificates for the SuperLink, key pairs for SuperNode auth
  superlink / supernode  long-running Flower processes (one per machine)
  register               allow a SuperNode's public key on a SuperLink started with --node-auth
  run                    submit a recipe to a SuperLink and wait for it
  local                  a whole deployment on this machine: SuperLink + one SuperNode per client
  simulate               Flower's simulation runtime (Ray) on this machine

Run-config options take their defaults and help from `FlowerSettings`. Flower itself is
imported only by the processes these commands start, so the `covey` CLI loads without it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from covey.errors import ConfigError, CoveyError
from covey.flower import settings as flower_settings
from covey.flower.certs import TlsFiles, make_certificates, make_node_key
from covey.flower.control import FlowerRun, register_supernode, run_app, write_connection
from covey.flower.deploy import (
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    client_files,
    simulate,
    start_local_federation,
    start_superlink,
    start_supernode,
)
from covey.flower.processes import Service, echo_new
from covey.flower.settings import FlowerSettings

flower_app = typer.Typer(
    help="Federated runs on Flower: a SuperLink, SuperNodes (one per client) and `flwr run`.",
    no_args_is_help=True,
)


def _setting(name: str) -> Any:
    """The option for the FlowerSettings field `name`, with its default and help."""
    return typer.Option(flower_settings.default(name), help=flower_settings.help_text(name))


_RECIPE = typer.Argument(None, help="TOML recipe; omitted: the built-in defaults.")
_SET = typer.Option([], "--set", help="Override one setting: section.key=value (repeatable).")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt, so that the processes a command started
    are stopped on the way out. Both are handled explicitly: a shell starts background jobs
    with SIGINT ignored, and a plain SIGTERM would leave Flower's process groups running."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _foreground(service: Service) -> None:
    """Follow a service's log until it exits, Ctrl-C or SIGTERM, then stop it (and its group)."""
    shown = 0
    try:
        while service.alive():
            shown = echo_new(service.log, shown)
            time.sleep(0.5)
        echo_new(service.log, shown, final=True)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    if service.process.returncode not in (0, -signal.SIGTERM, None):
        raise typer.Exit(1)


@flower_app.command("certs")
def certs_command(
    out: Path = typer.Argument(..., help="Folder for ca.crt, server.pem and server.key."),
    host: list[str] = typer.Option(
        [], "--host", help="Name or IP SuperNodes use to reach the SuperLink (repeatable)."
    ),
) -> None:
    """Make a private CA and a SuperLink TLS certificate (also valid for 127.0.0.1, localhost)."""
    hosts = list(dict.fromkeys([*host, "127.0.0.1", "localhost"]))
    files = make_certificates(out, hosts)
    typer.echo(f"CA: {files.ca} (give it to every SuperNode)\ncertificate: {files.cert}")
    typer.echo(f"key: {files.key} (stays on the SuperLink)\nvalid for: {', '.join(hosts)}")


@flower_app.command("node-key")
def node_key_command(
    out: Path = typer.Argument(..., help="Folder for the key pair."),
    name: str = typer.Option("supernode", help="File name of the private key (.pub added)."),
) -> None:
    """Make a SuperNode's key pair for SuperNode authentication."""
    private, public = make_node_key(out, name)
    typer.echo(f"private key: {private} (stays on the SuperNode)\npublic key: {public} "
               "(register it on the SuperLink: covey flower register)")  # fmt: skip


@flower_app.command("superlink")
def superlink_command(
    home: Path = typer.Option(Path("runs/flower/superlink"), help="Flower state (FLWR_HOME)."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; 0.0.0.0 (all) for SuperNodes on other machines."
    ),
    port: int = typer.Option(SUPERLINK_PORT, help="Port of the Fleet, Control and Runtime APIs."),
    certs: Path | None = typer.Option(
        None, help="Folder from `covey flower certs` (ca.crt, server.pem, server.key)."
    ),
    insecure: bool = typer.Option(False, help="No TLS (only on a trusted network)."),
    node_auth: bool = typer.Option(False, help="Only registered SuperNodes may connect."),
) -> None:
    """Run a SuperLink in the foreground (Ctrl-C stops it with its ServerApps)."""
    _stop_on_signals()
    if (certs is None) == (not insecure):
        raise ConfigError("pass either --certs DIR or --insecure")
    tls = None if certs is None else TlsFiles.in_folder(certs)
    service = start_superlink(
        home, host=host, port=port, tls=tls, node_auth=node_auth, cwd=Path.cwd()
    )
    typer.echo(f"SuperLink on {host}:{port} (pid {service.pid}, state {home}/)")
    _foreground(service)


@flower_app.command("supernode")
def supernode_command(
    data_file: Path = typer.Argument(..., help="This client's client_<i>.jsonl."),
    client_index: int | None = typer.Option(
        None, help="The client's index (default: from the file name client_<i>.jsonl)."
    ),
    superlink: str = typer.Option(f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port."),
    root_cert: Path | None = typer.Option(None, help="The SuperLink's CA certificate (ca.crt)."),
    insecure: bool = typer.Option(False, help="No TLS (only on a trusted network)."),
    auth_key: Path | None = typer.Option(None, help="Private key from `covey flower node-key`."),
    model_base: str | None = typer.Option(None, help="This machine's path of the base model."),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N for this node."),
    port: int = typer.Option(SUPERNODE_PORT, help="Local Runtime API port (one per SuperNode)."),
    home: Path = typer.Option(Path("runs/flower/supernode"), help="Flower state (FLWR_HOME)."),
) -> None:
    """Run a SuperNode for one client in the foreground (Ctrl-C stops it)."""
    _stop_on_signals()
    if (root_cert is None) == (not insecure):
        raise ConfigError("pass either --root-cert ca.crt or --insecure")
    if not data_file.is_file():
        raise ConfigError(f"{data_file}: no such file")
    service = start_supernode(
        home, data_file, client_index=client_index, superlink=superlink, port=port,
        root_certificates=root_cert, auth_key=auth_key, model_base=model_base, device=device,
    )  # fmt: skip
    typer.echo(f"SuperNode for {data_file} -> {superlink} (pid {service.pid})")
    _foreground(service)


@flower_app.command("register")
def register_command(
    public_key: Path = typer.Argument(..., help="A SuperNode's public key (.pub)."),
    superlink: str = typer.Option(f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port."),
    root_cert: Path | None = typer.Option(None, help="The SuperLink's CA certificate."),
    home: Path = typer.Option(Path("runs/flower/cli"), help="Flower CLI state (FLWR_HOME)."),
) -> None:
    """Allow a SuperNode on a SuperLink started with --node-auth."""
    write_connection(home, superlink, root_cert)
    register_supernode(home, public_key)
    typer.echo(f"registered {public_key} on {superlink}")


def _report(result: FlowerRun, out: str) -> None:
    if not result.ok:
        raise CoveyError(
            f"Flower run {result.run_id} ended {result.status}: {result.details} "
            f"(log: {result.log})"
        )
    typer.echo(f"run {result.run_id} {result.status}; final adapter: {out}/final/")


def recipe_location(recipe: Path | None) -> str:
    """The run config's `recipe`: "" for the defaults, an absolute path for a recipe that exists
    here (the SuperLink runs on this machine or shares its files), else the path as given, to be
    read on the SuperLink's machine."""
    if recipe is None:
        return ""
    return str(recipe.resolve()) if recipe.is_file() else str(recipe)


@flower_app.command("run")
def run_command(
    recipe: Path | None = typer.Argument(
        None, help="TOML recipe, a path on the SuperLink's machine; omitted: the defaults."
    ),
    overrides: list[str] = _SET,
    superlink: str = typer.Option(f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port."),
    root_cert: Path | None = typer.Option(None, help="The SuperLink's CA certificate."),
    insecure: bool = typer.Option(False, help="No TLS."),
    wire_dtype: str = _setting("wire_dtype"),
    min_nodes: int = _setting("min_nodes"),
    node_wait: float = _setting("node_wait"),
    round_timeout: float = _setting("round_timeout"),
    resume: bool = _setting("resume"),
    home: Path = typer.Option(Path("runs/flower/cli"), help="Flower CLI state (FLWR_HOME)."),
) -> None:
    """Run a recipe on a running SuperLink and wait for it (paths are read on the SuperLink)."""
    _stop_on_signals()
    if (root_cert is None) == (not insecure):
        raise ConfigError("pass either --root-cert ca.crt or --insecure")
    from covey.config import load_recipe

    settings = FlowerSettings(
        recipe=recipe_location(recipe), overrides=list(overrides), wire_dtype=wire_dtype,
        min_nodes=min_nodes, node_wait=node_wait, round_timeout=round_timeout, resume=resume,
    )  # fmt: skip
    out = "run.out on the SuperLink machine"
    if recipe is None or recipe.is_file():  # else the recipe lives only on the SuperLink
        out = load_recipe(recipe, overrides).run.out  # fails early on a bad recipe
    write_connection(home, superlink, root_cert)
    _report(run_app(home, settings, echo=True), out)


def absolute_overrides(recipe: Path | None, overrides: Sequence[str]) -> list[str]:
    """`overrides` plus data.dir, run.out (and a local model.base) made absolute here.

    Flower runs the ServerApp and ClientApps in other processes and folders; absolute paths
    mean the same files there as for `covey train` run here.
    """
    from covey.config import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    extra = [
        f"data.dir={json.dumps(str(Path(cfg.data.dir).resolve()))}",
        f"run.out={json.dumps(str(Path(cfg.run.out).resolve()))}",
    ]
    if Path(cfg.model.base).exists():
        extra.append(f"model.base={json.dumps(str(Path(cfg.model.base).resolve()))}")
    return [*overrides, *extra]


def _on_this_machine(
    recipe: Path | None, overrides: list[str]
) -> tuple[list[str], list[Path], Path, str]:
    """What `local` and `simulate` need: absolute overrides, the client files of data.dir,
    Flower's state folder (`<run.out>/flower`) and run.out."""
    from covey.config import load_recipe

    sets = absolute_overrides(recipe, overrides)
    cfg = load_recipe(recipe, sets)
    return sets, client_files(Path(cfg.data.dir)), Path(cfg.run.out) / "flower", cfg.run.out


@flower_app.command("local")
def local_command(
    recipe: Path | None = _RECIPE,
    overrides: list[str] = _SET,
    wire_dtype: str = _setting("wire_dtype"),
    tls: bool = typer.Option(True, help="TLS with certificates made for this run."),
    round_timeout: float = _setting("round_timeout"),
) -> None:
    """A real deployment on this machine: SuperLink + one SuperNode per client file, then stop."""
    _stop_on_signals()
    sets, files, home, out = _on_this_machine(recipe, overrides)
    settings = FlowerSettings(
        recipe=recipe_location(recipe), overrides=sets, wire_dtype=wire_dtype,
        min_nodes=len(files), round_timeout=round_timeout,
    )  # fmt: skip
    certs = make_certificates(home / "certs") if tls else None
    # N ClientApps share this machine's cores: one torch thread pool each would oversubscribe
    threads = str(max(1, (os.cpu_count() or 1) // len(files)))
    federation = start_local_federation(
        home, files, tls=certs, cwd=Path.cwd(), extra_env={"OMP_NUM_THREADS": threads}
    )
    try:
        typer.echo(f"SuperLink {federation.address}, {len(files)} SuperNodes; state in {home}/")
        _report(run_app(home / "cli", settings, echo=True), out)
    finally:
        federation.stop()


@flower_app.command("simulate")
def simulate_command(
    recipe: Path | None = _RECIPE,
    overrides: list[str] = _SET,
    wire_dtype: str = _setting("wire_dtype"),
    cpus_per_client: int = typer.Option(1, help="Ray CPUs per ClientApp (parallelism)."),
) -> None:
    """Flower's simulation runtime (Ray) on this machine, one virtual SuperNode per client."""
    _stop_on_signals()
    sets, files, home, out = _on_this_machine(recipe, overrides)
    settings = FlowerSettings(
        recipe=recipe_location(recipe), overrides=sets, wire_dtype=wire_dtype,
        min_nodes=len(files),
    )  # fmt: skip
    result = simulate(home, settings, len(files), cpus_per_client=cpus_per_client, echo=True)
    _report(result, out)
