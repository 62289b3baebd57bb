"""A FLock network with a hostile participant among honest `covey flock join` processes.

Five honest participants, each its own `covey flock join` process with its own key, data,
folder and gateway, and one hostile participant (tests/flock/hostile_peer.py, its own process)
that publishes header bombs as proposals, drips one byte every half second to anything else
asked of its gateway, holds a hundred silent connections open to every honest gateway, and from
round 1 on re-registers its endpoint as a URL that would make a naive fetcher call
`/admin/delete-all?confirm=yes` on a canary server. All on anvil, on loopback (the task allows
private addresses; their refusal on a public task is tests/store/test_endpoints.py's).

The task must end with every honest process alive and exiting 0, every honest participant
having committed and revealed every seed and ballot it owed in time: not one slash or eviction
of an honest participant. The hostile proposals are refused by every honest voter (rejected, or
undecided where the hostile participant was the other voter), the canary receives nothing, and
every honest participant derives the same global adapter. Skips without anvil (`make anvil`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from covey.config import load_recipe
from covey.data.split import SplitConfig, run_split
from covey.flock.chain import Chain
from covey.flock.devnet import fund_eth, join_command, new_key_file, participant_env
from covey.flock.devnode import find_anvil, run_anvil
from covey.flock.keys import load_private_key
from covey.flock.network import archive_rounds, attach_task, create_task, task_archive
from covey.flock.task import Phase
from covey.store.gateway import Gateway
from covey.store.local import LocalStore
from tests.conftest import dolly_records, write_records
from tests.flock.test_network import wait_for_line

pytestmark = [
    pytest.mark.chain,
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # registration and three rounds of block windows, under load
    pytest.mark.skipif(find_anvil() is None, reason="no anvil binary: run `make anvil`"),
]

HONEST = 5
HOSTILE_PEER = Path(__file__).with_name("hostile_peer.py")


def recipe(tiny_model_dir: Path, data: Path) -> Path:
    # harm_z so high that honest voters accept every well-formed update: an honest voter can
    # only be outvoted (and slashed) if something made it miss or misjudge one
    text = f"""
[model]
base = "{tiny_model_dir}"
[data]
dir = "{data}"
[lora]
r = 4
alpha = 8
dropout = 0.0
[prompt]
template = "chat"
cutoff_len = 128
[train]
max_steps = 2
batch_size = 8
micro_batch_size = 8
lr = 1e-2
[fed]
consensus = "flock"
rounds = 3
[flock]
proposers_per_round = 4
voters_per_round = 2
max_missed_rounds = 2
validation_examples = 4
harm_z = 1000.0
copy_cosine = 0.99  # the tiny model's honest updates are nearly parallel (0.95)
allow_private_endpoints = true
"""
    path = data.parent / "recipe.toml"
    path.write_text(text)
    return path


class Canary:
    """An HTTP server on loopback that records every request line it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                canary.requests.append(self.requestline)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_DELETE = do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Canary:
        Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_honest_participants_finish_unharmed_beside_a_hostile_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = write_records(tmp_path / "source.jsonl", dolly_records(per_category=10))
    data = tmp_path / "split"
    run_split(SplitConfig(input=str(source), out=data, clients=HONEST, min_size=8,
                          scheme="iid", test_per_category=2))  # fmt: skip
    cfg = load_recipe(recipe(tiny_model_dir, data), [])
    folders = [tmp_path / f"participant_{i}" for i in range(HONEST)]
    hostile_dir = tmp_path / "hostile"
    processes: list[subprocess.Popen[bytes]] = []
    attacker: subprocess.Popen[bytes] | None = None
    with run_anvil(block_time_s=1) as url, Canary() as canary:
        try:
            node = Chain.connect(url)
            creator = new_key_file(tmp_path / "creator" / "key")
            honest = [new_key_file(f / "key") for f in folders]
            hostile = new_key_file(hostile_dir / "key")
            fund_eth(node, [creator, *honest, hostile])
            chain = Chain.connect(url, key=load_private_key(tmp_path / "creator" / "key"))
            store = LocalStore(tmp_path / "creator" / "store")
            created = create_task(
                cfg, chain, store, participants=HONEST + 1, block_time_s=1, train_s=8, tx_s=3,
                registration_s=200,
                fund=dict.fromkeys([*honest, hostile], 2 * cfg.flock.stake),
            )  # fmt: skip
            with Gateway(store) as gateway:
                env = participant_env(HONEST + 1)
                for i, folder in enumerate(folders):
                    command = join_command(
                        created.task, url, folder, data / f"client_{i}.jsonl", gateway.url,
                        cfg, "none",
                    )  # fmt: skip
                    log = (folder / "join.log").open("ab")
                    processes.append(
                        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                    )
                hostile_command = [
                    sys.executable, str(HOSTILE_PEER), "--chain-url", url, "--task",
                    created.task, "--key-file", str(hostile_dir / "key"), "--canary-url",
                    canary.url, "--idle", "100", "--forge-from", "1",
                ]  # fmt: skip
                hostile_log = hostile_dir / "hostile.log"
                attacker = subprocess.Popen(
                    hostile_command, stdout=hostile_log.open("ab"), stderr=subprocess.STDOUT,
                    env=env | {"PYTHONPATH": str(Path(__file__).parents[2])},
                )  # fmt: skip
                wait_for_line(hostile_log, "joined", timeout_s=120)
                task = attach_task(node, created.task)
                archive = task_archive(task, store, created, cfg.fed)
                deadline = time.monotonic() + 1500
                while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                    archive_rounds(archive)  # the creator parses every accepted blob too
                    time.sleep(2)
                logs = {f.name: (f / "join.log").read_text(errors="replace")[-3000:]
                        for f in folders}  # fmt: skip
                logs["hostile"] = hostile_log.read_text(errors="replace")[-3000:]
                assert [p.poll() for p in processes] == [0] * HONEST, logs
                attacker.wait(timeout=120)
        finally:
            for p in [*processes, *([attacker] if attacker else [])]:
                if p.poll() is None:
                    p.kill()
                    p.wait()

        assert task.phase() == Phase.ENDED
        honest_set = {a.lower() for a in honest}
        # not one honest slash or eviction: every seed, proposal and ballot was on time and
        # on the side of the verdict
        slashed = [e for e in task.events("Slashed") if str(e["participant"]).lower() in honest_set]
        assert slashed == [], (slashed, logs)
        evicted = [e for e in task.events("Evicted") if str(e["participant"]).lower() in honest_set]
        assert evicted == [], evicted
        for r in range(task.params.rounds):
            for voter in task.voters_of(r):
                if voter.lower() in honest_set and task.proposal_count(r):
                    assert task.vote_of(r, voter).revealed, (r, voter, logs)
        # the bombs were refused by every honest voter: never accepted
        bombs = [
            (r, i)
            for r in range(task.params.rounds)
            for i, p in enumerate(task.proposers_of(r))
            if p == hostile and task.proposal_of(r, p).valid
        ]
        for r, i in bombs:
            assert not task.result(r).accepted >> i & 1, (r, logs)
        if not bombs:  # the draw left it out of every round's proposers (~4% of runs)
            print("the hostile participant was never drawn proposer: no bomb was voted on")
        assert "header bomb" in logs["hostile"] or not bombs
        # the forging endpoint reached nobody; the idle connections and drips delayed nobody
        assert canary.requests == [], canary.requests
        assert task.endpoint_of(hostile).startswith(canary.url)  # it did register it
        # every honest participant derived the same global adapter
        finals = {(f / "final" / "adapter_model.safetensors").read_bytes() for f in folders}
        assert len(finals) == 1
