"""The run folder's format: its layout and the round record, read and written only here.

    RUN/
      config.toml              the resolved recipe of the run
      round_000/               the initial adapter and the baseline evaluation
      round_<k>/               after round k:
        adapter_model.safetensors, adapter_config.json   PEFT-loadable adapter
        server_state.safetensors                         server optimizer state (if any)
        config.toml                                      the config that made it
        round.json                                       contributors, samples, rejections,
                                                         metrics, answers, content hash
        (engine files)                                   e.g. FLock's embedded chain state
      final/                   the last round's adapter (PEFT-loadable)
      metrics.jsonl            one line per round
      loss.png                 held-out and training loss per round (written when a run ends)

A round folder appears whole or not at all (`atomic_directory`); `round.json` is written last
inside it. Resuming reads the highest complete round. `round.json` holds a `RoundRecord`: its
own keys in field order, then the engine's parts (`RoundRecord.engine`) beside them at the top
level. `RoundRecord.from_dict` reads every round.json written since this layout was introduced
(tests/fed/fixtures/run_before_runfolder holds one written before this module existed), and
`to_dict` writes the same JSON back.

The round loop (`covey.fed.rounds`) decides what goes into a record; plots and trackers
(`covey.fed.report`, `covey.eval.tracking`) read records and never write the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from covey.atomic import atomic_directory, atomic_write_bytes
from covey.errors import DataError
from covey.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from covey.state import State

ROUND_RECORD = "round.json"
SERVER_STATE = "server_state.safetensors"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FINAL = "final"
METRIC_KEYS = ("round", "eval", "train", "clients")
"""What each metrics.jsonl line holds of its round's record."""
_ROUND_NAME = re.compile(r"^round_(\d+)$")


# ---------------------------------------------------------------- the round record


@dataclass
class RoundRecord:
    """One round as `round.json` holds it (round 0 is the starting adapter's baseline)."""

    round: int
    selected: list[int] = field(default_factory=list)
    """Clients (participants) drawn to train this round."""
    clients: list[dict[str, Any]] = field(default_factory=list)
    """`client_line` of every update merged into the global adapter."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """`rejection` of every update that was trained but not merged, with the reason."""
    aggregation: dict[str, Any] = field(default_factory=dict)
    """What a robust `fed.strategy` did with the merged updates (`Accumulator.report`): its
    lists run parallel to `clients` (each update's `delta_norm`; Krum's `krum_score` and
    `kept`; norm clipping's `clip_scale`, with `clip_bound`; the trimmed mean's
    `trimmed_each_end`). Empty for the FedAvg family and for FLock, whose merge is the
    chain's."""
    train: dict[str, float] = field(default_factory=dict)
    """`train_summary` over every update trained this round, merged or not."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Held-out loss, perplexity and example count of the new global adapter; with
    `eval.rouge_examples`, also `rouge_l`, `heavy_repetition` and `rouge_examples`."""
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Greedy answers of the new global adapter to the fixed sample instructions."""
    seconds: dict[str, float] = field(default_factory=dict)
    """`round` (wall time), `train` (the clients' step loops), `eval`, and engine extras."""
    traffic: dict[str, Any] = field(default_factory=dict)
    """Adapter bytes moved: `transport` (fed.transport), `up` (every update sent to be
    merged, as encoded), `down` (the global adapter sent to the clients, where it is sent)."""
    base_model: str = ""
    config_fingerprint: str = ""
    adapter_sha256: str = ""
    """Content hash of the round's adapter_model.safetensors (set when saved)."""
    engine: dict[str, Any] = field(default_factory=dict)
    """Engine-specific parts, written at the top level of round.json: `flock` (roles,
    proposals, ballots, payouts, balances), `flower` (runtime provenance), `nodes` (client ->
    SuperNode id), `failed` (clients that did not answer)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of round.json: the record's own keys, then the engine's parts."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        parts: dict[str, Any] = common.pop("engine")
        clash = sorted(set(parts) & set(common))
        if clash:
            raise ValueError(f"engine parts {clash} would overwrite the record's own keys")
        return common | parts

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "round record") -> RoundRecord:
        """The record of a round.json object; keys that are not the record's own are the
        engine's parts. DataError (naming `source`) unless it is an object with an integer
        `round`."""
        if not isinstance(data, dict) or not isinstance(data.get("round"), int):
            raise DataError(f"{source}: not a round record (an object with an integer round)")
        own = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        common = {k: v for k, v in data.items() if k in own}
        parts = {k: v for k, v in data.items() if k not in own}
        return cls(**common, engine=parts)

    def to_json(self) -> str:
        """round.json's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def metrics_line(self) -> str:
        """The record's line in metrics.jsonl."""
        data = self.to_dict()
        return json.dumps({k: data[k] for k in METRIC_KEYS if k in data})


def client_line(
    client: int, num_samples: int, attacker: bool, metrics: dict[str, float], **extra: float
) -> dict[str, Any]:
    """One trained update's line in a round record: who, its sample count, whether it attacked
    (experiment ground truth, never read by the defences) and its training metrics."""
    line: dict[str, Any] = {"client": client, "num_samples": num_samples, **extra}
    line["attacker"] = attacker
    return line | {k: round(v, 6) for k, v in metrics.items()}


def rejection(client: int, reason: str, attacker: bool) -> dict[str, Any]:
    """A trained update that was not merged: who, why, and whether it attacked."""
    return {"client": client, "reason": reason, "attacker": attacker}


def train_summary(lines: list[dict[str, Any]]) -> dict[str, float]:
    """The round's training figures over `client_line`s: sample-weighted train loss, tokens,
    tokens/s (lines without training metrics, such as a free rider's, are left out)."""
    trained = [c for c in lines if "train_loss" in c]
    if not trained:
        return {}
    samples = sum(c["num_samples"] for c in trained)
    return {
        "loss": sum(c["train_loss"] * c["num_samples"] for c in trained) / max(samples, 1),
        "tokens": float(sum(c["tokens"] for c in trained)),
        "tokens_per_s": sum(c["tokens"] for c in trained)
        / max(sum(c["seconds"] for c in trained), 1e-9),
    }


# ---------------------------------------------------------------- rounds on disk


def round_dir(run: Path, index: int) -> Path:
    return run / f"round_{index:03d}"


def content_hash(data: bytes) -> str:
    """sha256 of an adapter's safetensors bytes: the identity of an adapter everywhere."""
    return hashlib.sha256(data).hexdigest()


def write_round(
    run: Path,
    record: RoundRecord,
    files: dict[str, bytes],
    server_state: State,
    config_toml: str,
) -> RoundRecord:
    """Write round `record.round` atomically: `files` (the adapter's and the engine's), the
    server state, the config and round.json (last). Returns the record as saved: with the
    adapter's content hash, and as a reader of round.json will see it (JSON's types), without
    reading the folder back."""
    saved = dataclasses.replace(record, adapter_sha256=content_hash(files[ADAPTER_WEIGHTS]))
    text = saved.to_json()
    with atomic_directory(round_dir(run, record.round), overwrite=True) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if server_state:
            contiguous = {k: v.contiguous() for k, v in server_state.items()}
            (staging / SERVER_STATE).write_bytes(safetensors_save(contiguous))
        (staging / CONFIG).write_text(config_toml)
        (staging / ROUND_RECORD).write_text(text)
    return RoundRecord.from_dict(json.loads(text))


def read_record(run: Path, index: int, check_hash: bool = False) -> RoundRecord:
    """Round `index`'s record; with `check_hash`, ValueError unless the adapter's bytes match
    its content hash. DataError if round.json is not a readable round record."""
    folder = round_dir(run, index)
    path = folder / ROUND_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable round record ({e})") from None
    record = RoundRecord.from_dict(data, str(path))
    weights = folder / ADAPTER_WEIGHTS
    if check_hash and content_hash(weights.read_bytes()) != record.adapter_sha256:
        raise ValueError(f"{weights}: content hash does not match round.json")
    return record


def load_round(run: Path, index: int) -> tuple[State, State, RoundRecord]:
    """(adapter state, server state, record) of a saved round; checks the content hash."""
    record = read_record(run, index, check_hash=True)
    folder = round_dir(run, index)
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    server = load_file(str(folder / SERVER_STATE)) if (folder / SERVER_STATE).is_file() else {}
    return state, server, record


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


# ---------------------------------------------------------------- the run's own files


def write_config(run: Path, config_toml: str) -> None:
    """The run's resolved recipe, at the top of a new run folder."""
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG).write_text(config_toml)


def write_final(run: Path, index: int) -> Path:
    """Copy round `index`'s adapter to `final/` (atomically)."""
    with atomic_directory(run / FINAL, overwrite=True) as staging:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ROUND_RECORD, CONFIG):
            shutil.copy2(round_dir(run, index) / name, staging / name)
    return run / FINAL


def write_metrics(run: Path, records: list[RoundRecord]) -> None:
    """Rewrite metrics.jsonl from the round records (atomic, so it always matches the rounds)."""
    lines = [record.metrics_line() for record in records]
    atomic_write_bytes(run / METRICS, ("\n".join(lines) + "\n").encode())
