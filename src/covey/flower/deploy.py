"""Deployments: a SuperLink, SuperNodes (one per client), a whole federation on this machine,
and Flower's simulation runtime. Each process is a `Service` (see `processes`)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from covey.errors import ConfigError
from covey.flower.certs import TlsFiles, make_node_key
from covey.flower.control import FlowerRun, register_supernode, run_app, write_connection
from covey.flower.processes import (
    Service,
    flower_bin,
    flower_env,
    free_port,
    start_service,
    wait_healthy,
)
from covey.flower.settings import FlowerSettings, RunConfigValue

SUPERLINK_PORT = 8000
"""Flower's default SuperLink port: Fleet, Control and Runtime APIs share it (HTTP)."""
SUPERNODE_PORT = 9094
"""Flower's default SuperNode Runtime API port; each SuperNode on one machine needs its own."""
READY_SECONDS = 60.0
"""How long a SuperLink may take to answer its health check after it was started."""
_RAY_DIR_MAX = 40  # Ray's socket paths under its temp folder must stay within 107 bytes


def start_superlink(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = SUPERLINK_PORT,
    tls: TlsFiles | None = None,
    node_auth: bool = False,
    simulation: bool = False,
    cwd: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Service:
    """Start `flower-superlink` (state in `home/state.db`) and wait until it answers."""
    command = [
        flower_bin("flower-superlink"),
        "--host", host,
        "--port", str(port),
        "--database", str(home.resolve() / "state.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if tls is None:
        if node_auth:
            raise ConfigError("SuperNode authentication needs TLS: pass certificates")
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", str(tls.ca),
            "--ssl-certfile", str(tls.cert),
            "--ssl-keyfile", str(tls.key),
        ]  # fmt: skip
    if node_auth:
        command.append("--enable-supernode-auth")
    if simulation:
        command.append("--simulation")
    service = start_service("superlink", command, home, flower_env(home, extra_env), cwd=cwd)
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "http" if tls is None else "https"
    try:
        wait_healthy(
            service, f"{scheme}://{probe}:{port}/health", tls.ca if tls else None, READY_SECONDS
        )
    except BaseException:  # not ready, or interrupted while waiting: leave nothing running
        service.stop()
        raise
    return service


def start_supernode(
    home: Path,
    data_file: Path,
    *,
    client_index: int | None = None,
    superlink: str = f"127.0.0.1:{SUPERLINK_PORT}",
    port: int = SUPERNODE_PORT,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    model_base: str | None = None,
    device: str | None = None,
    name: str = "supernode",
    extra_env: Mapping[str, str] | None = None,
) -> Service:
    """Start `flower-supernode` for one client's data file (see client_app for node config)."""
    node_config = {"data-file": str(data_file.resolve())}
    if client_index is not None:
        node_config["client-index"] = str(client_index)
    if model_base:
        node_config["model-base"] = model_base
    if device:
        node_config["device"] = device
    command = [
        flower_bin("flower-supernode"),
        "--superlink", superlink,
        "--port", str(port),
        "--node-config", node_config_string(node_config),
    ]  # fmt: skip
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return start_service(name, command, home, flower_env(home, extra_env))


def node_config_string(values: Mapping[str, str]) -> str:
    """`--node-config` text: key=value pairs; strings quoted as TOML strings (paths with spaces
    work), integers left bare."""
    parts = []
    for key, value in values.items():
        parts.append(f"{key}={value}" if value.isdigit() else f"{key}={json.dumps(value)}")
    return " ".join(parts)


def client_files(data_dir: Path) -> list[Path]:
    """client_0.jsonl, client_1.jsonl, ... of a `covey data split` folder, by index."""
    files = sorted(data_dir.glob("client_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise ConfigError(f"data.dir {data_dir}: no client_<i>.jsonl files; run `covey data split`")
    return files


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on this machine (loopback), stopped together."""

    home: Path
    superlink: Service
    supernodes: list[Service]
    address: str

    def stop(self) -> None:
        for node in self.supernodes:
            node.stop()
        self.superlink.stop()


def start_local_federation(
    home: Path,
    files: Sequence[Path],
    *,
    tls: TlsFiles | None = None,
    node_auth: bool = False,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> LocalFederation:
    """A SuperLink on a free loopback port and one SuperNode per client file.

    With `node_auth`, each SuperNode gets a key pair registered on the SuperLink first.
    """
    port = free_port()
    address = f"127.0.0.1:{port}"
    link = start_superlink(
        home / "superlink", port=port, tls=tls, node_auth=node_auth, cwd=cwd, extra_env=extra_env
    )
    federation = LocalFederation(home=home, superlink=link, supernodes=[], address=address)
    try:
        write_connection(home / "cli", address, tls.ca if tls else None)
        for i, data_file in enumerate(files):
            key = None
            if node_auth:
                key, public = make_node_key(home / "keys", f"supernode-{i}")
                register_supernode(home / "cli", public)
            federation.supernodes.append(
                start_supernode(
                    home / f"supernode-{i}",
                    data_file,
                    superlink=address,
                    port=free_port(),
                    root_certificates=tls.ca if tls else None,
                    auth_key=key,
                    name=f"supernode-{i}",
                    extra_env=extra_env,
                )
            )
    except BaseException:
        federation.stop()
        raise
    return federation


@contextlib.contextmanager
def ray_tempdir() -> Iterator[Path]:
    """A new folder for Ray's files, removed afterwards.

    `mkdtemp` makes it owner-only (0700) under an unpredictable name, so no other user can plant
    or read it in the shared /tmp; /tmp rather than a long TMPDIR keeps Ray's socket paths short.
    """
    parent = tempfile.gettempdir()
    if len(parent) + len("/covey-ray-12345678") > _RAY_DIR_MAX:
        parent = "/tmp"
    folder = Path(tempfile.mkdtemp(prefix="covey-ray-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def simulate(
    home: Path,
    settings: FlowerSettings,
    nodes: int,
    *,
    cpus_per_client: int = 1,
    timeout: float | None = None,
    echo: bool = False,
    extra_env: Mapping[str, str] | None = None,
    services: list[Service] | None = None,
) -> FlowerRun:
    """Run the app in Flower's simulation runtime: a simulation SuperLink of our own (stopped at
    the end), `nodes` virtual SuperNodes (partition i = client i), Ray's files in a `ray_tempdir`.

    `services`, when given, receives the SuperLink (for callers that check the cleanup).
    """
    port = free_port()
    with ray_tempdir() as ray:
        env = {**(extra_env or {}), "RAY_TMPDIR": str(ray)}
        link = start_superlink(
            home / "superlink", port=port, simulation=True, cwd=Path.cwd(), extra_env=env
        )
        if services is not None:
            services.append(link)
        try:
            write_connection(home / "cli", f"127.0.0.1:{port}")
            federation: dict[str, RunConfigValue] = {
                "num-supernodes": nodes,
                "client-resources-num-cpus": cpus_per_client,
                "init-args-logging-level": "ERROR",
            }
            return run_app(
                home / "cli", settings, federation_config=federation, timeout=timeout, echo=echo
            )
        finally:
            link.stop()
