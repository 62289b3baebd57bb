"""Run folders: one atomic folder per round, so a killed run resumes from its last whole round.

    RUN/
      config.toml              the resolved recipe of the run
      round_000/               the initial adapter and the baseline evaluation
      round_<k>/               after round k:
        adapter_model.safetensors, adapter_config.json   PEFT-loadable adapter
        server_state.safetensors                         server optimizer state (if any)
        config.toml                                      the config that made it
        round.json                                       contributors, samples, rejections,
                                                         metrics, answers, content hash
      final/                   the last round's adapter (PEFT-loadable)
      metrics.jsonl            one line per round
      loss.png                 held-out and training loss per round

A round folder appears whole or not at all (`atomic_directory`); `round.json` is written last
inside it. Resuming reads the highest complete round.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from covey.atomic import atomic_directory, atomic_write_bytes
from covey.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from covey.state import State

ROUND_RECORD = "round.json"
SERVER_STATE = "server_state.safetensors"
_ROUND_NAME = re.compile(r"^round_(\d+)$")


def round_dir(run: Path, index: int) -> Path:
    return run / f"round_{index:03d}"


def content_hash(data: bytes) -> str:
    """sha256 of an adapter's safetensors bytes: the identity of an adapter everywhere."""
    return hashlib.sha256(data).hexdigest()


def save_round(
    run: Path,
    index: int,
    adapter: dict[str, bytes],
    server_state: State,
    record: dict[str, Any],
    config_toml: str,
) -> Path:
    """Write round `index` atomically; `record` gains the adapter's content hash."""
    record = dict(record, adapter_sha256=content_hash(adapter[ADAPTER_WEIGHTS]))
    target = round_dir(run, index)
    with atomic_directory(target, overwrite=True) as staging:
        for name, data in adapter.items():
            (staging / name).write_bytes(data)
        if server_state:
            contiguous = {k: v.contiguous() for k, v in server_state.items()}
            (staging / SERVER_STATE).write_bytes(safetensors_save(contiguous))
        (staging / "config.toml").write_text(config_toml)
        (staging / ROUND_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target


def complete_rounds(run: Path) -> list[int]:
    """Indices of the rounds whose folder is complete, ascending."""
    if not run.is_dir():
        return []
    found = []
    for child in run.iterdir():
        match = _ROUND_NAME.match(child.name)
        if match and (child / ROUND_RECORD).is_file() and (child / ADAPTER_WEIGHTS).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def remove_stale_staging(run: Path) -> list[str]:
    """Delete what a killed writer left: hidden `.NAME.tmp-*` / `.NAME.old-*` staging entries.

    Atomic writes stage beside their target; a SIGKILL between staging and rename leaves the
    staged copy. It never replaced anything, so removing it on resume loses nothing.
    """
    removed = []
    for child in run.glob(".*"):
        if ".tmp-" in child.name or ".old-" in child.name:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child.name)
    return removed


def load_round(run: Path, index: int) -> tuple[State, State, dict[str, Any]]:
    """(adapter state, server state, record) of a saved round; checks the content hash."""
    folder = round_dir(run, index)
    record = json.loads((folder / ROUND_RECORD).read_text())
    data = (folder / ADAPTER_WEIGHTS).read_bytes()
    if content_hash(data) != record["adapter_sha256"]:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: content hash does not match round.json")
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    server: dict[str, torch.Tensor] = {}
    if (folder / SERVER_STATE).is_file():
        server = load_file(str(folder / SERVER_STATE))
    return state, server, record


def write_final(run: Path, index: int) -> Path:
    """Copy round `index`'s adapter to `final/` (atomically)."""
    with atomic_directory(run / "final", overwrite=True) as staging:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ROUND_RECORD, "config.toml"):
            shutil.copy2(round_dir(run, index) / name, staging / name)
    return run / "final"


def write_metrics(run: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the round records (atomic, so it always matches the rounds)."""
    lines = []
    for r in records:
        lines.append(json.dumps({k: r[k] for k in ("round", "eval", "train", "clients") if k in r}))
    atomic_write_bytes(run / "metrics.jsonl", ("\n".join(lines) + "\n").encode())
