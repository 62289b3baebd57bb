"""Covey on Flower: the ServerApp's round loop against the in-process engine, then for real.

Fast tier: `LoopbackGrid` serves Flower's Grid interface inside the test process, each node a
call of Covey's ClientApp, so the round loop (selection, codec, validation, aggregation,
checkpoints), misbehaving clients and the settings are checked in seconds.

`flower` tier: a SuperLink and SuperNodes on loopback (insecure, then TLS with SuperNode
authentication), Flower's simulation runtime, and a SuperNode killed mid-run. Each run is
checked against the in-process engine on the same recipe and data: with float32 on the wire the
global adapter must match. Every process started here is stopped by its process group id in a
finalizer, and the test checks that none is left running.
"""

from __future__ import annotations

import json
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import torch
import typer
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from covey.config import RunConfig, load_recipe, to_toml
from covey.data.split import SplitConfig, run_split
from covey.errors import ConfigError
from covey.flower import client_app, wire
from covey.flower.certs import make_certificates
from covey.flower.cli import flower_app
from covey.flower.client_app import FEEDBACK, ClientSpec, client_spec
from covey.flower.codec import decode, encode
from covey.flower.control import FlowerRun, run_app
from covey.flower.deploy import LocalFederation, client_files, simulate, start_local_federation
from covey.flower.processes import Service, free_port
from covey.flower.server_app import run_server
from covey.flower.settings import FlowerSettings
from tests.conftest import dolly_records, write_records
from tests.fed.test_engine import run as run_engine
from tests.fed.test_engine import tiny_config

# One thread per process: several ClientApps share two cores here; the tiny model gains nothing
# from more, and oversubscription made rounds ten times slower.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUN_TIMEOUT = 480.0


@pytest.fixture(scope="module")
def two_client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`covey data split` output with 2 clients: two SuperNodes keep the runs short."""
    root = tmp_path_factory.mktemp("flower-data")
    source = write_records(root / "source.jsonl", dolly_records(per_category=6))
    out = root / "split"
    run_split(SplitConfig(input=str(source), out=out, clients=2, min_size=5, test_per_category=2))
    return out


def write_recipe(path: Path, tiny_model_dir: Path, data_dir: Path, out: Path, *sets: str) -> Path:
    cfg = tiny_config(tiny_model_dir, data_dir, out, "fed.rounds=2", *sets)
    path.write_text(to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def engine_two(tiny_model_dir: Path, two_client_dir: Path, tmp_path_factory: Any) -> Path:
    """The in-process engine's run on the two-client data: the reference."""
    root = tmp_path_factory.mktemp("engine-two")
    recipe = write_recipe(root / "recipe.toml", tiny_model_dir, two_client_dir, root / "out")
    from covey.config import load_recipe

    run_engine(load_recipe(recipe))
    return root / "out"


@pytest.fixture
def started() -> Iterator[list[LocalFederation]]:
    """Federations a test starts; stopped at the end, pass or fail, then checked gone."""
    federations: list[LocalFederation] = []
    yield federations
    for federation in federations:
        federation.stop()
    for federation in federations:
        for service in [federation.superlink, *federation.supernodes]:
            assert not service.leftovers(), f"{service.name} left processes running"


def adapter(run: Path, where: str) -> dict[str, torch.Tensor]:
    return load_file(run / where / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # float32 on the wire: equal up to thread-count rounding
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def record(run: Path, index: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / f"round_{index:03d}" / "round.json").read_text())
    return data


def check_matches_engine(
    out: Path, engine_out: Path, clients: list[int], extra: frozenset[str] = frozenset()
) -> None:
    engine_names = {p.name for p in engine_out.iterdir()}
    assert {p.name for p in out.iterdir()} == engine_names | extra
    for where in ("round_000", "round_001", "final"):
        assert_same_adapter(adapter(out, where), adapter(engine_out, where))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    reference = [json.loads(x) for x in (engine_out / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(lines, reference, strict=True):
        assert mine["eval"]["loss"] == pytest.approx(theirs["eval"]["loss"], rel=1e-5)
    last = record(out, 2)
    assert last["selected"] == clients and [c["client"] for c in last["clients"]] == clients
    assert last["failed"] == [] and last["rejected"] == []
    state = adapter(out, "round_001")
    per_copy = sum(4 * t.numel() + len(k) for k, t in state.items())
    assert last["traffic"] == {
        "transport": "fp32",
        "wire_dtype": "float32",
        "per_copy": per_copy,
        "down": per_copy * len(clients),
        "up": per_copy * len(clients),
    }
    assert last["flower"]["runtime"] == "flower"


# --------------------------------------------------------------------------- fast tier

Tamper = Callable[[int, Message, Message], Message | None]
"""(client index, instruction, honest reply) -> the reply to deliver, or None for silence."""


class LoopbackGrid(Grid):
    """Flower's Grid served in this process: node `1000 + i` runs Covey's ClientApp as client i.

    `tamper` can replace a node's replies (a hostile or silent client); nodes in `offline`
    are not reported online. Each node keeps its run's Context, as a SuperNode does.
    """

    def __init__(self, data_dir: Path, clients: Iterable[int], tamper: Tamper | None = None):
        # what Flower's ServerApp runtime sets before it calls the app
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.configs = {
            1000 + i: {"data-file": str(data_dir / f"client_{i}.jsonl")} for i in clients
        }
        self.tamper = tamper
        self.offline: set[int] = set()
        self.contexts: dict[int, Context] = {}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.answered: list[Message] = []

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.configs if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = self.contexts.setdefault(
                node, Context(1, node, dict(self.configs[node]), RecordDict(), {})
            )
            try:
                reply = client_app.app(message, context)
            except Exception as e:  # as Flower's runtime: an error reply
                reply = Message(Error(2, f"{type(e).__name__}: {e}"), reply_to=message)
            delivered = reply if self.tamper is None else self.tamper(node - 1000, message, reply)
            if delivered is not None:
                self.replies[message.metadata.message_id] = delivered
                self.answered.append(delivered)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def settings(**changes: Any) -> FlowerSettings:
    return FlowerSettings(**{"min_nodes": 3, "node_wait": 2.0, "round_timeout": 2.0, **changes})


def tiny(tiny_model_dir: Path, data_dir: Path, out: Path, *sets: str) -> RunConfig:
    return tiny_config(tiny_model_dir, data_dir, out, "fed.rounds=2", *sets)


def test_round_loop_matches_the_engine_exactly(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """The ServerApp's loop over 3 in-process clients gives the engine's adapters bit for bit."""
    engine_out, flower_out = tmp_path / "engine", tmp_path / "flower"
    run_engine(tiny(tiny_model_dir, client_data_dir, engine_out))
    grid = LoopbackGrid(client_data_dir, range(3))
    records = run_server(grid, tiny(tiny_model_dir, client_data_dir, flower_out), settings())
    assert [r["round"] for r in records] == [0, 1, 2]
    for where in ("round_000", "round_001", "round_002", "final"):
        mine, theirs = adapter(flower_out, where), adapter(engine_out, where)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), where
    assert {p.name for p in flower_out.iterdir()} == {p.name for p in engine_out.iterdir()}
    assert records[2]["nodes"] == {"0": 1000, "1": 1001, "2": 1002}
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 3, "each node is asked who it is once, not every round"
    assert_wire_keys(grid)


def message_keys(messages: list[Message]) -> dict[str, set[str]]:
    """Per message type: the records, and META's fields as `META.field`."""
    found: dict[str, set[str]] = {}
    for message in messages:
        keys = found.setdefault(message.metadata.message_type, set())
        keys |= set(message.content)
        keys |= {f"{wire.META}.{f}" for f in message.content.config_records[wire.META]}
    return found


def assert_wire_keys(grid: LoopbackGrid) -> None:
    """Both sides speak covey.flower.wire: exactly the records and fields it defines."""

    def meta(*fields: str) -> set[str]:
        return {wire.META} | {f"{wire.META}.{f}" for f in fields}

    sent, answered = message_keys(grid.sent), message_keys(grid.answered)
    assert sent == {
        "query": meta(wire.RECIPE),
        "train": meta(wire.RECIPE, wire.ROUND, wire.CLIENT_INDEX, wire.WIRE_DTYPE, wire.ATTACK)
        | {wire.GLOBAL},
    }
    assert answered == {
        "query": meta(wire.CLIENT_INDEX, wire.NUM_EXAMPLES),
        "train": meta(wire.CLIENT_INDEX, wire.NUM_SAMPLES) | {wire.UPDATE, wire.METRICS},
    }
    keys = set().union(*sent.values(), *answered.values())
    assert all(re.fullmatch(r"[a-z_.]+", key) for key in keys), "snake_case on the wire"


def test_simulated_attackers_match_the_engine(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """attack.* works as in the engine: the same client attacks, flagged in the records."""
    sets = ("fed.rounds=1", "attack.kind=sign_flip", "attack.malicious_fraction=0.3")
    engine_out, flower_out = tmp_path / "engine", tmp_path / "flower"
    engine_records = run_engine(tiny(tiny_model_dir, client_data_dir, engine_out, *sets)).records
    grid = LoopbackGrid(client_data_dir, range(3))
    records = run_server(grid, tiny(tiny_model_dir, client_data_dir, flower_out, *sets), settings())
    flags = [(c["client"], c["attacker"]) for c in records[1]["clients"]]
    assert flags == [(c["client"], c["attacker"]) for c in engine_records[1]["clients"]]
    assert sum(attacker for _, attacker in flags) == 1
    mine, theirs = adapter(flower_out, "final"), adapter(engine_out, "final")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_hostile_silent_and_failing_clients_cost_only_their_own_update(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """Client 0 sends a wrong shape, client 1 never answers, client 2 is honest: round 1 keeps
    client 2's update; client 1 is dropped, so round 2 selects only clients 0 and 2."""

    def tamper(client: int, message: Message, reply: Message) -> Message | None:
        if message.metadata.message_type != "train":
            return reply
        if client == 1:
            return None
        if client == 0:
            update = decode(reply.content.array_records[wire.UPDATE])
            key = next(iter(update))
            update[key] = torch.zeros(3, 3)
            reply.content[wire.UPDATE] = encode(update)
        return reply

    out = tmp_path / "run"
    grid = LoopbackGrid(client_data_dir, range(3), tamper)
    records = run_server(
        grid, tiny(tiny_model_dir, client_data_dir, out), settings(min_nodes=2, round_timeout=1.0)
    )
    first, second = records[1], records[2]
    assert [c["client"] for c in first["clients"]] == [2]
    assert [r["client"] for r in first["rejected"]] == [0]
    assert "shape" in first["rejected"][0]["reason"]
    assert first["failed"] == [{"client": 1, "reason": "no reply within round-timeout=1 s"}]
    assert second["selected"] == [0, 2]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_client_error_is_recorded_and_the_client_stays(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    def tamper(client: int, message: Message, reply: Message) -> Message | None:
        if message.metadata.message_type == "train" and client == 2:
            return Message(Error(2, "ValueError: out of memory"), reply_to=message)
        return reply

    grid = LoopbackGrid(client_data_dir, range(3), tamper)
    cfg = tiny(tiny_model_dir, client_data_dir, tmp_path / "run")
    records = run_server(grid, cfg, settings())
    assert records[1]["failed"] == [{"client": 2, "reason": "error 2: ValueError: out of memory"}]
    assert records[2]["selected"] == [0, 1, 2], "an error reply does not drop a live node"


def test_int8_topk_with_error_feedback_matches_the_engine(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    """Same encoding, same residuals (kept in each node's Context.state): the same adapters;
    each update goes up as int8 values, int16 indices and one scale per tensor."""
    sets = ("fed.transport='int8+topk'", "fed.topk_fraction=0.1")
    engine_out, flower_out = tmp_path / "engine", tmp_path / "flower"
    engine_records = run_engine(tiny(tiny_model_dir, client_data_dir, engine_out, *sets)).records
    grid = LoopbackGrid(client_data_dir, range(3))
    records = run_server(grid, tiny(tiny_model_dir, client_data_dir, flower_out, *sets), settings())
    for where in ("round_001", "final"):
        assert_same_adapter(adapter(flower_out, where), adapter(engine_out, where))
    assert all(FEEDBACK in grid.contexts[1000 + c].state.array_records for c in range(3))
    state = adapter(flower_out, "round_001")
    kept = {k: math.ceil(0.1 * t.numel()) for k, t in state.items()}
    per_update = sum(3 * n + 4 + 3 * len(k) + len(":index:scale") for k, n in kept.items())
    assert records[2]["traffic"]["up"] == 3 * per_update
    assert engine_records[2]["traffic"]["transport"] == "int8+topk"
    assert records[2]["eval"]["loss"] < records[0]["eval"]["loss"]


@pytest.mark.parametrize("wire", [pytest.param("float16", marks=pytest.mark.slow), "bfloat16"])
def test_half_precision_on_the_wire_halves_the_bytes(
    wire: str, tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    grid = LoopbackGrid(client_data_dir, range(3))
    transport = {"float16": "fp16", "bfloat16": "bf16"}[wire]
    cfg = tiny(
        tiny_model_dir, client_data_dir, tmp_path / "run", "fed.rounds=1",
        f"fed.transport={transport}",
    )  # fmt: skip
    record = run_server(grid, cfg, settings(wire_dtype=wire))[1]
    state = adapter(tmp_path / "run", "round_001")
    assert state[next(iter(state))].dtype == torch.float32, "the global adapter stays float32"
    payload = sum(2 * t.numel() + len(k) for k, t in state.items())
    assert record["traffic"] == {
        "transport": transport, "wire_dtype": wire, "per_copy": payload, "down": 3 * payload,
        "up": 3 * payload,
    }  # fmt: skip
    assert len(record["clients"]) == 3 and record["rejected"] == []
    assert record["eval"]["loss"] < tiny_losses(tmp_path / "run")[0]


def tiny_losses(out: Path) -> list[float]:
    return [json.loads(x)["eval"]["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_too_few_clients_stops_the_run_after_node_wait(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    grid = LoopbackGrid(client_data_dir, range(3))
    grid.offline = {1002}
    cfg = tiny(tiny_model_dir, client_data_dir, tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="only 2 of min-nodes=3 clients connected"):
        run_server(grid, cfg, settings(node_wait=1.0))
    assert time.monotonic() - started < 30
    assert (tmp_path / "run" / "round_000").is_dir()  # resumable: the baseline is saved


@pytest.mark.slow  # two runs
def test_a_finished_run_needs_resume_and_then_continues(
    tiny_model_dir: Path, client_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = LoopbackGrid(client_data_dir, range(3))
    run_server(grid, tiny(tiny_model_dir, client_data_dir, out, "fed.rounds=1"), settings())
    with pytest.raises(ConfigError, match="resume=true"):
        run_server(grid, tiny(tiny_model_dir, client_data_dir, out), settings())
    # what a server killed while writing round 2 leaves behind; resuming removes it
    (out / ".round_002.tmp-k1ll").mkdir()
    (out / ".metrics.jsonl.tmp-k1ll").write_text("partial")
    records = run_server(grid, tiny(tiny_model_dir, client_data_dir, out), settings(resume=True))
    assert [r["round"] for r in records] == [0, 1, 2]
    assert not list(out.glob(".*")), "resume left the staging entries of the killed write"


def test_client_spec_from_node_config(client_data_dir: Path, tmp_path: Path) -> None:
    cfg = load_recipe(None, [f"data.dir='{client_data_dir}'"])
    file_1 = client_data_dir / "client_1.jsonl"
    assert client_spec({"data-file": str(file_1)}, cfg) == ClientSpec(file_1, 1)
    assert client_spec({"data-file": str(file_1), "client-index": 7}, cfg).index == 7
    assert client_spec({"partition-id": 2}, cfg) == ClientSpec(
        client_data_dir / "client_2.jsonl", 2
    )  # simulation
    other = tmp_path / "mine.jsonl"
    other.write_text((client_data_dir / "client_0.jsonl").read_text())
    with pytest.raises(ConfigError, match="client-index"):
        client_spec({"data-file": str(other)}, cfg)
    with pytest.raises(ConfigError, match="no data-file"):
        client_spec({}, cfg)
    with pytest.raises(ConfigError, match="no such file"):
        client_spec({"data-file": str(tmp_path / "client_3.jsonl")}, cfg)
    with pytest.raises(ConfigError, match="integer >= 0"):
        client_spec({"data-file": str(file_1), "client-index": -1}, cfg)


# --------------------------------------------------------------------------- flower tier


def deploy(
    tmp_path: Path,
    started: list[LocalFederation],
    files: list[Path],
    tls: bool,
) -> LocalFederation:
    certs = make_certificates(tmp_path / "certs") if tls else None
    federation = start_local_federation(
        tmp_path / "flower", files, tls=certs, node_auth=tls, extra_env=THREADS
    )
    started.append(federation)
    return federation


def assert_ok(result: FlowerRun, federation: LocalFederation | None = None) -> None:
    if result.ok:
        return
    logs = [result.log.read_text(errors="replace")[-4000:]]
    if federation is not None:
        logs += [s.tail(20) for s in [federation.superlink, *federation.supernodes]]
    pytest.fail(f"run {result.run_id} ended {result.status}: {result.details}\n" + "\n".join(logs))


@pytest.mark.flower
@pytest.mark.parametrize("security", ["insecure", "tls-node-auth"])
def test_deployment_matches_the_engine(
    security: str,
    tiny_model_dir: Path,
    two_client_dir: Path,
    engine_two: Path,
    started: list[LocalFederation],
    tmp_path: Path,
) -> None:
    """SuperLink + 2 SuperNodes, 2 rounds, float32 on the wire: the engine's adapter."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_model_dir, two_client_dir, out)
    files = client_files(two_client_dir)
    federation = deploy(tmp_path, started, files, tls=security != "insecure")
    config = FlowerSettings(str(recipe), min_nodes=2, node_wait=120, round_timeout=300)
    result = run_app(federation.home / "cli", config, timeout=RUN_TIMEOUT)
    assert_ok(result, federation)
    check_matches_engine(out, engine_two, clients=[0, 1])


@pytest.mark.flower
def test_simulation_matches_the_engine(
    tiny_model_dir: Path, two_client_dir: Path, engine_two: Path, tmp_path: Path
) -> None:
    """`flwr run` on Flower's simulation runtime (Ray): the same adapter as the engine."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_model_dir, two_client_dir, out)
    home = tmp_path / "flower"
    config = FlowerSettings(str(recipe), min_nodes=2, node_wait=120, round_timeout=300)
    links: list[Service] = []
    ray_folders = set(Path("/tmp").glob("covey-ray-*"))
    result = simulate(home, config, nodes=2, timeout=RUN_TIMEOUT, extra_env=THREADS, services=links)
    assert_ok(result)
    assert links and not links[0].leftovers(), "the simulation left processes (Ray?) running"
    check_matches_engine(out, engine_two, clients=[0, 1])
    assert set(Path("/tmp").glob("covey-ray-*")) <= ray_folders, "Ray's folder was left"


@pytest.mark.flower
def test_a_supernode_killed_mid_run_is_dropped_and_the_run_finishes(
    tiny_model_dir: Path,
    client_data_dir: Path,
    started: list[LocalFederation],
    tmp_path: Path,
) -> None:
    """3 SuperNodes, min-nodes=2: SIGKILL one as round 2 starts; round 2 ends with the other
    two within the bounded wait, and the run completes."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_model_dir, client_data_dir, out)
    federation = deploy(tmp_path, started, client_files(client_data_dir), tls=False)
    round_timeout = 150.0
    config = FlowerSettings(str(recipe), min_nodes=2, node_wait=120, round_timeout=round_timeout)
    results: list[FlowerRun | BaseException] = []

    def submit() -> None:
        try:
            results.append(run_app(federation.home / "cli", config, timeout=RUN_TIMEOUT))
        except BaseException as e:  # reported by the main thread
            results.append(e)

    runner = threading.Thread(target=submit, daemon=True)
    runner.start()
    victim: Service = federation.supernodes[2]
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (out / "round_001" / "round.json").exists():
        assert runner.is_alive(), f"run ended before round 1: {results}"
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.1)
    victim.kill()
    killed_at = time.monotonic()
    runner.join(RUN_TIMEOUT)
    assert not runner.is_alive(), "the run hung after a SuperNode died"
    waited = time.monotonic() - killed_at
    result = results[0]
    if isinstance(result, BaseException):
        raise result
    assert_ok(result, federation)
    assert waited < round_timeout + 90, f"{waited:.0f} s after the kill"
    last = record(out, 2)
    assert last["selected"] == [0, 1, 2]
    assert [c["client"] for c in last["clients"]] == [0, 1]
    assert [f["client"] for f in last["failed"]] == [2]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert record(out, 1)["failed"] == [] and len(record(out, 1)["clients"]) == 3
    assert not victim.leftovers()


# --------------------------------------------------------------------------- the CLI


def covey_cli(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT) -> Any:
    import os
    import subprocess

    env = os.environ | THREADS
    return subprocess.run(
        [sys.executable, "-m", "covey", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_cli_makes_certificates_and_node_keys(tmp_path: Path) -> None:
    certs = covey_cli("flower", "certs", "certs", "--host", "10.0.0.5", cwd=tmp_path)
    assert certs.returncode == 0, certs.stderr
    assert {p.name for p in (tmp_path / "certs").iterdir()} == {
        "ca.crt",
        "server.pem",
        "server.key",
    }
    assert "10.0.0.5, 127.0.0.1, localhost" in certs.stdout
    keys = covey_cli("flower", "node-key", "keys", "--name", "client-3", cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    private = (tmp_path / "keys" / "client-3").read_text()
    assert (tmp_path / "keys" / "client-3.pub").is_file()
    assert "PRIVATE KEY" in private and private.strip() not in keys.stdout + keys.stderr
    bad = covey_cli("flower", "superlink", "--home", "h", cwd=tmp_path)
    assert bad.returncode == 2 and "pass either --certs DIR or --insecure" in bad.stderr


def superlink_option(name: str) -> click.Option:
    group = typer.main.get_command(flower_app)
    assert isinstance(group, click.Group)
    return next(p for p in group.commands["superlink"].params if p.name == name)  # type: ignore[misc]


def test_cli_superlink_defaults_to_loopback() -> None:
    """Reachable from other machines only when asked (--host 0.0.0.0 or an address)."""
    assert superlink_option("host").default == "127.0.0.1"


def listening_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for family, table in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if int(port_hex, 16) == port and state == "0A":  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, words))
    return found


@pytest.mark.flower
def test_cli_superlink_listens_on_loopback_only(tmp_path: Path) -> None:
    """`covey flower superlink` without --host: a real SuperLink bound to 127.0.0.1 alone;
    SIGTERM to covey stops it and its children."""
    import subprocess

    port = free_port()
    command = [sys.executable, "-m", "covey", "flower", "superlink", "--insecure"]
    command += ["--port", str(port), "--home", "home"]
    output = tmp_path / "output.txt"
    with output.open("w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while f"SuperLink on 127.0.0.1:{port}" not in output.read_text():
            assert process.poll() is None, f"covey exited:\n{output.read_text()}"
            assert time.monotonic() < deadline, "the SuperLink never became ready"
            time.sleep(0.2)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        process.terminate()
        process.wait(60)
    assert_plain(output.read_text())
    assert processes_mentioning(str(tmp_path / "home")) == [], "the SuperLink was left running"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def assert_plain(printed: str) -> None:
    """Output to a pipe: no escape codes, progress bars or library warnings (it is a log)."""
    assert "\x1b[" not in printed, "ANSI escape codes"
    assert "\r" not in printed and "Loading weights" not in printed, "a progress bar"
    assert "FutureWarning" not in printed and "warnings.warn" not in printed


@pytest.mark.flower
def test_cli_local_deployment_over_tls_matches_the_engine(
    tiny_model_dir: Path, two_client_dir: Path, engine_two: Path, tmp_path: Path
) -> None:
    """`covey flower local`: certificates, a SuperLink, one SuperNode per client file, the run,
    then everything stopped; the same adapter as the engine."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", tiny_model_dir, two_client_dir, out)
    result = covey_cli("flower", "local", str(recipe), "--round-timeout", "300", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 SuperNodes" in result.stdout and "final adapter" in result.stdout
    assert_plain(result.stdout + result.stderr)
    assert (out / "flower" / "certs" / "ca.crt").is_file()
    # Flower's state (certificates, logs, the SuperLink database) sits in the run folder
    check_matches_engine(out, engine_two, clients=[0, 1], extra=frozenset({"flower"}))
    assert processes_mentioning(str(out / "flower")) == [], "covey flower local left processes"
