"""FLock mode on an EVM chain: deploy or attach to the task contract and call it from Python.

`Chain.embedded()` runs an in-process EVM (eth-tester with py-evm: nothing to start, funded
test accounts, blocks mined on demand); `Chain.connect(url, key=...)` talks to any Ethereum
JSON-RPC endpoint. Both deploy `Token` and `FlockTask` from the committed artifacts.json (no
compiler needed) or attach to deployed addresses, expose every contract function as a typed
method, and record the gas of every transaction in `Chain.gas` (function name -> list of gas).

The protocol (see FlockTask.vy's header for the full rules): participants stake and join;
each round they commit and then reveal a random seed, the XOR of the revealed seeds drives a
Fisher-Yates draw of proposers and voters; proposers submit the sha2-256 digest of their
update's CID; voters commit to (accepts, score, salt) and then reveal, where bit i of `accepts`
is their verdict on the proposal of `proposers_of(round)[i]`; `finalize` (anyone, after the
reveal window) judges each proposal by stake-weighted vote (FLock's rule per proposal): the
round's reward (pool / rounds left) goes voter_reward_pct% (default 20) to the voters, by
weight times the verdicts they agreed with, and the rest to the accepted proposers pro rata to
stake; rejected proposers and anyone who did not reveal lose slash_pct% of their stake to the
pool, a voter the share of that for the verdicts it voted against. Rewards are pulled with `claim`;
stakes come back with `withdraw` after the last round (or `exit` while holding no role).

Trust assumptions, in short:
- Role draws: no single party picks the seed. The last participant to reveal can withhold its
  seed after seeing the others (one bit of influence), which costs it a slash and the round.
- Block producers can reorder and delay transactions but not choose the seed: XOR does not
  depend on order, and the shuffled list is fixed before any seed is revealed. Censoring a
  reveal for the whole reveal window equals that participant withholding; use windows long
  enough that no single producer controls them.
- Votes are hidden until the reveal phase; the outcome is what a stake-weighted majority of
  voters says (FLock's honest-majority assumption). Digests are not checked on chain.
- Keys: a `PrivateKey` from `covey.flock.keys` (a file or an environment variable); it signs
  locally and never appears in a repr, a log or an error.

On the embedded chain every transaction is mined in its own block, and views are evaluated as
of the block the next transaction will land in (so `phase()` tells what a call made now sees).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from enum import IntEnum
from functools import cached_property
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from eth_abi.abi import encode as abi_encode
from eth_typing import ChecksumAddress
from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted
from web3.types import BlockIdentifier, TxParams, TxReceipt

from covey.errors import ConfigError, CoveyError
from covey.flock.keys import PrivateKey

logger = logging.getLogger(__name__)

ARTIFACTS_PATH = Path(__file__).resolve().parent / "contracts" / "artifacts.json"
TOKEN_UNIT = 10**18  # the token has 18 decimals: 10 tokens are 10 * TOKEN_UNIT
MAX_PARTICIPANTS = 64  # the contract's hard cap (FlockTask.vy MAX_PARTICIPANTS)
EMBEDDED_GAS_LIMIT = 30_000_000


class ChainError(CoveyError):
    """The chain cannot be reached, or holds no such contract, or a transaction failed."""


class ContractRevert(ChainError):
    """A contract call reverted; `reason` is the contract's message (e.g. 'join: task is full')."""

    def __init__(self, function: str, reason: str) -> None:
        super().__init__(f"{function} reverted: {reason}")
        self.function = function
        self.reason = reason


class Phase(IntEnum):
    """FlockTask.phase(): what can be called now."""

    REGISTRATION = 0
    AWAIT_START = 1
    SEED_COMMIT = 2
    SEED_REVEAL = 3
    AWAIT_DRAW = 4
    PROPOSE = 5
    VOTE_COMMIT = 6
    VOTE_REVEAL = 7
    AWAIT_FINALIZE = 8
    ENDED = 9
    CANCELLED = 10


class Role(IntEnum):
    NONE = 0
    PROPOSER = 1
    VOTER = 2


class Outcome(IntEnum):
    PENDING = 0
    ACCEPTED = 1
    REJECTED = 2
    NO_PROPOSALS = 3
    NO_QUORUM = 4
    VOID = 5  # too few seed revealers to draw the roles


class SlashReason(IntEnum):
    SEED_NOT_REVEALED = 1
    NO_PROPOSAL = 2
    PROPOSAL_REJECTED = 3
    VOTE_NOT_REVEALED = 4
    LOSING_VOTE = 5


@dataclass(frozen=True)
class TaskParams:
    """A task's creation parameters, in the contract's `Params` order (amounts in token wei).

    The defaults follow FLock's demo: 10 tokens minimum stake, a 1000-token reward pool.
    """

    rounds: int = 3
    min_participants: int = 4
    max_participants: int = 16
    min_stake: int = 10 * TOKEN_UNIT
    reward_pool: int = 1000 * TOKEN_UNIT
    proposers_per_round: int = 1
    voters_per_round: int = 3
    slash_pct: int = 10
    threshold_pct: int = 50
    voter_reward_pct: int = 20
    registration_blocks: int = 20
    seed_commit_blocks: int = 10
    seed_reveal_blocks: int = 10
    propose_blocks: int = 10
    vote_commit_blocks: int = 10
    vote_reveal_blocks: int = 10

    def validate(self) -> None:
        """The constructor's checks, so a bad setting fails here with a flag-level message."""
        problems = []
        for f in fields(self):
            if getattr(self, f.name) < 0:
                problems.append(f"{f.name} must be >= 0")
        if self.rounds < 1:
            problems.append("rounds must be at least 1")
        if self.max_participants > MAX_PARTICIPANTS:
            problems.append(f"max_participants is capped at {MAX_PARTICIPANTS}")
        if self.min_participants > self.max_participants:
            problems.append("min_participants must not exceed max_participants")
        if self.proposers_per_round < 1 or self.voters_per_round < 1:
            problems.append("each round needs at least one proposer and one voter")
        if self.proposers_per_round + self.voters_per_round > self.min_participants:
            problems.append("proposers_per_round + voters_per_round must be <= min_participants")
        if self.min_stake < 1:
            problems.append("min_stake must be positive")
        if self.slash_pct > 100 or self.voter_reward_pct > 100:
            problems.append("slash_pct and voter_reward_pct are percentages (0..100)")
        if not 1 <= self.threshold_pct <= 100:
            problems.append("threshold_pct must be in 1..100")
        for f in fields(self):
            if f.name.endswith("_blocks") and getattr(self, f.name) < 1:
                problems.append(f"{f.name} must be at least 1")
        if problems:
            raise ConfigError("invalid task parameters: " + "; ".join(problems))

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)


@dataclass(frozen=True)
class Vote:
    commitment: bytes
    revealed: bool
    accepts: int  # bit i: accept the proposal of proposers_of(round)[i]
    score: int
    weight: int


@dataclass(frozen=True)
class Tally:
    revealed_stake: int  # the vote weight every proposal is judged against
    revealed_count: int
    score_sum: int


@dataclass(frozen=True)
class RoundResult:
    outcome: Outcome
    reward: int  # the round's reward budget: pool / rounds left, at finalize
    paid: int  # rewards credited in the round (the rest stays in the pool)
    slashed: int  # all the round's slashes, seed withholders' at the draw included
    accepted: int  # bit i: the proposal of proposers_of(round)[i] was accepted

    def accepted_proposers(self, proposers: Sequence[str]) -> list[str]:
        """The proposers (from `FlockTask.proposers_of(round)`) whose proposal was accepted."""
        return [p for i, p in enumerate(proposers) if self.accepted >> i & 1]


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


def new_secret() -> bytes:
    """32 random bytes for a seed or a vote salt (keep it until the reveal)."""
    return secrets.token_bytes(32)


def seed_commitment(seed: bytes, participant: str) -> bytes:
    """keccak256(abi_encode(seed, participant)), what commit_seed expects."""
    return keccak(abi_encode(["bytes32", "address"], [seed, to_checksum_address(participant)]))


def accept_mask(verdicts: Sequence[bool]) -> int:
    """A ballot's `accepts`: bit i set when verdicts[i] (the proposal of proposers_of(round)[i])."""
    return sum(1 << i for i, accept in enumerate(verdicts) if accept)


def vote_commitment(accepts: int, score: int, salt: bytes, voter: str) -> bytes:
    """keccak256(abi_encode(accepts, score, salt, voter)), what commit_vote expects.

    `accepts` is a bit mask over the round's proposers in draw order (see `accept_mask`).
    """
    return keccak(
        abi_encode(
            ["uint256", "uint64", "bytes32", "address"],
            [accepts, score, salt, to_checksum_address(voter)],
        )
    )


def load_artifacts(path: Path = ARTIFACTS_PATH) -> dict[str, Any]:
    """The compiled contracts: {'compiler': ..., 'contracts': {name: {abi, bytecode, ...}}}."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChainError(
            f"{path} is missing: run `python -m covey.flock.contracts.build`"
        ) from None
    return data


def _create_address(sender: str, nonce: int) -> str:
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


class Chain:
    """A connection to an EVM chain with the accounts that may sign, and a gas log."""

    def __init__(
        self,
        w3: Web3,
        *,
        signer: PrivateKey | None = None,
        tester: Any = None,
        receipt_timeout: float = 120.0,
    ) -> None:
        self.w3 = w3
        self.signer = signer
        self._tester = tester
        self.receipt_timeout = receipt_timeout
        self.gas: dict[str, list[int]] = defaultdict(list)
        self.artifacts = load_artifacts()
        self.label = "embedded" if tester is not None else "rpc"  # what repr shows

    def __repr__(self) -> str:
        signer = f", signer={self.signer.address}" if self.signer else ""
        return f"Chain({self.label}{signer})"

    @classmethod
    def embedded(cls, accounts: int = 10, *, gas_limit: int = EMBEDDED_GAS_LIMIT) -> Chain:
        """An in-process py-evm chain with `accounts` unlocked accounts holding 1M ETH each."""
        from eth_tester import EthereumTester, PyEVMBackend  # type: ignore[import-untyped]
        from web3 import EthereumTesterProvider

        backend = PyEVMBackend(
            genesis_parameters=PyEVMBackend.generate_genesis_params({"gas_limit": gas_limit}),
            genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts),
        )
        tester = EthereumTester(backend)
        return cls(Web3(EthereumTesterProvider(tester)), tester=tester)

    @classmethod
    def connect(cls, url: str, *, key: PrivateKey | None = None, timeout: float = 30.0) -> Chain:
        """An Ethereum JSON-RPC endpoint: an http(s) URL or the path of a node's IPC socket.

        With `key`, transactions are signed locally and sent raw; without, the node must hold
        unlocked accounts (a dev node such as anvil or hardhat).
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
        chain = cls(w3, signer=key)
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

    @property
    def call_block(self) -> BlockIdentifier:
        """Block views are evaluated at: the next one on the embedded chain, else the latest."""
        return "pending" if self.is_embedded else "latest"

    @cached_property
    def call_params(self) -> TxParams:
        """Fields of every eth_call (a sender, so that the node need not look one up)."""
        return {"from": self.accounts[0]} if self.accounts else {}

    @property
    def next_block(self) -> int:
        """The block number a transaction sent now is mined in (on the embedded chain)."""
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

    # ---------------------------------------------------------------- transactions

    def _send(
        self, name: str, call: ContractFunction | ContractConstructor, sender: str | None
    ) -> TxReceipt:
        """Send, wait for the receipt, record its gas; a revert becomes ContractRevert."""
        origin = to_checksum_address(sender) if sender else self.default_account
        tx: TxParams = {"from": origin}
        try:
            if self.signer is not None:
                if origin != self.signer.address:
                    raise ChainError(f"{name}: can only send from {self.signer.address}")
                tx["nonce"] = self.w3.eth.get_transaction_count(origin, "pending")
                filled = call.build_transaction(tx)
                raw = self.signer.sign_transaction(dict(filled))
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            else:
                if self.is_embedded:
                    # Each transaction gets its own block, so the block's gas limit is enough;
                    # an eth_call first surfaces a revert without mining it (what gas estimation
                    # does elsewhere, at a fraction of eth-tester's estimation cost).
                    tx["gas"] = EMBEDDED_GAS_LIMIT
                    if isinstance(call, ContractFunction):
                        call.call(tx, block_identifier="pending")
                tx_hash = call.transact(tx)
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout
            )
        except ChainError:
            raise
        except TimeExhausted:
            raise ChainError(
                f"{name}: no receipt within {self.receipt_timeout:.0f} s; the transaction may"
                " still be mined"
            ) from None
        except Exception as e:
            reason = _revert_reason(e)
            if reason is None:
                raise
            raise ContractRevert(name, reason) from None
        if receipt["status"] != 1:
            raise ContractRevert(name, self._replay_reason(receipt))
        gas_used = int(receipt["gasUsed"])
        self.gas[name].append(gas_used)
        logger.debug("%s from %s: gas %d, block %d", name, origin, gas_used, receipt["blockNumber"])
        return receipt

    def _replay_reason(self, receipt: TxReceipt) -> str:
        """Why a mined transaction failed: replay it as a call on the state before its block."""
        sent = self.w3.eth.get_transaction(receipt["transactionHash"])
        replay: TxParams = {"from": sent["from"], "data": sent["input"], "gas": sent["gas"]}
        if sent.get("to"):
            replay["to"] = sent["to"]
        failed = f"transaction 0x{bytes(receipt['transactionHash']).hex()} failed on chain"
        try:
            self.w3.eth.call(replay, receipt["blockNumber"] - 1)
        except Exception as e:
            reason = _revert_reason(e)
            return f"{reason} ({failed})" if reason else failed
        return f"{failed} (out of gas, or the state changed before it was mined)"

    def _factory(self, name: str) -> type[Contract]:
        art = self.artifacts["contracts"][name]
        return self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])

    def _contract(self, name: str, address: str) -> Contract:
        art = self.artifacts["contracts"][name]
        return self.w3.eth.contract(address=to_checksum_address(address), abi=art["abi"])

    def _check_code(self, address: str, what: str) -> ChecksumAddress:
        checksum = to_checksum_address(address)
        if not self.w3.eth.get_code(checksum):
            raise ChainError(f"no contract at {checksum} (expected a {what})")
        return checksum

    def deploy_token(
        self,
        supply: int = 1_000_000 * TOKEN_UNIT,
        *,
        name: str = "Covey Stake",
        symbol: str = "COVEY",
        sender: str | None = None,
    ) -> Token:
        """Deploy Covey's fixed-supply ERC-20; the whole supply goes to the sender."""
        factory = self._factory("Token")
        receipt = self._send("deploy Token", factory.constructor(name, symbol, supply), sender)
        return Token(self, str(receipt["contractAddress"]))

    def deploy_task(
        self, token: Token | str, params: TaskParams, *, sender: str | None = None
    ) -> FlockTask:
        """Approve the reward pool to the task's future address, then deploy the task.

        The constructor pulls the pool with transferFrom, so the deployer must hold it.
        """
        params.validate()
        token = token if isinstance(token, Token) else self.token(token)
        origin = to_checksum_address(sender) if sender else self.default_account
        nonce = int(self.w3.eth.get_transaction_count(origin, "pending"))
        if params.reward_pool > 0:
            future = _create_address(origin, nonce + 1)
            token.approve(future, params.reward_pool, sender=origin)
            nonce_now = int(self.w3.eth.get_transaction_count(origin, "pending"))
            if nonce_now != nonce + 1:
                raise ChainError(f"{origin} sent another transaction while deploying; deploy again")
        factory = self._factory("FlockTask")
        constructor = factory.constructor(token.address, params.as_tuple())
        receipt = self._send("deploy FlockTask", constructor, origin)
        return FlockTask(self, str(receipt["contractAddress"]), params=params)

    def token(self, address: str) -> Token:
        """Attach to a deployed ERC-20 (Covey's Token or any other)."""
        return Token(self, self._check_code(address, "ERC-20 token"))

    def task(self, address: str) -> FlockTask:
        """Attach to a deployed FlockTask."""
        return FlockTask(self, self._check_code(address, "FlockTask"))


class _Bound:
    """A contract at an address, with helpers shared by Token and FlockTask."""

    _artifact: str

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = to_checksum_address(address)
        self.contract = chain._contract(self._artifact, self.address)
        self._topics = {
            event_abi_to_log_topic(cast(Any, item)): item["name"]
            for item in self.contract.abi
            if item["type"] == "event"
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address})"

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return self.contract.functions[name](*args).call(block_identifier=self.chain.call_block)
        except Exception as e:
            reason = _revert_reason(e)
            if reason is None:
                raise
            raise ContractRevert(name, reason) from None

    def _tx(self, name: str, *args: Any, sender: str | None = None) -> TxResult:
        receipt = self.chain._send(name, self.contract.functions[name](*args), sender)
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

    def events(self, name: str, from_block: int = 0) -> list[dict[str, Any]]:
        """The args of every `name` event this contract emitted since `from_block`."""
        logs = self.contract.events[name].get_logs(from_block=from_block)
        return [dict(log["args"]) for log in logs]


class Token(_Bound):
    """An ERC-20 (Covey's Token, or any token the task was created with)."""

    _artifact = "Token"

    def name(self) -> str:
        return str(self._call("name"))

    def symbol(self) -> str:
        return str(self._call("symbol"))

    def decimals(self) -> int:
        return int(self._call("decimals"))

    def total_supply(self) -> int:
        return int(self._call("totalSupply"))

    def balance_of(self, who: str) -> int:
        return int(self._call("balanceOf", to_checksum_address(who)))

    def allowance(self, owner: str, spender: str) -> int:
        return int(
            self._call("allowance", to_checksum_address(owner), to_checksum_address(spender))
        )

    def transfer(self, to: str, amount: int, *, sender: str | None = None) -> TxResult:
        return self._tx("transfer", to_checksum_address(to), amount, sender=sender)

    def transfer_from(
        self, owner: str, to: str, amount: int, *, sender: str | None = None
    ) -> TxResult:
        args = (to_checksum_address(owner), to_checksum_address(to), amount)
        return self._tx("transferFrom", *args, sender=sender)

    def approve(self, spender: str, amount: int, *, sender: str | None = None) -> TxResult:
        return self._tx("approve", to_checksum_address(spender), amount, sender=sender)


class FlockTask(_Bound):
    """A deployed FlockTask: one typed method per contract function."""

    _artifact = "FlockTask"

    def __init__(self, chain: Chain, address: str, *, params: TaskParams | None = None) -> None:
        super().__init__(chain, address)
        if params is not None:
            self.__dict__["params"] = params

    @cached_property
    def params(self) -> TaskParams:
        """The creation parameters (read once: they are immutable on chain)."""
        return TaskParams(*self._call("params"))

    @cached_property
    def token(self) -> Token:
        return Token(self.chain, str(self._call("token")))

    # ---------------------------------------------------------------- views

    def creator(self) -> str:
        return str(self._call("creator"))

    def registration_end(self) -> int:
        return int(self._call("registration_end"))

    def phase(self) -> Phase:
        return Phase(self._call("phase"))

    def phase_end(self) -> int:
        """First block outside the current timed phase; 0 when the phase waits for a call."""
        return int(self._call("phase_end"))

    def current_round(self) -> int:
        return int(self._call("current_round"))

    def stage_start(self) -> int:
        return int(self._call("stage_start"))

    def pool(self) -> int:
        return int(self._call("pool"))

    def round_reward(self) -> int:
        return int(self._call("round_reward"))

    def total_staked(self) -> int:
        return int(self._call("total_staked"))

    def total_unclaimed(self) -> int:
        return int(self._call("total_unclaimed"))

    def participants(self) -> list[str]:
        return [str(a) for a in self._call("get_participants")]

    def participant_count(self) -> int:
        return int(self._call("participant_count"))

    def joined(self, who: str) -> bool:
        return bool(self._call("joined", to_checksum_address(who)))

    def stake_of(self, who: str) -> int:
        return int(self._call("stakes", to_checksum_address(who)))

    def reward_of(self, who: str) -> int:
        """Rewards credited and not yet claimed."""
        return int(self._call("rewards", to_checksum_address(who)))

    def seed_status(self, round_: int, who: str) -> tuple[bytes, bool]:
        commitment, revealed = self._call("seed_status", round_, to_checksum_address(who))
        return bytes(commitment), bool(revealed)

    def round_seed(self, round_: int) -> bytes:
        return bytes(self._call("round_seed", round_))

    def role_of(self, round_: int, who: str) -> Role:
        return Role(self._call("role_of", round_, to_checksum_address(who)))

    def proposers_of(self, round_: int) -> list[str]:
        return [str(a) for a in self._call("proposers_of", round_)]

    def voters_of(self, round_: int) -> list[str]:
        return [str(a) for a in self._call("voters_of", round_)]

    def proposals(self, round_: int) -> list[tuple[str, bytes]]:
        """(proposer, digest) for each proposer of the round that submitted, in draw order."""
        who, digests = self._call("proposals", round_)
        return [(str(a), bytes(d)) for a, d in zip(who, digests, strict=True)]

    def proposal_count(self, round_: int) -> int:
        return int(self._call("proposal_count", round_))

    def vote_of(self, round_: int, who: str) -> Vote:
        vote = self._call("vote_of", round_, to_checksum_address(who))
        c, revealed, accepts, score, weight = vote
        return Vote(bytes(c), bool(revealed), int(accepts), int(score), int(weight))

    def tally(self, round_: int) -> Tally:
        return Tally(*(int(x) for x in self._call("tally", round_)))

    def result(self, round_: int) -> RoundResult:
        outcome, reward, paid, slashed, accepted = self._call("result", round_)
        return RoundResult(Outcome(outcome), int(reward), int(paid), int(slashed), int(accepted))

    # ---------------------------------------------------------------- transactions

    def join(self, amount: int, *, sender: str | None = None, approve: bool = True) -> TxResult:
        """Stake `amount` and register; approves the task for `amount` first unless told not to."""
        who = to_checksum_address(sender) if sender else self.chain.default_account
        if approve and self.token.allowance(who, self.address) < amount:
            self.token.approve(self.address, amount, sender=who)
        return self._tx("join", amount, sender=who)

    def start(self, *, sender: str | None = None) -> TxResult:
        return self._tx("start", sender=sender)

    def commit_seed(self, commitment: bytes, *, sender: str | None = None) -> TxResult:
        return self._tx("commit_seed", commitment, sender=sender)

    def reveal_seed(self, seed: bytes, *, sender: str | None = None) -> TxResult:
        return self._tx("reveal_seed", seed, sender=sender)

    def draw_roles(self, *, sender: str | None = None) -> TxResult:
        return self._tx("draw_roles", sender=sender)

    def propose(self, digest: bytes, *, sender: str | None = None) -> TxResult:
        """Submit the sha2-256 digest of the update's CID (the multihash digest bytes)."""
        return self._tx("propose", digest, sender=sender)

    def commit_vote(self, commitment: bytes, *, sender: str | None = None) -> TxResult:
        return self._tx("commit_vote", commitment, sender=sender)

    def reveal_vote(
        self, accepts: int, score: int, salt: bytes, *, sender: str | None = None
    ) -> TxResult:
        """Open a committed vote: `accepts` bit i judges the proposal of proposers_of(round)[i]."""
        return self._tx("reveal_vote", accepts, score, salt, sender=sender)

    def finalize(self, *, sender: str | None = None) -> TxResult:
        return self._tx("finalize", sender=sender)

    def claim(self, *, sender: str | None = None) -> TxResult:
        return self._tx("claim", sender=sender)

    def withdraw(self, *, sender: str | None = None) -> TxResult:
        return self._tx("withdraw", sender=sender)

    def exit(self, *, sender: str | None = None) -> TxResult:
        return self._tx("exit", sender=sender)

    def reclaim_pool(self, *, sender: str | None = None) -> TxResult:
        return self._tx("reclaim_pool", sender=sender)

    # ---------------------------------------------------------------- helpers

    def skip_phase(self) -> Phase:
        """Mine to the end of the current timed phase (embedded chain); returns the new phase."""
        end = self.phase_end()
        if end:
            self.chain.advance_to(end)
        return self.phase()

    def advance_to_phase(self, phase: Phase) -> None:
        """Mine until `phase` begins (embedded chain).

        Only timed phases are reached by mining: ChainError if a call (start, draw_roles,
        finalize) must come first, or if `phase` is behind the current one.
        """
        current = self.phase()
        if current == phase:
            return
        p = self.params
        seeding = {
            Phase.SEED_REVEAL: p.seed_commit_blocks,
            Phase.AWAIT_DRAW: p.seed_commit_blocks + p.seed_reveal_blocks,
        }
        voting = {
            Phase.VOTE_COMMIT: p.propose_blocks,
            Phase.VOTE_REVEAL: p.propose_blocks + p.vote_commit_blocks,
            Phase.AWAIT_FINALIZE: p.propose_blocks + p.vote_commit_blocks + p.vote_reveal_blocks,
        }
        if current == Phase.REGISTRATION and phase == Phase.AWAIT_START:
            target = self.registration_end()
        elif (
            current < phase
            and current in (Phase.SEED_COMMIT, Phase.SEED_REVEAL)
            and phase in seeding
        ):
            target = self.stage_start() + seeding[phase]
        elif (
            current < phase and Phase.PROPOSE <= current < Phase.AWAIT_FINALIZE and phase in voting
        ):
            target = self.stage_start() + voting[phase]
        else:
            raise ChainError(f"cannot mine from phase {current.name} to {phase.name}")
        self.chain.advance_to(target)


def commit_seeds(
    task: FlockTask, participants: Sequence[str], seeds: Sequence[bytes] | None = None
) -> dict[str, bytes]:
    """Commit a fresh (or given) seed for each participant; returns the seeds to reveal."""
    chosen = list(seeds) if seeds is not None else [new_secret() for _ in participants]
    out: dict[str, bytes] = {}
    for who, seed in zip(participants, chosen, strict=True):
        task.commit_seed(seed_commitment(seed, who), sender=who)
        out[to_checksum_address(who)] = seed
    return out
