"""A local anvil node (Foundry's development chain) for tests, benchmarks and demos.

`make anvil` installs npm's @foundry-rs/anvil under .tools/ (the binary lives in its platform
package); `find_anvil` also looks at COVEY_ANVIL and PATH. `run_anvil` starts it on a free
loopback port, waits until it answers JSON-RPC, yields the URL and stops it by its PID. Without
`block_time_s` anvil mines a block per transaction (like the embedded chain); with it, a block
every `block_time_s` seconds, as a real chain does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from covey.flock.chain import Chain, ChainError

REPO_ROOT = Path(__file__).resolve().parents[3]  # a source checkout: where `make anvil` installs


def find_anvil() -> str | None:
    """COVEY_ANVIL, else `anvil` on PATH, else the binary `make anvil` put under .tools/."""
    if os.environ.get("COVEY_ANVIL"):
        return os.environ["COVEY_ANVIL"]
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    installed = sorted(REPO_ROOT.glob(".tools/node_modules/@foundry-rs/anvil-*/bin/anvil"))
    return str(installed[0]) if installed else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_anvil(*, block_time_s: int | None = None, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run anvil on 127.0.0.1 for the duration of the block; yields its http URL."""
    binary = find_anvil()
    if binary is None:
        raise ChainError("no anvil binary: run `make anvil`, or set COVEY_ANVIL to one")
    port = _free_port()
    command = [binary, "--host", "127.0.0.1", "--port", str(port), "--silent"]
    if block_time_s is not None:
        command += ["--block-time", str(block_time_s)]
    node = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                Chain.connect(url, timeout=1)
                break
            except ChainError:
                if node.poll() is not None or time.monotonic() > deadline:
                    raise ChainError(f"anvil did not answer on port {port}") from None
                time.sleep(0.2)
        yield url
    finally:
        node.terminate()
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
