"""The embedded engine: a whole federation in one process, one base model resident.

Each simulated client is only its tokenized data; training a client means copying the global
adapter into the model's LoRA parameters and running `train_local`. Memory therefore grows with
the clients' tokenized data and the adapters of one round, not with the number of clients.

`run_federated` reads top to bottom: prepare (load, tokenize, resume), then per round select,
train, validate, aggregate, evaluate, checkpoint. Flower and FLock reuse the same pieces.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covey.config import RunConfig, to_toml
from covey.data.prompts import Example, tokenize_records
from covey.data.records import Record, load_records
from covey.errors import ConfigError
from covey.fed import checkpoint
from covey.fed.attacks import UPDATE_ATTACKS, attack_update, malicious_participants
from covey.fed.selection import select_clients
from covey.fed.strategies import get_strategy
from covey.fed.validation import validate_update
from covey.model.lora import adapter_files, adapter_state, load_adapter_state, wrap_with_lora
from covey.state import State
from covey.train.evaluate import evaluate_loss, generate_answers
from covey.train.local import StepCallback, train_local

log = logging.getLogger("covey.fed")


@dataclass
class ClientData:
    """One simulated client: its records (for counting) and its tokenized examples."""

    name: str
    examples: list[Example]


@dataclass
class Federation:
    """Everything a run holds in memory between rounds."""

    model: Any
    tokenizer: Any
    base_model_id: str
    clients: list[ClientData]
    test_records: list[Record]
    test_examples: list[Example]
    sample_records: list[Record]


@dataclass
class Hooks:
    """Progress callbacks (the CLI draws bars with them; tests leave them empty)."""

    round_start: Callable[[int, int, list[int]], None] = lambda r, total, selected: None
    client_start: Callable[[int, int], None] = lambda client, n_examples: None
    step: StepCallback | None = None
    round_end: Callable[[dict[str, Any]], None] = lambda record: None


@dataclass
class RunResult:
    out: Path
    records: list[dict[str, Any]] = field(default_factory=list)


def client_seed(seed: int, round_index: int, client: int) -> int:
    """A distinct, reproducible seed for each (round, client) pair."""
    return (seed * 1_000_003 + round_index * 10_007 + client) % (2**31)


def load_client_data(data_dir: Path) -> tuple[list[list[Record]], list[Record]]:
    """The records of client_0.jsonl, client_1.jsonl, ... and test.jsonl in `data_dir`."""
    if not data_dir.is_dir():
        raise ConfigError(
            f"data.dir {data_dir}: no such folder; create it with "
            f"`covey data split --out {data_dir}`"
        )
    files = sorted(data_dir.glob("client_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise ConfigError(f"data.dir {data_dir}: no client_<i>.jsonl files; run `covey data split`")
    if not (data_dir / "test.jsonl").is_file():
        raise ConfigError(f"data.dir {data_dir}: no test.jsonl; run `covey data split`")
    clients = [load_records(f).records for f in files]
    return clients, load_records(data_dir / "test.jsonl").records


def prepare(cfg: RunConfig, model: Any, tokenizer: Any, base_model_id: str) -> Federation:
    """Wrap the model with LoRA (seeded) and tokenize every client once for the whole run."""
    client_records, test_records = load_client_data(Path(cfg.data.dir))
    torch.manual_seed(cfg.run.seed)
    peft_model = wrap_with_lora(model, cfg.lora)
    clients = [
        ClientData(name=f"client_{i}", examples=tokenize_records(records, tokenizer, cfg.prompt))
        for i, records in enumerate(client_records)
    ]
    for client in clients:
        _check_targets(client.examples, client.name, cfg)
    evaluated = test_records[: cfg.eval.max_examples] if cfg.eval.max_examples else test_records
    # fixed sample instructions: spread over the test set (it is grouped by category)
    step = max(1, len(test_records) // max(cfg.eval.sample_instructions, 1))
    samples = test_records[::step][: cfg.eval.sample_instructions]
    test_examples = tokenize_records(evaluated, tokenizer, cfg.prompt, mask_prompt=True)
    _check_targets(test_examples, "test.jsonl", cfg)
    return Federation(
        model=peft_model,
        tokenizer=tokenizer,
        base_model_id=base_model_id,
        clients=clients,
        test_records=evaluated,
        test_examples=test_examples,
        sample_records=samples,
    )


def _check_targets(examples: list[Example], name: str, cfg: RunConfig) -> None:
    """Responses cut off by `cutoff_len` teach (and measure) nothing: warn, or stop if all are."""
    empty = sum(1 for e in examples if e.num_target_tokens == 0)
    if empty == len(examples):
        raise ConfigError(
            f"{name}: prompt.cutoff_len = {cfg.prompt.cutoff_len} cuts off every response; "
            "raise prompt.cutoff_len"
        )
    if empty:
        log.warning(
            "%s: %d of %d examples lose their whole response to prompt.cutoff_len = %d",
            name, empty, len(examples), cfg.prompt.cutoff_len,
        )  # fmt: skip


def run_federated(
    cfg: RunConfig,
    fed: Federation,
    resume: bool = False,
    hooks: Hooks | None = None,
) -> RunResult:
    """Run (or resume) the rounds of `cfg` on a prepared federation; return the round records."""
    hooks = hooks or Hooks()
    out = Path(cfg.run.out)
    strategy = get_strategy(cfg.fed.strategy)
    config_toml = to_toml(cfg)
    pad_id = fed.tokenizer.pad_token_id
    result = RunResult(out=out)
    # experiment ground truth: which clients attack (the server never reads this)
    attackers = malicious_participants(len(fed.clients), cfg.attack)
    update_attack = cfg.attack.kind if cfg.attack.kind in UPDATE_ATTACKS else None

    done = checkpoint.complete_rounds(out)
    if done and not resume:
        raise ConfigError(
            f"run.out {out} already holds rounds {done[0]}..{done[-1]}; pass --resume to continue "
            "it, or choose another run.out"
        )
    if done:
        _check_same_config(out, cfg)
        for name in checkpoint.remove_stale_staging(out):
            log.info("removed %s, left by an interrupted write", name)
        global_state, server_state, _ = checkpoint.load_round(out, done[-1])
        result.records = [checkpoint.load_round(out, k)[2] for k in done]
        start = done[-1] + 1
        log.info("resuming %s after round %d", out, done[-1])
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(config_toml)
        global_state, server_state = adapter_state(fed.model), {}
        record = {"round": 0, "clients": [], "rejected": [], "train": {}}
        record |= evaluate_round(cfg, fed, global_state)
        save_round_record(cfg, fed, out, 0, global_state, server_state, record, config_toml, result)
        start = 1

    for round_index in range(start, cfg.fed.rounds + 1):
        started = time.perf_counter()
        # Shepherd seeds selection with the 0-based round number
        selected = select_clients(
            len(fed.clients), cfg.fed.client_fraction, round_index - 1, cfg.fed.selection_seed
        )
        hooks.round_start(round_index, cfg.fed.rounds, selected)
        accepted: list[tuple[State, int]] = []
        contributions, rejected, train_seconds = [], [], 0.0
        for client in selected:
            data = fed.clients[client]
            hooks.client_start(client, len(data.examples))
            update = train_local(
                fed.model,
                data.examples,
                global_state,
                cfg.train,
                client_seed(cfg.run.seed, round_index, client),
                pad_id,
                on_step=hooks.step,
            )
            train_seconds += update.metrics["seconds"]
            attacked = client in attackers and update_attack is not None
            if attacked:
                seed = client_seed(cfg.run.seed, round_index, client)
                update.state = attack_update(
                    str(update_attack), global_state, update.state, cfg.attack.strength, seed
                )
            verdict = validate_update(
                update.state, global_state, update.num_samples, len(data.examples),
                cfg.fed.max_update_norm,
            )  # fmt: skip
            if not verdict.accepted:
                log.warning("round %d: rejected %s: %s", round_index, data.name, verdict.reason)
                rejected.append({"client": client, "reason": verdict.reason, "attacker": attacked})
                continue
            accepted.append((update.state, verdict.num_samples))
            contributions.append(
                contribution(
                    client,
                    verdict.num_samples,
                    attacked,
                    update.metrics,
                    update_norm=verdict.update_norm,
                )
            )
        global_state, server_state = strategy(
            global_state,
            [s for s, _ in accepted],
            [float(n) for _, n in accepted],
            server_state,
            cfg.fed,
        )
        record = {
            "round": round_index,
            "selected": selected,
            "clients": contributions,
            "rejected": rejected,
            "train": train_summary(contributions),
        }
        eval_started = time.perf_counter()
        record |= evaluate_round(cfg, fed, global_state)
        # "train" is the clients' step loops, "eval" the held-out forward passes and answers;
        # the rest of "round" is the engine's own overhead (selection, validation, aggregation)
        record["seconds"] = {
            "round": time.perf_counter() - started,
            "train": train_seconds,
            "eval": time.perf_counter() - eval_started,
        }
        save_round_record(
            cfg, fed, out, round_index, global_state, server_state, record, config_toml, result
        )
        hooks.round_end(result.records[-1])

    last = result.records[-1]["round"]
    checkpoint.write_final(out, last)
    return result


def evaluate_round(cfg: RunConfig, fed: Federation, state: State) -> dict[str, Any]:
    """Held-out loss and sample answers of the adapter `state`."""
    return evaluate_adapter(
        cfg, fed.model, fed.tokenizer, state, fed.test_examples, fed.sample_records
    )


def evaluate_adapter(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    state: State,
    test_examples: list[Example],
    sample_records: list[Record],
) -> dict[str, Any]:
    """The round record's `eval` and `answers` for `state`, as every engine reports them."""
    load_adapter_state(model, state)
    metrics = evaluate_loss(model, test_examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    answers = generate_answers(
        model, tokenizer, sample_records, cfg.prompt.template, cfg.eval.max_new_tokens
    )
    return {"eval": metrics | {"examples": len(test_examples)}, "answers": answers}


def save_round_record(
    cfg: RunConfig,
    fed: Federation,
    out: Path,
    index: int,
    state: State,
    server_state: State,
    record: dict[str, Any],
    config_toml: str,
    result: RunResult,
) -> None:
    record = record | {"base_model": fed.base_model_id, "config_fingerprint": cfg.fingerprint()}
    files = adapter_files(fed.model, state, fed.base_model_id)
    checkpoint.save_round(out, index, files, server_state, record, config_toml)
    result.records.append(checkpoint.load_round(out, index)[2])
    checkpoint.write_metrics(out, result.records)
    from covey.fed.report import plot_losses  # matplotlib loads only when needed

    plot_losses(result.records, out / "loss.png")


def contribution(
    client: int, num_samples: int, attacker: bool, metrics: dict[str, float], **extra: float
) -> dict[str, Any]:
    """One client's line in a round record: who, its sample count, and its training metrics
    (`train_summary` and the reports read these keys)."""
    line: dict[str, Any] = {"client": client, "num_samples": num_samples, **extra}
    line["attacker"] = attacker
    return line | {k: round(v, 6) for k, v in metrics.items()}


def train_summary(contributions: list[dict[str, Any]]) -> dict[str, float]:
    """The round's training figures: sample-weighted train loss, tokens, tokens/s."""
    if not contributions:
        return {}
    samples = sum(c["num_samples"] for c in contributions)
    return {
        "loss": sum(c["train_loss"] * c["num_samples"] for c in contributions) / samples,
        "tokens": float(sum(c["tokens"] for c in contributions)),
        "tokens_per_s": sum(c["tokens"] for c in contributions)
        / max(sum(c["seconds"] for c in contributions), 1e-9),
    }


def _check_same_config(out: Path, cfg: RunConfig) -> None:
    """A resumed run must use the settings it started with (only fed.rounds may grow)."""
    first = checkpoint.complete_rounds(out)[0]
    record = json.loads((checkpoint.round_dir(out, first) / checkpoint.ROUND_RECORD).read_text())
    if record.get("config_fingerprint") != cfg.fingerprint():
        raise ConfigError(
            f"run.out {out} was made with other settings (see {out / 'config.toml'}); resume with "
            "the same recipe and --set values (only fed.rounds may change), "
            "or choose another run.out"
        )


def remove_run(out: Path) -> None:
    """Delete a previous run folder (the CLI's --overwrite)."""
    if out.exists():
        shutil.rmtree(out)
