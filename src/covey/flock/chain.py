"""Talking to an EVM chain: connect, send transactions, explain reverts, read events.

`Chain.embedded()` runs an in-process EVM (eth-tester with py-evm: nothing to start, funded
test accounts, one block mined per transaction or on demand); `Chain.connect(url, key=...)`
talks to any Ethereum JSON-RPC endpoint. A `Chain` sends transactions (signed locally with a
`covey.flock.keys.PrivateKey`, or by the node's unlocked accounts), waits for the receipt,
turns a revert into `ContractRevert` carrying the contract's own reason string, records the gas
of every transaction in `Chain.gas` (label -> list of gas) and reads event logs in bounded
block ranges (public providers refuse unbounded log queries). `BoundContract` is the base of
the typed contract wrappers in `covey.flock.task`.

Blocks and time: the embedded chain mines a block per transaction, and `mine`/`advance_to`
move it on; its block hashes are reproducible (a fixed clock of EMBEDDED_BLOCK_TIME_S per block
and a prevrandao derived from the block number, where eth-tester takes the wall clock and
os.urandom), so a simulation draws the same roles every run. A real node mines by time; there
a transaction lands in a later block than the latest one, so `margin_blocks` (default 1) is how
many blocks of slack the task wrapper wants before a phase ends.

Keys never appear in a repr, a log or an error; an RPC URL shows as scheme://host:port only,
since its path and query often hold an API key.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from eth_typing import ChecksumAddress
from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractLogicError, MethodUnavailable, TimeExhausted
from web3.types import BlockIdentifier, RPCEndpoint, TxParams, TxReceipt

from covey.errors import ConfigError, CoveyError
from covey.flock.keys import PrivateKey

logger = logging.getLogger(__name__)

ARTIFACTS_PATH = Path(__file__).resolve().parent / "contracts" / "artifacts.json"
EMBEDDED_GAS_LIMIT = 30_000_000
EMBEDDED_GENESIS_TIME = 1_700_000_000
EMBEDDED_BLOCK_TIME_S = 12
DEFAULT_LOG_RANGE = 1_000  # blocks per eth_getLogs request; providers cap it (often 1k-10k)
GAS_HEADROOM = 1.25  # sent gas limit = estimate x this (state can move between estimate and mining)


class ChainError(CoveyError):
    """The chain cannot be reached, or holds no such contract, or a transaction failed."""


class ContractRevert(ChainError):
    """A contract call reverted; `reason` is the contract's message (e.g. 'join: task is full')."""

    def __init__(self, function: str, reason: str) -> None:
        super().__init__(f"{function} reverted: {reason}")
        self.function = function
        self.reason = reason


@dataclass(frozen=True)
class Event:
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction: its gas and the events it emitted, decoded."""

    function: str
    tx_hash: str
    block: int
    gas_used: int
    events: tuple[Event, ...]

    def named(self, name: str) -> list[dict[str, Any]]:
        """The args of every event called `name`, in log order."""
        return [e.args for e in self.events if e.name == name]


def load_artifacts(path: Path = ARTIFACTS_PATH) -> dict[str, Any]:
    """The compiled contracts: {'compiler': ..., 'contracts': {name: {abi, bytecode, ...}}}."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChainError(
            f"{path} is missing: run `python -m covey.flock.contracts.build`"
        ) from None
    return data


def contract_address(sender: str, nonce: int) -> ChecksumAddress:
    """The address a contract deployed by `sender` with `nonce` gets (RLP of [sender, nonce])."""
    nonce_bytes = nonce.to_bytes((nonce.bit_length() + 7) // 8, "big")
    if len(nonce_bytes) == 1 and nonce_bytes[0] < 0x80:
        nonce_item = nonce_bytes
    else:
        nonce_item = bytes([0x80 + len(nonce_bytes)]) + nonce_bytes
    payload = bytes([0x80 + 20]) + bytes.fromhex(sender[2:]) + nonce_item
    return to_checksum_address(keccak(bytes([0xC0 + len(payload)]) + payload)[12:])


def _redact(url: str) -> str:
    """scheme://host[:port] of an RPC URL: its path, query and user info often hold API keys."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return Path(url).name  # an IPC socket path: its file name is enough
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _revert_reason(error: Exception) -> str | None:
    """The contract's revert message in a web3 or eth-tester error, None if it is no revert."""
    if isinstance(error, ContractLogicError):
        text = error.message or str(error)
    elif type(error).__name__ == "TransactionFailed":  # eth_tester.exceptions, untyped
        text = str(error)
    else:
        return None
    prefix = "execution reverted: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _estimate_gas(call: ContractFunction | ContractConstructor, tx: TxParams) -> int:
    """Gas estimated in the block the transaction lands in (phases depend on its number),
    or in the node's default block where the node takes no block for eth_estimateGas."""
    try:
        return int(call.estimate_gas(tx, block_identifier="pending"))
    except MethodUnavailable:
        return int(call.estimate_gas(tx))


def _reproducible_backend(accounts: int, gas_limit: int) -> Any:
    """eth-tester's py-evm backend with block hashes that depend on the transactions alone."""
    from eth.vm.forks.cancun.state import get_total_blob_gas
    from eth_tester import PyEVMBackend  # type: ignore[import-untyped]

    class ReproducibleBackend(PyEVMBackend):  # type: ignore[misc]
        def mine_blocks(self, num_blocks: int = 1, coinbase: bytes = b"\0" * 20) -> tuple[Any]:
            mined = []
            for _ in range(num_blocks):
                head = self.chain.get_canonical_head()
                number = head.block_number + 1
                block = self.chain.mine_block(
                    coinbase=coinbase,
                    timestamp=head.timestamp + EMBEDDED_BLOCK_TIME_S,
                    mix_hash=keccak(b"covey prevrandao %d" % number),
                    blob_gas_used=sum(
                        get_total_blob_gas(tx) for tx in self.chain.get_block().transactions
                    ),
                )
                mined.append(block.hash)
            return tuple(mined)

    genesis = PyEVMBackend.generate_genesis_params(
        {"gas_limit": gas_limit, "timestamp": EMBEDDED_GENESIS_TIME}
    )
    return ReproducibleBackend(
        genesis_parameters=genesis,
        genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts),
    )


class Chain:
    """A connection to an EVM chain with the accounts that may sign, and a gas log."""

    def __init__(
        self,
        w3: Web3,
        *,
        signer: PrivateKey | None = None,
        tester: Any = None,
        receipt_timeout: float = 120.0,
        log_range: int = DEFAULT_LOG_RANGE,
        margin_blocks: int | None = None,
    ) -> None:
        if log_range < 1:
            raise ConfigError(f"log_range must be at least 1 block (got {log_range})")
        self.w3 = w3
        self.signer = signer
        self._tester = tester
        self.receipt_timeout = receipt_timeout
        self.log_range = log_range
        # the embedded chain mines the next transaction in exactly the next block
        self.margin_blocks = margin_blocks if margin_blocks is not None else (0 if tester else 1)
        self.gas: dict[str, list[int]] = defaultdict(list)
        self.artifacts = load_artifacts()
        self.label = "embedded" if tester is not None else "rpc"  # what repr shows

    def __repr__(self) -> str:
        signer = f", signer={self.signer.address}" if self.signer else ""
        return f"Chain({self.label}{signer})"

    @classmethod
    def embedded(cls, accounts: int = 10, *, gas_limit: int = EMBEDDED_GAS_LIMIT) -> Chain:
        """An in-process py-evm chain with `accounts` unlocked accounts holding 1M ETH each."""
        from eth_tester import EthereumTester
        from web3 import EthereumTesterProvider

        tester = EthereumTester(_reproducible_backend(accounts, gas_limit))
        return cls(Web3(EthereumTesterProvider(tester)), tester=tester)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        key: PrivateKey | None = None,
        timeout: float = 30.0,
        log_range: int = DEFAULT_LOG_RANGE,
        margin_blocks: int = 1,
    ) -> Chain:
        """An Ethereum JSON-RPC endpoint: an http(s) URL or the path of a node's IPC socket.

        With `key`, transactions are signed locally and sent raw; without, the node must hold
        unlocked accounts (a dev node such as anvil). `log_range` caps the blocks of one log
        query; `margin_blocks` is the slack wanted before a phase window ends.
        """
        from web3 import HTTPProvider, IPCProvider
        from web3.middleware import ExtraDataToPOAMiddleware

        provider: HTTPProvider | IPCProvider
        if url.startswith(("http://", "https://")):
            provider = HTTPProvider(url, request_kwargs={"timeout": timeout})
        elif url.endswith(".ipc") or Path(url).is_socket():
            provider = IPCProvider(url, timeout=int(timeout))
        else:
            raise ConfigError(
                f"chain URL {_redact(url)}: use an http(s):// URL or the path of a node's .ipc"
                " socket"
            )
        # web3 asks for the chain id before every transaction; it never changes for an endpoint
        provider.cache_allowed_requests = True
        provider.cacheable_requests = {RPCEndpoint("eth_chainId")}
        w3 = Web3(provider)
        # proof-of-authority chains (many testnets, L2s) carry long extraData in block headers
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        where = _redact(url)
        try:
            w3.eth.chain_id  # noqa: B018 (a request that fails fast if nothing answers)
        except Exception as e:
            # the error's text may repeat the URL, whose path often holds an API key
            raise ChainError(
                f"cannot reach an Ethereum JSON-RPC endpoint at {where} ({type(e).__name__})"
            ) from None
        chain = cls(w3, signer=key, log_range=log_range, margin_blocks=margin_blocks)
        chain.label = f"rpc {where}"
        return chain

    # ---------------------------------------------------------------- accounts and blocks

    @property
    def is_embedded(self) -> bool:
        return self._tester is not None

    @cached_property
    def accounts(self) -> list[ChecksumAddress]:
        """Who can send: the signer's address, or else the node's (or test chain's) accounts."""
        if self.signer is not None:
            return [self.signer.address]
        try:
            return [to_checksum_address(a) for a in self.w3.eth.accounts]
        except Exception:  # public endpoints refuse eth_accounts: no account, then
            logger.debug("eth_accounts refused by %s", self.label)
            return []

    @property
    def default_account(self) -> ChecksumAddress:
        if not self.accounts:
            raise ChainError("no account to send from: pass a key (file or environment variable)")
        return self.accounts[0]

    @property
    def block_number(self) -> int:
        """The latest mined block."""
        return int(self.w3.eth.block_number)

    def seconds_per_block(self, sample: int = 16) -> float:
        """The chain's recent pace: mean seconds between the last `sample` blocks (0.0 on the
        embedded chain, where no time passes between blocks, or when too few exist)."""
        if self.is_embedded:
            return 0.0
        latest = self.block_number
        first = max(0, latest - sample)
        if latest == first:
            return 0.0
        then = int(self.w3.eth.get_block(first)["timestamp"])
        now = int(self.w3.eth.get_block(latest)["timestamp"])
        return max(0.0, (now - then) / (latest - first))

    @property
    def call_block(self) -> BlockIdentifier:
        """Block views are evaluated at: the next one on the embedded chain, else the latest."""
        return "pending" if self.is_embedded else "latest"

    @property
    def next_block(self) -> int:
        """The earliest block a transaction sent now can land in (exactly it, when embedded)."""
        return self.block_number + 1

    def _require_embedded(self, what: str) -> Any:
        if self._tester is None:
            raise ChainError(f"{what} works only on the embedded chain")
        return self._tester

    def mine(self, blocks: int = 1) -> None:
        """Mine empty blocks (embedded chain only)."""
        if blocks > 0:
            self._require_embedded("mine").mine_blocks(blocks)

    def advance_to(self, block: int) -> None:
        """Mine until the next transaction lands in block `block` or later (embedded only)."""
        self.mine(block - self.next_block)

    def snapshot(self) -> int:
        """Remember the embedded chain's state, to go back to with `revert`."""
        return int(self._require_embedded("snapshot").take_snapshot())

    def revert(self, snapshot: int) -> None:
        self._require_embedded("revert").revert_to_snapshot(snapshot)

    def eth_balance(self, who: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(who)))

    # ---------------------------------------------------------------- contracts

    def factory(self, name: str) -> type[Contract]:
        """A deployable contract class for one of the artifacts ('Token', 'FlockTask')."""
        art = self.artifacts["contracts"][name]
        return self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])

    def contract(self, name: str, address: str) -> Contract:
        art = self.artifacts["contracts"][name]
        return self.w3.eth.contract(address=to_checksum_address(address), abi=art["abi"])

    def require_code(self, address: str, what: str) -> ChecksumAddress:
        """The checksummed address, or ChainError if no contract lives there."""
        checksum = to_checksum_address(address)
        if not self.w3.eth.get_code(checksum):
            raise ChainError(f"no contract at {checksum} (expected a {what})")
        return checksum

    # ---------------------------------------------------------------- transactions

    def send(
        self, label: str, call: ContractFunction | ContractConstructor, sender: str | None = None
    ) -> TxReceipt:
        """Send, wait for the receipt, record its gas; a revert becomes ContractRevert."""
        origin = to_checksum_address(sender) if sender else self.default_account
        if self.signer is not None and origin != self.signer.address:
            raise ChainError(f"{label}: can only send from {self.signer.address}")
        tx: TxParams = {"from": origin}
        try:
            if self.is_embedded:
                # Each transaction gets its own block, so the block's gas limit is enough;
                # an eth_call at the block it will land in first surfaces a revert without
                # mining it (what gas estimation does elsewhere, at a fraction of its cost).
                tx["gas"] = EMBEDDED_GAS_LIMIT
                if isinstance(call, ContractFunction):
                    call.call(tx, block_identifier="pending")
                tx_hash = call.transact(tx)
            else:
                tx["gas"] = int(_estimate_gas(call, tx) * GAS_HEADROOM)
                if self.signer is None:
                    tx_hash = call.transact(tx)
                else:
                    tx["nonce"] = self.w3.eth.get_transaction_count(origin, "pending")
                    raw = self.signer.sign_transaction(dict(call.build_transaction(tx)))
                    tx_hash = self.w3.eth.send_raw_transaction(raw)
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout
            )
        except ChainError:
            raise
        except TimeExhausted:
            raise ChainError(
                f"{label}: no receipt within {self.receipt_timeout:.0f} s; the transaction may"
                " still be mined"
            ) from None
        except Exception as e:
            reason = _revert_reason(e)
            if reason is None:
                raise
            raise ContractRevert(label, reason) from None
        if receipt["status"] != 1:
            raise ContractRevert(label, self._failure_reason(receipt))
        gas_used = int(receipt["gasUsed"])
        self.gas[label].append(gas_used)
        logger.debug(
            "%s from %s: gas %d, block %d", label, origin, gas_used, receipt["blockNumber"]
        )
        return receipt

    def _failure_reason(self, receipt: TxReceipt) -> str:
        """Why a mined transaction failed: replay it as a call in the block it was mined in
        (phase checks depend on the block number), then on the state before that block."""
        sent = self.w3.eth.get_transaction(receipt["transactionHash"])
        failed = f"transaction 0x{bytes(receipt['transactionHash']).hex()} failed on chain"
        if int(receipt["gasUsed"]) >= int(sent["gas"]):
            return f"{failed}: it ran out of gas (limit {sent['gas']})"
        replay: TxParams = {"from": sent["from"], "data": sent["input"], "gas": sent["gas"]}
        if sent.get("to"):
            replay["to"] = sent["to"]
        mined_in = int(receipt["blockNumber"])
        for block in (mined_in, mined_in - 1):
            try:
                self.w3.eth.call(replay, block)
            except Exception as e:
                reason = _revert_reason(e)
                if reason:
                    return f"{reason} ({failed} in block {mined_in})"
        return f"{failed} in block {mined_in}; replaying it does not revert"

    # ---------------------------------------------------------------- events

    def block_ranges(
        self, from_block: int, to_block: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """(first, last) block pairs covering from_block..to_block (default: latest), each at
        most `log_range` blocks long, so that every log query stays under providers' caps."""
        last = self.block_number if to_block is None else to_block
        for first in range(from_block, last + 1, self.log_range):
            yield first, min(first + self.log_range - 1, last)


class BoundContract:
    """A contract at an address, with calls, transactions and event reads in bounded ranges."""

    artifact: str

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = to_checksum_address(address)
        self.contract = chain.contract(self.artifact, self.address)
        self._topics = {
            event_abi_to_log_topic(cast(Any, item)): item["name"]
            for item in self.contract.abi
            if item["type"] == "event"
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address})"

    def call(self, name: str, *args: Any) -> Any:
        """A view, evaluated at `chain.call_block`; a revert becomes ContractRevert."""
        try:
            return self.contract.functions[name](*args).call(block_identifier=self.chain.call_block)
        except Exception as e:
            reason = _revert_reason(e)
            if reason is None:
                raise
            raise ContractRevert(name, reason) from None

    def transact(self, name: str, *args: Any, sender: str | None = None) -> TxResult:
        receipt = self.chain.send(name, self.contract.functions[name](*args), sender)
        return TxResult(
            function=name,
            tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
            block=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            events=tuple(self._decode(receipt)),
        )

    def _decode(self, receipt: TxReceipt) -> list[Event]:
        out = []
        for log in receipt["logs"]:
            if log["address"] != self.address or not log["topics"]:
                continue
            name = self._topics.get(bytes(log["topics"][0]))
            if name is None:
                continue
            data = self.contract.events[name].process_log(log)
            out.append(Event(name, dict(data["args"])))
        return out

    def events(
        self, name: str, from_block: int, to_block: int | None = None
    ) -> list[dict[str, Any]]:
        """The args of every `name` event this contract emitted in from_block..to_block
        (default: latest), read `chain.log_range` blocks at a time, in log order."""
        event = self.contract.events[name]
        out: list[dict[str, Any]] = []
        for first, last in self.chain.block_ranges(from_block, to_block):
            out += [dict(log["args"]) for log in event.get_logs(from_block=first, to_block=last)]
        return out
