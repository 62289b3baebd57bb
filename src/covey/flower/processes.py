"""Flower's processes as Covey starts them: their environment, logs, readiness and stopping.

Every Flower process is started in its own process group, its output in a log file, and
stopped by that group id and by the pids of its descendants (Flower's SuperLink starts its
SuperExec, and with it the ServerApp, in sessions of their own), so nothing is left running.

Every process gets `flower_env`: `FLWR_HOME` (Flower's state, FABs and config) under a folder
we choose; runtime dependency installation off (it would install the app's dependencies anew,
torch included); no update check or telemetry (no network); no progress bars or the library
FutureWarning that would fill the logs; and none of Covey's secrets (`COVEY_PRIVATE_KEY`,
`COVEY_SERVE_AUTH`), which no Flower process needs.

What Covey echoes from these logs is plain text unless it goes to a terminal: Flower colours
its log levels unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from covey.console import python_warnings
from covey.envvars import SECRET_ENV_NAMES
from covey.errors import CoveyError

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars (tqdm)
    "PYTHONWARNINGS": python_warnings(),  # the library warnings a command hides
}
"""What keeps library noise out of the logs of Flower's processes (none writes to a terminal)."""
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def flower_bin(name: str) -> str:
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


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process Covey starts (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES}
    warnings = [w for w in (env.get("PYTHONWARNINGS", ""), QUIET_ENV["PYTHONWARNINGS"]) if w]
    env.update(
        {
            **QUIET_ENV,
            "PYTHONWARNINGS": ",".join(warnings),
            "FLWR_HOME": str(home.resolve()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
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

    Stopping signals the group and also every descendant seen just before, each by pid.
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
        """The end of the process's log as plain text, for error messages."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(plain_text(text).splitlines()[-lines:])


def start_service(
    name: str, command: list[str], home: Path, env: Mapping[str, str], cwd: Path | None = None
) -> Service:
    """Start `command` in a new process group, its output appended to `home/<name>.log`."""
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


def wait_healthy(service: Service, url: str, ca: Path | None, timeout: float) -> None:
    """Poll `url` until it answers 200; raise if the service exits or `timeout` passes."""
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
    raise CoveyError(f"{service.name} not ready after {timeout:g} s; its log:\n{service.tail()}")


def free_port() -> int:
    """A TCP port free on loopback right now (for tests and `covey flower local`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plain_text(text: str) -> str:
    """`text` without ANSI escape sequences (Flower colours its log levels unconditionally)."""
    return _ANSI.sub("", text)


def echo_new(log: Path, shown: int, out: TextIO | None = None, final: bool = False) -> int:
    """Write the whole lines of `log` after byte `shown` to `out` (stdout); return the new mark.

    Plain text unless `out` is a terminal. `final` also writes an unfinished last line.
    """
    out = sys.stdout if out is None else out
    data = log.read_bytes()
    end = len(data) if final else data.rfind(b"\n") + 1
    if end > shown:
        text = data[shown:end].decode("utf-8", errors="replace")
        out.write(text if out.isatty() else plain_text(text))
        out.flush()
    return max(end, shown)
