"""FLock as a network: one `covey flock join` process per participant on a real node (anvil).

Each participant is a separate OS process with its own key file, data file, folder and HTTP
gateway; they share only the chain and HTTP. One of them free-rides (proposes the global adapter
back without training: rejected by any voter, whatever the model); one is killed with SIGKILL in
round 0 and started again with the same command. The task must end with the free rider's
proposals voted down and slashed, the restarted participant carrying on from its folder (its
committed seed still there), every reward and slash following the contract's rules, tokens
conserved, and every participant, and an outsider's `fetch`, holding the same global adapter.
The network is `covey flock devnet`'s own (`covey.flock.devnet.Devnet`). Skips without anvil
(`make anvil`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covey.config import load_recipe
from covey.data.split import SplitConfig, run_split
from covey.errors import CoveyError
from covey.flock.commitments import seed_commitment
from covey.flock.devnet import Devnet
from covey.flock.devnode import find_anvil
from covey.flock.task import Phase, SlashReason
from tests.conftest import dolly_records, write_records

pytestmark = [
    pytest.mark.chain,
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # registration and three rounds of block windows, under load
    pytest.mark.skipif(find_anvil() is None, reason="no anvil binary: run `make anvil`"),
]

PARTICIPANTS = 4
ATTACKER, RESTARTED = 0, 1
RULED = (SlashReason.PROPOSAL_REJECTED,)
"""Slashes of slash_pct% (a verdict); the other reasons are missed duties (no_show_pct%)."""


def recipe(tiny_model_dir: Path, data: Path) -> Path:
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
epochs = 1
max_steps = 4
batch_size = 8
micro_batch_size = 8
lr = 3e-2
[fed]
consensus = "flock"
rounds = 3
[flock]
proposers_per_round = 2
voters_per_round = 1
max_missed_rounds = 3
validation_examples = 4
harm_z = 0.0
allow_private_endpoints = true
copy_cosine = 0.99  # the tiny model's honest updates are nearly parallel
"""
    path = data.parent / "recipe.toml"
    path.write_text(text)
    return path


def wait_for_line(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{log} never said {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


def test_participants_in_separate_processes_finish_a_task_on_anvil(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = write_records(tmp_path / "source.jsonl", dolly_records(per_category=10))
    data = tmp_path / "split"
    run_split(SplitConfig(input=str(source), out=data, clients=PARTICIPANTS, min_size=8,
                          scheme="iid", test_per_category=2))  # fmt: skip
    cfg = load_recipe(recipe(tiny_model_dir, data), [])
    out = tmp_path / "devnet"
    # `covey flock devnet`'s own code: anvil, keys, funding, the task, one join process each
    with Devnet(
        cfg, out, block_time_s=1, train_s=8, tx_s=3, registration_s=200,
        attacks={ATTACKER: "free_rider"},
    ) as net:  # fmt: skip
        folders, addresses, task = net.folders, net.addresses, net.task
        assert all(os.stat(f / "key").st_mode & 0o077 == 0 for f in folders)  # owner-only
        log = net.log_path(RESTARTED)
        wait_for_line(log, "round 0: committed a seed", timeout_s=400)
        net.kill(RESTARTED)
        with log.open("ab") as lines:
            lines.write(b"--- killed with SIGKILL, started again ---\n")
        net.start(RESTARTED)
        try:
            net.wait(timeout_s=900)  # every process exits 0, the restarted one included
        except CoveyError as e:
            tails = [
                f"{f.name}: {(f / 'join.log').read_text(errors='replace')[-2500:]}" for f in folders
            ]
            raise AssertionError("\n".join([str(e), *tails])) from e
        status = net.finish()

        assert task.phase() == Phase.ENDED
        # the attacker's proposals are voted down and slashed (2 of 4 propose each round:
        # the draw, which mixes in block hashes, leaves it out of all 3 rounds in ~1 of 8 runs;
        # tests/flock/test_protocol.py checks the same deterministically)
        attacked = [
            p for r in status["history"] for p in r["proposals"]
            if p["address"] == addresses[ATTACKER]
        ]  # fmt: skip
        assert all(p["rejected"] and not p["accepted"] for p in attacked), status["history"]
        honest = [
            p for r in status["history"] for p in r["proposals"]
            if p["address"] != addresses[ATTACKER]
        ]  # fmt: skip
        assert any(p["accepted"] for p in honest), status["history"]
        # every slash follows the contract's documented rule, replayed from the events
        params = task.params
        stakes = dict.fromkeys(addresses, params.stake)
        rejected_slashes = 0
        for event in task.events("Slashed"):
            who, reason = str(event["participant"]), SlashReason(int(event["reason"]))
            if reason == SlashReason.LOSING_VOTE:  # the share of verdicts it got wrong
                assert event["amount"] <= stakes[who] * params.slash_pct // 100
            else:
                pct = params.slash_pct if reason in RULED else params.no_show_pct
                assert event["amount"] == stakes[who] * pct // 100, (event, reason)
            rejected_slashes += reason == SlashReason.PROPOSAL_REJECTED
            stakes[who] -= event["amount"]
        assert rejected_slashes == len(attacked)
        # tokens are conserved: whatever is not in a wallet is in the task's pool (the
        # creator's to reclaim) or burned there
        token = task.token
        holders = [net.created.task, net.chain.default_account, *addresses]
        assert sum(token.balance_of(h) for h in holders) == token.call("totalSupply")
        assert token.balance_of(net.created.task) == task.pool() + task.burned()
        # the restarted participant's seed was on disk before its commitment went out
        saved = json.loads((folders[RESTARTED] / "state.json").read_text())
        seed = bytes.fromhex(saved["rounds"]["0"]["seed"])
        on_chain, _ = task.seed_status(0, addresses[RESTARTED])
        assert on_chain == seed_commitment(seed, addresses[RESTARTED])
        # ...and it carried on: it acted in a later round and withdrew at the end
        _, after = log.read_text().split("started again ---")
        assert re.search(r"round [12]: (committed|revealed)", after), after[-3000:]
        assert "withdrew its stake" in after, after[-3000:]
        # everyone withdrew: no stake or credit is left in the task
        assert all(b["stake"] == 0 and b["unclaimed"] == 0 for b in status["balances"])
        # every participant derived the same global adapter bytes, and so did devnet's outsider
        # `fetch` (the bundle names the creator's model folder: the outsider passes its own copy)
        finals = {(f / "final" / "adapter_model.safetensors").read_bytes() for f in folders}
        assert len(finals) == 1
        assert (out / "final" / "adapter_model.safetensors").read_bytes() in finals
        meta = json.loads((folders[0] / "final" / "covey-flock.json").read_text())
        assert meta["cid"] == net.final_cid
        assert json.loads((out / "status.json").read_text())["phase"] == "ENDED"
        # and the CLI tells the same story from the chain alone
        shown = subprocess.run(
            [sys.executable, "-m", "covey", "flock", "status", net.created.task,
             "--chain-url", net.url, "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert json.loads(shown.stdout)["phase"] == "ENDED"
        # no key was ever printed
        for f in folders:
            key = (f / "key").read_text().strip()
            assert key not in (f / "join.log").read_text(errors="replace")
