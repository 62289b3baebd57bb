"""The chain client and key handling: embedded chain, JSON-RPC connect, gas log, secrecy of keys.

`Chain.connect` is exercised against a small JSON-RPC server over HTTP in a thread, backed by
its own eth-tester chain, so the real HTTP provider, local signing and raw sends are used.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import traceback
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode

from covey.errors import ConfigError
from covey.flock.chain import Chain, ChainError, ContractRevert
from covey.flock.commitments import seed_commitment
from covey.flock.keys import PrivateKey, load_private_key
from covey.flock.params import TOKEN_UNIT, TaskParams
from covey.flock.task import FlockTask, Phase, PhaseError, Token
from tests.flock import BUNDLE, SMALL, fixed_seed

# eth-tester's first genesis account: funded on every embedded chain
KEY_HEX = "0x" + "00" * 31 + "01"
KEY_ADDRESS = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
# a key that must never appear anywhere
SECRET_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def write_key(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


# ---------------------------------------------------------------- keys (no chain needed)


def test_key_loads_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = load_private_key(write_key(tmp_path / "key", f"  {KEY_HEX}\n"))
    assert from_file.address == KEY_ADDRESS
    monkeypatch.setenv("COVEY_PRIVATE_KEY", KEY_HEX[2:])
    assert load_private_key() == from_file
    monkeypatch.setenv("OTHER_KEY", SECRET_HEX)
    assert load_private_key(env="OTHER_KEY").address != KEY_ADDRESS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SECRET_HEX[:-2], "expected 64 hex digits"),
        (SECRET_HEX[:-1] + "z", "not a hex string"),
        ("00" * 32, "out of range"),
        ("", "expected 64 hex digits"),
    ],
)
def test_bad_key_errors_do_not_quote_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_private_key(write_key(tmp_path / "key", text))
    shown = "".join(traceback.format_exception(info.value))
    assert SECRET_HEX[:16] not in shown and SECRET_HEX[-16:] not in shown


def test_missing_key_says_where_keys_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COVEY_PRIVATE_KEY", raising=False)
    with pytest.raises(ConfigError, match="set the environment variable COVEY_PRIVATE_KEY"):
        load_private_key()
    with pytest.raises(ConfigError, match="does not exist"):
        load_private_key(tmp_path / "nope")


def test_key_never_shows_in_repr_str_or_pickle() -> None:
    key = PrivateKey.from_hex(SECRET_HEX)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert SECRET_HEX not in text.lower()
        assert key.address in text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        vars(key)
    with pytest.raises(AttributeError):
        key.address = "0x0"  # type: ignore[misc]


def test_task_params_validate_names_each_problem() -> None:
    SMALL.validate()
    bad = TaskParams(rounds=0, threshold_pct=0, slash_pct=101, propose_commit_blocks=0)
    with pytest.raises(ConfigError) as info:
        bad.validate()
    for part in ("rounds", "threshold_pct", "slash_pct", "propose_commit_blocks"):
        assert part in str(info.value)


# ---------------------------------------------------------------- embedded chain


@pytest.fixture(scope="module")
def chain() -> Chain:
    return Chain.embedded(accounts=4)


@pytest.mark.chain
def test_embedded_chain_blocks_and_snapshots(chain: Chain) -> None:
    assert len(chain.accounts) == 4 and chain.is_embedded
    assert chain.eth_balance(chain.accounts[1]) > 0
    snap = chain.snapshot()
    start = chain.block_number
    chain.mine(5)
    assert chain.block_number == start + 5
    chain.advance_to(start + 20)
    assert chain.next_block == start + 20
    chain.advance_to(start)  # never goes back
    assert chain.next_block == start + 20
    chain.revert(snap)
    assert chain.block_number == start


@pytest.mark.chain
def test_gas_is_recorded_per_function_and_reverts_carry_the_reason(chain: Chain) -> None:
    snap = chain.snapshot()
    chain.gas.clear()
    token = Token.deploy(chain, 1000 * TOKEN_UNIT)
    result = token.transfer(chain.accounts[1], 5, sender=chain.accounts[0])
    assert result.gas_used == chain.gas["transfer"][0] > 21_000
    assert result.named("Transfer") == [
        {"sender": chain.accounts[0], "receiver": chain.accounts[1], "value": 5}
    ]
    token.approve(chain.accounts[2], 1, sender=chain.accounts[0])
    assert set(chain.gas) == {"deploy Token", "transfer", "approve"}
    before = chain.block_number
    with pytest.raises(ContractRevert, match="token: transfer amount exceeds balance") as info:
        token.transfer(chain.accounts[0], 6, sender=chain.accounts[1])
    assert info.value.function == "transfer"
    assert chain.block_number == before  # a revert is not mined on the embedded chain
    assert len(chain.gas["transfer"]) == 1  # nor counted
    chain.revert(snap)


@pytest.mark.chain
def test_attach_to_deployed_contracts(chain: Chain) -> None:
    snap = chain.snapshot()
    token = Token.deploy(chain, 10_000 * TOKEN_UNIT)
    task = FlockTask.deploy(chain, token, SMALL, BUNDLE)
    again = FlockTask.attach(chain, task.address)
    assert again.params == SMALL
    assert again.token.address == token.address
    assert again.creator() == chain.accounts[0]
    assert again.phase() == Phase.REGISTRATION
    assert Token.attach(chain, token.address).balance_of(task.address) == SMALL.reward_pool
    with pytest.raises(ChainError, match="no contract at"):
        FlockTask.attach(chain, chain.accounts[3])
    with pytest.raises(ChainError, match="works only on the embedded chain"):
        Chain(chain.w3).mine()
    chain.revert(snap)


# ---------------------------------------------------------------- JSON-RPC endpoint


class _RpcHandler(BaseHTTPRequestHandler):
    """JSON-RPC over HTTP in front of an in-process eth-tester chain, errors as geth sends them."""

    backend: Any
    lock = threading.Lock()

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            try:
                response = dict(self.backend(request["method"], request["params"]))
            except Exception as e:
                message = str(e)
                error: dict[str, Any] = {"code": -32000, "message": message}
                if message.startswith("execution reverted: "):
                    reason = message.removeprefix("execution reverted: ")
                    data = bytes.fromhex("08c379a0") + abi_encode(["string"], [reason])
                    error = {"code": 3, "message": message, "data": "0x" + data.hex()}
                response = {"error": error}
        response |= {"jsonrpc": "2.0", "id": request["id"]}
        from web3 import Web3

        body = Web3.to_json(response).encode()  # type: ignore[arg-type]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def rpc_url() -> Iterator[str]:
    inner = Chain.embedded(accounts=2).w3
    # fund the secret key's account: the tests connect with that key
    secret_address = PrivateKey.from_hex(SECRET_HEX).address
    inner.eth.send_transaction(
        {"from": inner.eth.accounts[0], "to": secret_address, "value": 10**21}
    )
    handler = type("Handler", (_RpcHandler,), {})
    handler.backend = staticmethod(inner.provider.request_func(inner, inner.middleware_onion))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.chain
def test_connect_signs_locally_and_never_logs_the_key(
    rpc_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVEY_PRIVATE_KEY", SECRET_HEX)
    key = load_private_key()
    me = key.address
    caplog.set_level(logging.DEBUG)
    chain = Chain.connect(rpc_url, key=key)
    assert not chain.is_embedded and chain.accounts == [me]
    token = Token.deploy(chain, 5000 * TOKEN_UNIT)
    task = FlockTask.deploy(chain, token, SMALL, BUNDLE)
    assert task.token.balance_of(task.address) == SMALL.reward_pool
    task.join("http://127.0.0.1:8000")
    assert task.participants() == [me]
    # the node's gas estimate carries the contract's reason
    with pytest.raises(ContractRevert, match="join: already joined") as info:
        task.join()
    # the client checks the phase of the block the transaction would land in before sending
    with pytest.raises(PhaseError, match="commit_seed needs SEED_COMMIT"):
        task.commit_seed(seed_commitment(fixed_seed(0, me), me))
    assert set(chain.gas) == {"deploy Token", "approve", "deploy FlockTask", "join"}
    with pytest.raises(ChainError, match="can only send from"):
        token.transfer(me, 1, sender="0x" + "11" * 20)
    with pytest.raises(ChainError, match="works only on the embedded chain"):
        chain.mine()

    key_text = SECRET_HEX
    shown = [repr(chain), str(chain), repr(task), str(info.value), caplog.text]
    shown += [str(r.args) for r in caplog.records]
    assert caplog.records, "expected debug logs to check"
    for text in shown:
        assert key_text not in text.lower()


@pytest.mark.chain
def test_window_edges_are_checked_and_failed_transactions_explained(rpc_url: str) -> None:
    """On a node, a transaction lands in a later block than the latest one: the client refuses
    to send one that would land too close to its window's end, and a transaction that failed
    anyway is explained by replaying it in the block it was mined in (the phase changed there;
    on the block before, the same call succeeds)."""
    key = PrivateKey.from_hex(SECRET_HEX)
    me = key.address
    chain = Chain.connect(rpc_url, key=key, margin_blocks=1)
    token = Token.deploy(chain, 5000 * TOKEN_UNIT)
    task = FlockTask.deploy(chain, token, replace(SMALL, registration_blocks=5), BUNDLE)
    token.approve(task.address, 10 * TOKEN_UNIT)
    end = task.registration_end()
    while chain.block_number < end - 2:
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    # latest = end - 2: the next block is the last of REGISTRATION, but with a block to spare
    # the transaction might land in AWAIT_START
    with pytest.raises(PhaseError, match="join needs REGISTRATION or SEED_COMMIT with 1 block"):
        task.join(approve=False)
    chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    assert chain.block_number == end - 1
    # sent regardless (fixed gas, no estimate): mined in block `end`, after registration closed
    tx = task.contract.functions.join("").build_transaction(
        {"from": me, "gas": 400_000, "nonce": chain.w3.eth.get_transaction_count(me)}
    )
    tx_hash = chain.w3.eth.send_raw_transaction(key.sign_transaction(dict(tx)))
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 0 and receipt["blockNumber"] == end
    reason = chain._failure_reason(receipt)
    assert reason.startswith("join: only in REGISTRATION or SEED_COMMIT (transaction 0x")
    assert f"in block {end}" in reason


def test_connect_rejects_unknown_schemes_and_unreachable_nodes() -> None:
    with pytest.raises(ConfigError, match="http"):
        Chain.connect("ws://127.0.0.1:8546")
    with pytest.raises(ChainError, match="cannot reach") as info:
        Chain.connect("http://user:pw@127.0.0.1:9/v3/API-KEY-123?key=abc", timeout=2)
    assert "http://127.0.0.1:9" in str(info.value)
    for secret in ("pw", "API-KEY-123", "abc"):
        assert secret not in str(info.value)
