"""Talking to a SuperLink through Flower's `flwr` CLI: the connection, runs, SuperNode keys.

`flwr` reads its SuperLink connections from `FLWR_HOME/config.toml`; `write_connection` writes
one (named `covey`). `run_app` submits Covey's Flower App with a run config and waits for the
run to end; `register_supernode` allows a SuperNode's public key.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from covey.errors import CoveyError
from covey.flower.processes import echo_new, flower_bin, flower_env, start_service
from covey.flower.settings import FlowerSettings, RunConfigValue

APP_DIR = Path(__file__).parent / "app"
"""The Flower App folder (its pyproject.toml names Covey's ServerApp and ClientApp)."""
CONNECTION = "covey"
"""Name of the SuperLink connection that Covey writes into FLWR_HOME/config.toml."""
_RUN_ID = re.compile(r"Successfully started run (\d+)")


def write_connection(home: Path, address: str, root_certificates: Path | None = None) -> None:
    """Write FLWR_HOME/config.toml with one SuperLink connection, `CONNECTION` (the default)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {json.dumps(CONNECTION)}", "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _flwr(home: Path, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [flower_bin("flwr"), *args],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def register_supernode(home: Path, public_key: Path) -> None:
    """Allow a SuperNode's public key on a SuperLink started with node authentication."""
    done = _flwr(home, ["supernode", "register", str(public_key), CONNECTION])
    if done.returncode != 0:
        raise CoveyError(f"flwr supernode register failed:\n{done.stdout}{done.stderr}")


@dataclass
class FlowerRun:
    """How a run on Flower ended."""

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
    settings: FlowerSettings,
    *,
    federation_config: Mapping[str, RunConfigValue] | None = None,
    timeout: float | None = None,
    echo: bool = False,
) -> FlowerRun:
    """Submit the Covey app with `settings` (`flwr run --stream`) and wait until it finishes.

    On `timeout` (seconds) the run is stopped (`flwr stop`) and TimeoutError raised.
    """
    home.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config_file = home / f"run-config-{stamp}.toml"
    config_file.write_text(
        "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in settings.run_config().items()),
        encoding="utf-8",
    )
    command = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config"]
    command += [str(config_file), "--stream"]
    if federation_config:
        pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
        command += ["--federation-config", pairs]
    deadline = None if timeout is None else time.monotonic() + timeout
    stream = start_service(f"run-{stamp}", command, home, flower_env(home))
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
                shown = echo_new(stream.log, shown)
            time.sleep(0.5)
        text = stream.log.read_text(encoding="utf-8", errors="replace")
        if echo:
            echo_new(stream.log, shown, final=True)
        match = _RUN_ID.search(text)
        if match is None:
            raise CoveyError(f"flwr run did not start a run:\n{stream.tail()}")
        run_id = int(match.group(1))
        while True:  # the stream may end before the run's status is final
            status, details = run_status(home, run_id)
            if status.startswith("finished"):
                return FlowerRun(run_id, status, details, stream.log)
            if deadline is not None and time.monotonic() > deadline:
                _flwr(home, ["stop", str(run_id), CONNECTION], timeout=60)
                raise TimeoutError(f"run {run_id} not finished after {timeout:g} s ({status})")
            time.sleep(2.0)
    finally:
        stream.stop()


def _toml_value(value: RunConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def run_status(home: Path, run_id: int) -> tuple[str, str]:
    """(status, details) of a run, from `flwr ls --run-id`."""
    done = _flwr(home, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
    try:
        runs = json.loads(done.stdout)["runs"]
        return str(runs[0]["status"]), str(runs[0].get("status-details", ""))
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", (done.stdout + done.stderr).strip()[-500:]
