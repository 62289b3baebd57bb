"""The Flower ServerApp: the in-process engine's round loop, with SuperNodes as the clients.

Per round, as `covey.fed.engine.run_federated`: select clients (the same `select_clients` draw
over the connected clients, by client index), send each the global adapter, take back their
trained adapters, validate each (`validate_update`), aggregate (`get_strategy`), evaluate on the
held-out set, and checkpoint. The run folder is the engine's (rounds, final/, metrics.jsonl,
loss.png, config.toml), so `covey serve` and `--resume` work on Flower runs too. Round records
also hold `failed` (selected clients that did not answer); their `traffic` adds `wire_dtype` and
`per_copy` (the global adapter's dtype and size on the way to each client).

The run config (`[tool.flwr.app.config]`, overridable with `flwr run --run-config`) is
`covey.flower.settings.FlowerSettings`: the recipe, overrides, wire dtype and the waits.

Every wait is bounded: a dead SuperNode costs at most `round-timeout` once (Flower also answers
for a node whose heartbeat stopped), and it is not selected again.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from covey.config import RunConfig, load_recipe
from covey.errors import ConfigError
from covey.flower.settings import FlowerSettings
from covey.flower.wire import (
    ATTACK,
    CLIENT_INDEX,
    GLOBAL,
    META,
    METRICS,
    NUM_EXAMPLES,
    NUM_SAMPLES,
    RECIPE,
    ROUND,
    UPDATE,
    WIRE_DTYPE,
    meta_int,
)

if TYPE_CHECKING:
    from covey.fed.rounds import Played, RunModel
    from covey.fed.strategies import Accumulator
    from covey.fed.transport import Codec
    from covey.state import State

log = logging.getLogger("covey.flower")

app = ServerApp()

NODE_UNAVAILABLE = 5
"""flwr ErrorCode.NODE_UNAVAILABLE: the SuperLink answers for a node whose heartbeat stopped."""
POLL_SECONDS = 1.0


@dataclass
class ServerSide:
    """What the server holds: the model with the held-out set, and the clients' record counts."""

    run_model: RunModel
    held: dict[int, int]
    """Records per client from the split's manifest.json, when the server has it."""


def prepare_server(cfg: RunConfig) -> ServerSide:
    """Load the base model, add the seeded LoRA adapter (as the engine does), read test.jsonl."""
    import json

    from covey.data.records import load_records
    from covey.fed.rounds import RunModel
    from covey.model.loading import base_model_id, load_base_model

    data_dir = Path(cfg.data.dir)
    test_file = data_dir / "test.jsonl"
    if not test_file.is_file():
        raise ConfigError(
            f"data.dir {data_dir}: no test.jsonl on the server; the ServerApp evaluates every "
            "round on it (copy it from `covey data split`)"
        )
    test_records = load_records(test_file).records
    held: dict[int, int] = {}
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        for entry in json.loads(manifest.read_text(encoding="utf-8")).get("clients", []):
            held[int(entry["client"])] = int(entry["count"])
    model, tokenizer = load_base_model(cfg.model)
    run_model = RunModel.build(cfg, model, tokenizer, base_model_id(cfg.model), test_records)
    return ServerSide(run_model=run_model, held=held)


@dataclass
class Member:
    """A connected SuperNode that answered the query: which client it is."""

    node_id: int
    client: int
    num_examples: int


class NodePool:
    """The clients of the run by client index, kept in step with the SuperLink's online nodes.

    New nodes are asked who they are (a `query` message); a node that misses a round's deadline
    or that the SuperLink reports unavailable is dropped for the rest of the run.
    """

    def __init__(self, grid: Grid, recipe_toml: str, settings: FlowerSettings) -> None:
        self.grid = grid
        self.recipe_toml = recipe_toml
        self.settings = settings
        self.members: dict[int, Member] = {}
        self.dropped: set[int] = set()
        self.refused: set[int] = set()

    def refresh(self) -> None:
        online = {int(n) for n in self.grid.get_node_ids()}
        for client, member in list(self.members.items()):
            if member.node_id not in online:
                log.warning("client %d (node %d) went offline", client, member.node_id)
                self.drop(client)
        known = {m.node_id for m in self.members.values()} | self.dropped | self.refused
        new = sorted(online - known)
        if not new:
            return
        messages = [
            Message(
                RecordDict({META: ConfigRecord({RECIPE: self.recipe_toml})}),
                node,
                MessageType.QUERY,
                ttl=self.settings.node_wait,
            )
            for node in new
        ]
        timeout = min(self.settings.node_wait, 120.0)
        for node, reply in zip(new, exchange(self.grid, messages, timeout), strict=True):
            self._admit(node, reply)

    def _admit(self, node: int, reply: Message | None) -> None:
        if reply is None:
            log.warning("node %d did not answer the query; not used", node)
            self.dropped.add(node)
            return
        if reply.has_error():
            log.warning("node %d cannot take part: %s", node, reply.error.reason)
            self.refused.add(node)
            return
        try:
            meta = reply.content.config_records[META]
            client = meta_int(meta, CLIENT_INDEX)
            count = meta_int(meta, NUM_EXAMPLES)
        except (KeyError, ValueError) as e:
            log.warning("node %d sent an unusable query reply (%s); not used", node, e)
            self.refused.add(node)
            return
        if client in self.members:
            log.warning(
                "node %d says it is client %d, which node %d already is; not used",
                node, client, self.members[client].node_id,
            )  # fmt: skip
            self.refused.add(node)
            return
        self.members[client] = Member(node_id=node, client=client, num_examples=count)
        log.info("client %d is node %d (%d records)", client, node, count)

    def drop(self, client: int) -> None:
        member = self.members.pop(client, None)
        if member is not None:
            self.dropped.add(member.node_id)

    def ready(self, minimum: int) -> dict[int, Member]:
        """The members once at least `minimum` are connected; ConfigError after `node-wait`."""
        deadline = time.monotonic() + self.settings.node_wait
        while True:
            self.refresh()
            if len(self.members) >= minimum:
                return dict(self.members)
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"only {len(self.members)} of min-nodes={minimum} clients connected within "
                    f"node-wait={self.settings.node_wait:g} s; start more SuperNodes or lower "
                    "min-nodes"
                )
            time.sleep(POLL_SECONDS)


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message | None]:
    """Push `messages` and pull their replies until all arrive or `timeout` seconds pass.

    Replies come back in the order of `messages`; None where none arrived in time.
    """
    replies: list[Message | None] = [None] * len(messages)
    if not messages:
        return replies
    ids = list(grid.push_messages(messages))
    pending = {mid: i for i, mid in enumerate(ids) if mid}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            index = pending.pop(reply.metadata.reply_to_message_id, None)
            if index is not None:
                replies[index] = reply
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(POLL_SECONDS, remaining))
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: read the run config, load the recipe, run the rounds."""
    _log_to_stderr()
    settings = FlowerSettings.from_run_config(dict(context.run_config))
    cfg = load_recipe(settings.recipe or None, settings.overrides)
    run_server(grid, cfg, settings, run_id=context.run_id)


def _log_to_stderr() -> None:
    """Covey's progress lines on stderr, which Flower forwards to `flwr log` and its own log."""
    logger = logging.getLogger("covey")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s covey: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_server(
    grid: Grid, cfg: RunConfig, settings: FlowerSettings, run_id: int = 0
) -> list[dict[str, Any]]:
    """Run (or resume) the rounds of `cfg` over the grid's SuperNodes; return the round records."""
    import flwr

    from covey.fed.rounds import RunFolder, run_rounds

    if cfg.fed.consensus != "server":
        raise ConfigError(
            f"fed.consensus = {cfg.fed.consensus!r}: Flower runs the server-aggregated rounds "
            '(consensus = "server")'
        )
    # before the model loads
    folder = RunFolder.check(
        cfg, settings.resume, "set resume=true in the run config to continue it"
    )
    server = prepare_server(cfg)
    provenance = {"runtime": "flower", "flwr": flwr.__version__, "run_id": str(run_id)}
    pool = NodePool(grid, folder.config_toml, settings)

    def play(round_index: int, global_state: State, merge: Accumulator) -> Played:
        played = play_round(cfg, server, pool, settings, round_index, global_state, merge)
        played.engine["flower"] = provenance
        return played

    history = run_rounds(cfg, folder, server.run_model, play, baseline={"flower": provenance})
    log.info("final adapter: %s", history.out / "final")
    return history.records


def play_round(
    cfg: RunConfig,
    server: ServerSide,
    pool: NodePool,
    settings: FlowerSettings,
    round_index: int,
    global_state: State,
    merge: Accumulator,
) -> Played:
    """Send the global adapter to the selected SuperNodes and validate what comes back."""
    from covey.fed.attacks import UPDATE_ATTACKS, malicious_participants
    from covey.fed.selection import select_clients
    from covey.fed.transport import Codec, dtype_name
    from covey.flower.codec import encode, record_bytes, wire_dtype

    wire = wire_dtype(settings.wire_dtype)
    members = pool.ready(settings.min_nodes)
    indices = sorted(members)
    # experiment ground truth, as the engine: which clients attack (from the split's count)
    attackers = malicious_participants(max(len(server.held), indices[-1] + 1), cfg.attack)
    update_attack = cfg.attack.kind if cfg.attack.kind in UPDATE_ATTACKS else ""
    positions = select_clients(
        len(indices), cfg.fed.client_fraction, round_index - 1, cfg.fed.selection_seed
    )
    selected = [indices[p] for p in positions]
    payload = encode(global_state, wire)
    down = record_bytes(payload)
    messages = [
        Message(
            RecordDict(
                {
                    GLOBAL: payload,
                    META: ConfigRecord(
                        {
                            ROUND: round_index,
                            CLIENT_INDEX: client,
                            RECIPE: pool.recipe_toml,
                            WIRE_DTYPE: dtype_name(wire),
                            ATTACK: update_attack if client in attackers else "",
                        }
                    ),
                }
            ),
            members[client].node_id,
            MessageType.TRAIN,
            ttl=settings.round_timeout,
            group_id=str(round_index),
        )
        for client in selected
    ]
    log.info(
        "round %d/%d: sending the global adapter to clients %s (%s each, %s)",
        round_index, cfg.fed.rounds, selected, _size(down), dtype_name(wire),
    )  # fmt: skip
    replies = exchange(pool.grid, messages, settings.round_timeout)
    flagged = attackers if update_attack else set()
    codec = Codec.of(cfg.fed)
    played, up_bytes, failed = _collect(
        cfg, server, pool, members, selected, replies, global_state, codec, flagged, merge
    )
    played.traffic = {
        "transport": codec.transport,
        "up": up_bytes,
        "down": down * len(messages),
        "wire_dtype": dtype_name(wire),
        "per_copy": down,
    }
    played.engine |= {
        "failed": failed,
        "nodes": {str(c): members[c].node_id for c in selected},
    }
    log.info(
        "round %d: %d accepted, %d rejected, %d failed; sent %s, received %s",
        round_index, len(played.merged), len(played.rejected), len(failed),
        _size(down * len(messages)), _size(up_bytes),
    )  # fmt: skip
    return played


def _collect(
    cfg: RunConfig,
    server: ServerSide,
    pool: NodePool,
    members: dict[int, Member],
    selected: list[int],
    replies: list[Message | None],
    global_state: State,
    codec: Codec,
    attackers: set[int],
    merge: Accumulator,
) -> tuple[Played, int, list[dict[str, Any]]]:
    """Decode and validate each selected client's reply, in client order (as the engine):
    (the round so far, bytes received, clients that failed)."""
    from covey.fed.rounds import Played
    from covey.fed.runfolder import client_line, rejection
    from covey.fed.transport import TransportError, decode_update
    from covey.fed.validation import validate_update
    from covey.flower.codec import CodecError, decode, record_bytes

    played = Played(selected=selected, merge=merge)
    up_bytes = 0
    failed: list[dict[str, Any]] = []
    for client, reply in zip(selected, replies, strict=True):
        attacked = client in attackers
        if reply is None:
            reason = f"no reply within round-timeout={pool.settings.round_timeout:g} s"
            log.warning("client %d: %s; dropped from the run", client, reason)
            failed.append({"client": client, "reason": reason})
            pool.drop(client)
            continue
        if reply.has_error():
            reason = f"error {reply.error.code}: {reply.error.reason}"
            log.warning("client %d failed: %s", client, reason)
            failed.append({"client": client, "reason": reason})
            if reply.error.code == NODE_UNAVAILABLE:
                pool.drop(client)
            continue
        try:
            content = reply.content
            arrays = content.array_records[UPDATE]
            up_bytes += record_bytes(arrays)
            update: object = decode_update(decode(arrays), global_state, codec)
            claimed: object = content.config_records[META].get(NUM_SAMPLES)
            metrics = {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, TransportError) as e:  # CodecError: ValueError
            undecodable = isinstance(e, CodecError | TransportError)
            kind = "undecodable update" if undecodable else "malformed reply"
            played.rejected.append(rejection(client, f"{kind}: {e}", attacked))
            log.warning("round: rejected client %d: %s: %s", client, kind, e)
            continue
        held = server.held.get(client, members[client].num_examples)
        verdict = validate_update(update, global_state, claimed, held, cfg.fed.max_update_norm)
        played.train_seconds += metrics.get("seconds", 0.0)
        line = client_line(
            client, verdict.num_samples, attacked, metrics, update_norm=verdict.update_norm
        )
        played.trained.append(line)
        if not verdict.accepted:
            log.warning("rejected client %d: %s", client, verdict.reason)
            played.rejected.append(rejection(client, verdict.reason, attacked))
            continue
        assert isinstance(update, dict)
        played.accept(update, float(verdict.num_samples), line)
    return played, up_bytes, failed


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
