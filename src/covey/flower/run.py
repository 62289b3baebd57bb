"""Starting, running and stopping Flower for Covey: SuperLink, SuperNodes, runs, certificates.

Every Flower process is started here in its own process group and stopped by that id, so its
children (SuperExec, ServerApp, ClientApp) go with it. Every process gets `flower_env`:
`FLWR_HOME` (Flower's state, FABs and config) under a folder we choose, runtime dependency
installation off (it would install the app's dependencies anew, torch included), no update check
or telemetry (no network), and `RAY_TMPDIR` for simulations.

`flower_app` is the `covey flower` command group:
  certs / node-key       TLS certificates for the SuperLink, key pairs for SuperNode auth
  superlink / supernode  long-running Flower processes (one per machine)
  register               allow a SuperNode's public key on a SuperLink started with --node-auth
  run                    submit a recipe to a SuperLink and wait for it
  local                  a whole deployment on this machine: SuperLink + one SuperNode per client
  simulate               Flower's simulation runtime (Ray) on this machine
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import typer

from covey.errors import ConfigError, CoveyError

APP_DIR = Path(__file__).parent / "app"
"""The Flower App folder (its pyproject.toml names Covey's ServerApp and ClientApp)."""
SUPERLINK_PORT = 8000
"""Flower's default SuperLink port: Fleet, Control and Runtime APIs share it (HTTP)."""
SUPERNODE_PORT = 9094
"""Flower's default SuperNode Runtime API port; each SuperNode on one machine needs its own."""
CONNECTION = "covey"
"""Name of the SuperLink connection that Covey writes into FLWR_HOME/config.toml."""
_RAY_DIR_MAX = 40  # Ray's socket paths under its temp dir must stay within 107 bytes
_RUN_ID = re.compile(r"Successfully started run (\d+)")

RunConfigValue = bool | int | float | str


def _bin(name: str) -> str:
    """A Flower executable: next to this Python first (the virtualenv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise CoveyError(
            f"{name} not found: install Flower with `pip install 'covey[flower]'` "
            "(or `pip install 'flwr[simulation]>=1.41'`)"
        )
    return found


def ray_tmpdir(home: Path) -> Path:
    """Ray's temp folder: `<home>/ray`, or a short /tmp folder named after `home` when that path
    is too long for Ray's Unix sockets."""
    inside = home.resolve() / "ray"
    if len(str(inside)) <= _RAY_DIR_MAX:
        return inside
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"covey-ray-{digest}"


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process Covey starts (see the module docstring)."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home.resolve()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_TMPDIR": str(ray_tmpdir(home)),
            "PYTHONUNBUFFERED": "1",
            # SuperLink and SuperNode start flower-superexec, flwr-serverapp, ... by name
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    env.update(extra or {})
    return env


def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, process group, start time, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), int(fields[19]), fields[0])
    return table


def _tree(pid: int) -> dict[int, int]:
    """pid -> start time of `pid`'s descendants (Flower detaches some into new sessions)."""
    table = _proc_table()
    found: dict[int, int] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, start, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return found


@dataclass
class Service:
    """A Flower process we started, leader of its own process group.

    Stopping signals the group and also every descendant seen just before (Flower's SuperLink
    starts its SuperExec, and with it the ServerApp, in a session of their own), each by pid.
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    _log_file: IO[bytes]
    descendants: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group and the descendants, SIGKILL whatever is left after `timeout`."""
        if self.alive():
            self.descendants |= _tree(self.pid)
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal(signal.SIGKILL)
        self._log_file.close()

    def kill(self) -> None:
        """SIGKILL the group and its descendants at once: a crash, no cleanup."""
        self.descendants |= _tree(self.pid)
        self._signal(signal.SIGKILL)
        self.process.wait(30)

    def leftovers(self) -> list[int]:
        """Processes of this service still running: its group's members and the descendants
        seen at stop (same pid and start time), zombies excluded."""
        table = _proc_table()
        alive = []
        for pid, (_, group, start, state) in table.items():
            if state != "Z" and (group == self.pid or self.descendants.get(pid) == start):
                alive.append(pid)
        return alive

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
        table = _proc_table()
        for pid, start in self.descendants.items():
            if pid in table and table[pid][2] == start:  # not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def tail(self, lines: int = 40) -> str:
        """The end of the process's log, for error messages."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _start(
    name: str, command: list[str], home: Path, env: Mapping[str, str], cwd: Path | None = None
) -> Service:
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by Service.stop
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    return Service(name=name, process=process, log=log_path, _log_file=log_file)


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and the server certificate and key it signed (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(
    folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> TlsFiles:
    """A private CA and a SuperLink certificate for `hosts` (IPs or DNS names).

    SuperNodes and the `flwr` CLI trust `ca.crt`; the SuperLink serves `server.pem` with
    `server.key`. Keep 127.0.0.1/localhost in `hosts`: Flower's own processes reach the SuperLink
    there.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Covey Flower CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(ca=folder / "ca.crt", cert=folder / "server.pem", key=folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


def make_node_key(folder: Path, name: str = "supernode") -> tuple[Path, Path]:
    """An EC key pair (OpenSSH format) for SuperNode authentication: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def free_port() -> int:
    """A TCP port free on loopback right now (for tests and `covey flower local`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(service: Service, url: str, ca: Path | None, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise CoveyError(f"{service.name} exited; its log ({service.log}):\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    service.stop()
    raise CoveyError(f"{service.name} not ready after {timeout:g} s; its log:\n{service.tail()}")


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
    ready_timeout: float = 60.0,
) -> Service:
    """Start `flower-superlink` (state in `home/state.db`) and wait until it answers."""
    command = [
        _bin("flower-superlink"),
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
    service = _start("superlink", command, home, flower_env(home, extra_env), cwd=cwd)
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    scheme = "http" if tls is None else "https"
    _wait_healthy(
        service, f"{scheme}://{probe}:{port}/health", tls.ca if tls else None, ready_timeout
    )
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
        _bin("flower-supernode"),
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
    return _start(name, command, home, flower_env(home, extra_env))


def node_config_string(values: Mapping[str, str]) -> str:
    """`--node-config` text: key=value pairs; strings quoted as TOML strings (paths with spaces
    work), integers left bare."""
    parts = []
    for key, value in values.items():
        parts.append(f"{key}={value}" if value.isdigit() else f"{key}={json.dumps(value)}")
    return " ".join(parts)


def write_connection(
    home: Path, address: str, root_certificates: Path | None = None, name: str = CONNECTION
) -> str:
    """Write FLWR_HOME/config.toml with one SuperLink connection (the default); return its name."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def _flwr(home: Path, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def register_supernode(home: Path, public_key: Path, connection: str = CONNECTION) -> None:
    """Allow a SuperNode's public key on a SuperLink started with node authentication."""
    done = _flwr(home, ["supernode", "register", str(public_key), connection])
    if done.returncode != 0:
        raise CoveyError(f"flwr supernode register failed:\n{done.stdout}{done.stderr}")


def run_config(
    recipe: Path | str | None,
    overrides: Sequence[str] = (),
    *,
    wire_dtype: str = "float32",
    min_nodes: int = 2,
    node_wait: float = 300.0,
    round_timeout: float = 3600.0,
    resume: bool = False,
) -> dict[str, RunConfigValue]:
    """The Flower run config of a Covey recipe (keys as in the app's pyproject.toml).

    A recipe that exists here is passed as an absolute path (the SuperLink runs on this machine
    or shares its files); any other is passed as given, to be read on the SuperLink's machine.
    """
    where = "" if recipe is None else str(recipe)
    if recipe is not None and Path(recipe).is_file():
        where = str(Path(recipe).resolve())
    for item in overrides:
        if ";" in item:
            raise ConfigError(f"--set {item!r}: values may not contain ';' on Flower")
    return {
        "recipe": where,
        "set": "; ".join(overrides),
        "wire-dtype": wire_dtype,
        "min-nodes": min_nodes,
        "node-wait": float(node_wait),
        "round-timeout": float(round_timeout),
        "resume": resume,
    }


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


@dataclass
class RunResult:
    """How a Flower run ended."""

    run_id: int
    status: str
    """`finished:completed`, `finished:failed`, `finished:stopped`, ..."""
    details: str
    log: Path
    """The run's streamed log (ServerApp output, as `flwr log` shows it)."""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def run_app(
    home: Path,
    config: Mapping[str, RunConfigValue],
    *,
    connection: str = CONNECTION,
    federation_config: Mapping[str, RunConfigValue] | None = None,
    timeout: float | None = None,
    app_dir: Path = APP_DIR,
    echo: bool = False,
) -> RunResult:
    """Submit the Covey app with `config` (`flwr run --stream`) and wait until it finishes.

    On `timeout` (seconds) the run is stopped (`flwr stop`) and TimeoutError raised.
    """
    home.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config_file = home / f"run-config-{stamp}.toml"
    config_file.write_text(
        "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in config.items()),
        encoding="utf-8",
    )
    command = [_bin("flwr"), "run", str(app_dir), connection, "--run-config", str(config_file)]
    command.append("--stream")
    if federation_config:
        pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
        command += ["--federation-config", pairs]
    deadline = None if timeout is None else time.monotonic() + timeout
    stream = _start(f"run-{stamp}", command, home, flower_env(home))
    run_id: int | None = None
    shown = 0
    try:
        while stream.alive():
            if deadline is not None and time.monotonic() > deadline:
                break
            if run_id is None:
                match = _RUN_ID.search(stream.log.read_text(encoding="utf-8", errors="replace"))
                run_id = int(match.group(1)) if match else None
            if echo:
                shown = _echo_new(stream.log, shown)
            time.sleep(0.5)
        text = stream.log.read_text(encoding="utf-8", errors="replace")
        if echo:
            _echo_new(stream.log, shown)
        match = _RUN_ID.search(text)
        if match is None:
            raise CoveyError(f"flwr run did not start a run:\n{stream.tail()}")
        run_id = int(match.group(1))
        while True:  # the stream may end before the run's status is final
            status, details = run_status(home, run_id, connection)
            if status.startswith("finished"):
                return RunResult(run_id, status, details, stream.log)
            if deadline is not None and time.monotonic() > deadline:
                _flwr(home, ["stop", str(run_id), connection], timeout=60)
                raise TimeoutError(f"run {run_id} not finished after {timeout:g} s ({status})")
            time.sleep(2.0)
    finally:
        stream.stop()


def _echo_new(log: Path, shown: int) -> int:
    data = log.read_bytes()
    if len(data) > shown:
        sys.stdout.write(data[shown:].decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return len(data)


def _toml_value(value: RunConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def run_status(home: Path, run_id: int, connection: str = CONNECTION) -> tuple[str, str]:
    """(status, details) of a run, from `flwr ls --run-id`."""
    done = _flwr(home, ["ls", connection, "--run-id", str(run_id), "--format", "json"])
    try:
        runs = json.loads(done.stdout)["runs"]
        return str(runs[0]["status"]), str(runs[0].get("status-details", ""))
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", (done.stdout + done.stderr).strip()[-500:]


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


# --------------------------------------------------------------------------- `covey flower`

flower_app = typer.Typer(
    help="Federated runs on Flower: a SuperLink, SuperNodes (one per client) and `flwr run`.",
    no_args_is_help=True,
)

_RECIPE = typer.Argument(None, help="TOML recipe; omitted: the built-in defaults.")
_SET = typer.Option([], "--set", help="Override one setting: section.key=value (repeatable).")
_WIRE = typer.Option(
    "float32", help="Adapter dtype in transit: float32 (exact), float16, bfloat16."
)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _foreground(service: Service) -> None:
    """Follow a service's log until it exits, Ctrl-C or SIGTERM, then stop it (and its group).

    Both signals are handled explicitly: a shell starts background jobs with SIGINT ignored,
    and a plain SIGTERM would leave the service's own process group running.
    """
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    shown = 0
    try:
        while service.alive():
            shown = _echo_new(service.log, shown)
            time.sleep(0.5)
        _echo_new(service.log, shown)
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
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(SUPERLINK_PORT, help="Port of the Fleet, Control and Runtime APIs."),
    certs: Path | None = typer.Option(
        None, help="Folder from `covey flower certs` (ca.crt, server.pem, server.key)."
    ),
    insecure: bool = typer.Option(False, help="No TLS (only on a trusted network)."),
    node_auth: bool = typer.Option(False, help="Only registered SuperNodes may connect."),
) -> None:
    """Run a SuperLink in the foreground (Ctrl-C stops it with its ServerApps)."""
    if (certs is None) == (not insecure):
        raise ConfigError("pass either --certs DIR or --insecure")
    tls = (
        None
        if certs is None
        else TlsFiles(certs / "ca.crt", certs / "server.pem", certs / "server.key")
    )
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


def _report(result: RunResult, out: str) -> None:
    if not result.ok:
        raise CoveyError(
            f"Flower run {result.run_id} ended {result.status}: {result.details} "
            f"(log: {result.log})"
        )
    typer.echo(f"run {result.run_id} {result.status}; final adapter: {out}/final/")


@flower_app.command("run")
def run_command(
    recipe: Path | None = typer.Argument(
        None, help="TOML recipe, a path on the SuperLink's machine; omitted: the defaults."
    ),
    overrides: list[str] = _SET,
    superlink: str = typer.Option(f"127.0.0.1:{SUPERLINK_PORT}", help="SuperLink host:port."),
    root_cert: Path | None = typer.Option(None, help="The SuperLink's CA certificate."),
    insecure: bool = typer.Option(False, help="No TLS."),
    wire_dtype: str = _WIRE,
    min_nodes: int = typer.Option(2, help="Clients that must be connected before each round."),
    node_wait: float = typer.Option(300.0, help="Seconds to wait for --min-nodes clients."),
    round_timeout: float = typer.Option(3600.0, help="Seconds a round waits for replies."),
    resume: bool = typer.Option(False, help="Continue run.out from its last complete round."),
    home: Path = typer.Option(Path("runs/flower/cli"), help="Flower CLI state (FLWR_HOME)."),
) -> None:
    """Run a recipe on a running SuperLink and wait for it (paths are read on the SuperLink)."""
    if (root_cert is None) == (not insecure):
        raise ConfigError("pass either --root-cert ca.crt or --insecure")
    from covey.config import load_recipe

    out = "run.out on the SuperLink machine"
    if recipe is None or recipe.is_file():  # else the recipe lives only on the SuperLink
        out = load_recipe(recipe, overrides).run.out  # fails early on a bad recipe
    write_connection(home, superlink, root_cert)
    config = run_config(
        recipe, overrides, wire_dtype=wire_dtype, min_nodes=min_nodes, node_wait=node_wait,
        round_timeout=round_timeout, resume=resume,
    )  # fmt: skip
    _report(run_app(home, config, echo=True), out)


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
    wire_dtype: str = _WIRE,
    tls: bool = typer.Option(True, help="TLS with certificates made for this run."),
    round_timeout: float = typer.Option(3600.0, help="Seconds a round waits for replies."),
) -> None:
    """A real deployment on this machine: SuperLink + one SuperNode per client file, then stop."""
    sets, files, home, out = _on_this_machine(recipe, overrides)
    certs = make_certificates(home / "certs") if tls else None
    # N ClientApps share this machine's cores: one torch thread pool each would oversubscribe
    threads = str(max(1, (os.cpu_count() or 1) // len(files)))
    federation = start_local_federation(
        home, files, tls=certs, cwd=Path.cwd(), extra_env={"OMP_NUM_THREADS": threads}
    )
    try:
        config = run_config(
            recipe, sets, wire_dtype=wire_dtype, min_nodes=len(files),
            round_timeout=round_timeout,
        )  # fmt: skip
        typer.echo(f"SuperLink {federation.address}, {len(files)} SuperNodes; state in {home}/")
        _report(run_app(home / "cli", config, echo=True), out)
    finally:
        federation.stop()


@flower_app.command("simulate")
def simulate_command(
    recipe: Path | None = _RECIPE,
    overrides: list[str] = _SET,
    wire_dtype: str = _WIRE,
    cpus_per_client: int = typer.Option(1, help="Ray CPUs per ClientApp (parallelism)."),
) -> None:
    """Flower's simulation runtime (Ray) on this machine, one virtual SuperNode per client."""
    sets, files, home, out = _on_this_machine(recipe, overrides)
    result = simulate(home, run_config(recipe, sets, wire_dtype=wire_dtype, min_nodes=len(files)),
                      len(files), cpus_per_client=cpus_per_client, echo=True)  # fmt: skip
    _report(result, out)


def simulate(
    home: Path,
    config: Mapping[str, RunConfigValue],
    nodes: int,
    *,
    cpus_per_client: int = 1,
    timeout: float | None = None,
    echo: bool = False,
    extra_env: Mapping[str, str] | None = None,
    services: list[Service] | None = None,
) -> RunResult:
    """Run the app in Flower's simulation runtime: a simulation SuperLink of our own (stopped at
    the end), `nodes` virtual SuperNodes (partition i = client i), Ray's files in `ray_tmpdir`.

    `services`, when given, receives the SuperLink (for callers that check the cleanup).
    """
    port = free_port()
    link = start_superlink(
        home / "superlink", port=port, simulation=True, cwd=Path.cwd(), extra_env=extra_env
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
            home / "cli", config, federation_config=federation, timeout=timeout, echo=echo
        )
    finally:
        link.stop()
        ray_dir = ray_tmpdir(home / "superlink")
        if not ray_dir.is_relative_to(home.resolve()):
            shutil.rmtree(ray_dir, ignore_errors=True)
