"""The Flower ClientApp: one SuperNode is one Covey client, training with `train_local`.

The server sends the resolved recipe with every message, so a SuperNode needs no recipe of its
own; it needs the base model (same `model.base`, or its own path via `model-base`) and its data.

SuperNode `--node-config` keys:
- `data-file`: the client's `client_<i>.jsonl` from `covey data split` (required in deployment).
- `client-index`: the client's index `i` (default: taken from the `client_<i>.jsonl` name). It
  seeds local training exactly as the in-process engine seeds client `i`.
- `model-base`: this machine's path of the base model (default: the recipe's `model.base`).
- `device`: `cpu`, `cuda` or `cuda:N` for this node (default: the recipe's `model.device`).

In Flower's simulation there is no node config but `partition-id`: partition `i` reads
`<data.dir>/client_<i>.jsonl` and is client `i`.

Flower may start a fresh process per message (deployment) or keep one per worker (simulation);
the model and the tokenized data are cached per process (`CACHE`, a `NodeCache`), so a kept
process loads them once.

The update goes back as the recipe's `fed.transport` encodes it. Under `int8+topk` the client's
error-feedback residual lives in the run's `Context.state`, which the SuperNode keeps between
messages of a run. A resumed run is a new Flower run, and a SuperNode has no folder of its own
for it, so the residual then starts from zero: what top-k held back from each client's last
update before the interruption is dropped once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from covey.config import RunConfig, load_recipe
from covey.errors import ConfigError
from covey.flower import wire

log = logging.getLogger("covey.flower")

app = ClientApp()

_CLIENT_FILE = re.compile(r"client_(\d+)\.jsonl$")


@dataclass(frozen=True)
class ClientSpec:
    """Which client this node is, from its node config (or simulation partition)."""

    data_file: Path
    index: int


def client_spec(node_config: dict[str, Any], cfg: RunConfig) -> ClientSpec:
    """Resolve `data-file` and `client-index` (see the module docstring)."""
    raw_file = node_config.get("data-file")
    partition = node_config.get("partition-id")
    if raw_file is None and partition is not None:
        raw_file = str(Path(cfg.data.dir) / f"client_{int(partition)}.jsonl")
    if not isinstance(raw_file, str) or not raw_file:
        raise ConfigError(
            "this SuperNode has no data-file in its node config; start it with "
            "--node-config 'data-file=\"/path/client_0.jsonl\" client-index=0'"
        )
    data_file = Path(raw_file).expanduser()
    raw_index = node_config.get("client-index")
    if raw_index is None:
        match = _CLIENT_FILE.search(data_file.name)
        if match is None:
            raise ConfigError(
                f"data-file {data_file}: cannot tell the client index from the name; add "
                "client-index=<i> to the node config"
            )
        raw_index = int(match.group(1))
    if isinstance(raw_index, bool) or not isinstance(raw_index, int) or raw_index < 0:
        raise ConfigError(f"client-index must be an integer >= 0, got {raw_index!r}")
    if not data_file.is_file():
        raise ConfigError(f"data-file {data_file}: no such file on this SuperNode")
    return ClientSpec(data_file=data_file, index=raw_index)


def recipe_from(message: Message) -> RunConfig:
    """The run's resolved recipe, sent by the server as TOML text."""
    meta = message.content.config_records[wire.META]
    text = meta[wire.RECIPE]
    if not isinstance(text, str):
        raise ValueError("message carries no recipe")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.toml"
        path.write_text(text, encoding="utf-8")
        return load_recipe(path)


def _local_config(cfg: RunConfig, node_config: dict[str, Any]) -> RunConfig:
    """This node's view of `[model]`: its own path and device for the same base model."""
    model = cfg.model
    base = node_config.get("model-base")
    device = node_config.get("device")
    if isinstance(base, str) and base:
        model = dataclasses.replace(model, base=base)
    if isinstance(device, str) and device:
        model = dataclasses.replace(model, device=device)
    return dataclasses.replace(cfg, model=model)


class NodeCache:
    """What this process keeps between messages: the model and the tokenized examples.

    Flower may keep one process for many messages (simulation workers), so loading the base
    model and tokenizing the client's data once per process saves most of a round. A handler
    gets only (message, context), and `Context.state` holds records (arrays, configs), not a
    live torch model, so the cache lives beside `app`, with the process's lifetime: `CACHE`.
    One model at a time: a new recipe's model replaces the old one, and with it the examples
    its tokenizer made.
    """

    def __init__(self) -> None:
        self._model_key: str | None = None
        self._model: tuple[Any, Any] | None = None
        self._examples: dict[str, list[Any]] = {}

    def model(self, cfg: RunConfig) -> tuple[Any, Any]:
        """The base model wrapped with the run's LoRA settings, and its tokenizer."""
        key = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.lora)])
        if self._model is None or key != self._model_key:
            from covey.model.loading import load_base_model
            from covey.model.lora import wrap_with_lora

            self._model_key, self._model = None, None
            self._examples.clear()  # tokenized by the tokenizer being replaced
            model, tokenizer = load_base_model(cfg.model)
            self._model = (wrap_with_lora(model, cfg.lora), tokenizer)
            self._model_key = key
        return self._model

    def examples(
        self, cfg: RunConfig, spec: ClientSpec, tokenizer: Any, poisoned: bool
    ) -> list[Any]:
        """The client's tokenized examples (`poisoned`: a backdoor attacker's, see
        `covey.fed.attacks.poison_records`), kept per file version and settings."""
        stat = spec.data_file.stat()
        key = json.dumps(
            [str(spec.data_file.resolve()), stat.st_mtime_ns, stat.st_size,
             dataclasses.asdict(cfg.prompt), dataclasses.asdict(cfg.model),
             dataclasses.asdict(cfg.attack) if poisoned else None]
        )  # fmt: skip
        if key not in self._examples:
            self._examples[key] = _tokenized_examples(cfg, spec, tokenizer, poisoned)
        return self._examples[key]


def _tokenized_examples(
    cfg: RunConfig, spec: ClientSpec, tokenizer: Any, poisoned: bool
) -> list[Any]:
    from covey.data.prompts import tokenize_records
    from covey.data.records import load_records

    records = load_records(spec.data_file).records
    if not records:
        raise ConfigError(f"data-file {spec.data_file}: no records")
    if poisoned:
        from covey.fed.attacks import poison_records

        records = poison_records(records, cfg.attack, spec.index)
    tokenized = tokenize_records(records, tokenizer, cfg.prompt)
    if all(e.num_target_tokens == 0 for e in tokenized):
        raise ConfigError(
            f"{spec.data_file.name}: prompt.cutoff_len = {cfg.prompt.cutoff_len} cuts off "
            "every response; raise prompt.cutoff_len"
        )
    return tokenized


CACHE = NodeCache()
"""This process's model and examples (see `NodeCache`); the handlers below use it."""


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is and how many records it holds."""
    from covey.data.records import load_records

    cfg = recipe_from(message)
    spec = client_spec(dict(context.node_config), cfg)
    count = len(load_records(spec.data_file).records)
    meta = ConfigRecord({wire.CLIENT_INDEX: spec.index, wire.NUM_EXAMPLES: count})
    return Message(RecordDict({wire.META: meta}), reply_to=message)


FEEDBACK = "covey_feedback"
"""ArrayRecord in `Context.state`: the client's error-feedback residual (int8+topk)."""


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training from the global adapter in the message."""
    from covey.fed.client import UpdateAttack, client_update
    from covey.fed.engine import client_seed
    from covey.fed.transport import Codec, ErrorFeedback
    from covey.flower.codec import cast_like, decode, encode, encode_wire, wire_dtype
    from covey.model.lora import adapter_state

    cfg = recipe_from(message)
    meta = message.content.config_records[wire.META]
    spec = client_spec(dict(context.node_config), cfg)
    expected = meta.get(wire.CLIENT_INDEX)
    if expected is not None and expected != spec.index:
        raise ConfigError(
            f"the server addressed client {expected!r}, but this node is client {spec.index}"
        )
    round_index = wire.meta_int(meta, wire.ROUND)
    dtype = wire_dtype(str(meta.get(wire.WIRE_DTYPE, "float32")))
    model, tokenizer = CACHE.model(_local_config(cfg, dict(context.node_config)))
    attack = meta.get(wire.ATTACK, "")  # a robustness experiment: this client is malicious
    attack = attack if isinstance(attack, str) else ""
    examples = CACHE.examples(cfg, spec, tokenizer, poisoned=attack == "backdoor")
    reference = adapter_state(model)
    received = decode(message.content.array_records[wire.GLOBAL])
    if received.keys() != reference.keys():
        raise ValueError("the global adapter does not match this node's LoRA layout")
    start = cast_like(received, reference, dtype)
    seed = client_seed(cfg.run.seed, round_index, spec.index)
    codec = Codec.of(cfg.fed)
    feedback = None
    if codec.sparse:
        saved = context.state.array_records.get(FEEDBACK)
        feedback = ErrorFeedback(decode(saved) if saved is not None else {})
    malicious = UpdateAttack(attack, cfg.attack.strength, cfg.attack.estimate_shards)
    result = client_update(
        model, tokenizer.pad_token_id, examples, start, cfg.train, seed, codec,
        feedback=feedback, attack=malicious if attack else None,
    )  # fmt: skip
    if feedback is not None:
        context.state[FEEDBACK] = encode(feedback.residual)
    log.info(
        "round %d: client %d trained on %d examples, loss %.4f",
        round_index, spec.index, result.num_samples, result.metrics["train_loss"],
    )  # fmt: skip
    content = RecordDict(
        {
            wire.UPDATE: encode_wire(result.wire),
            wire.METRICS: MetricRecord({k: float(v) for k, v in result.metrics.items()}),
            wire.META: ConfigRecord(
                {wire.CLIENT_INDEX: spec.index, wire.NUM_SAMPLES: result.num_samples}
            ),
        }
    )
    return Message(content, reply_to=message)
