"""The hashes FlockTask's commit-reveal steps expect, computed off chain.

Each commitment is keccak256 of the ABI encoding of what will be revealed plus the sender's
address, so a commitment cannot be replayed by another account. Keep the secret (seed or salt)
until the reveal: without it the commitment cannot be opened and the duty counts as missed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak


def new_secret() -> bytes:
    """32 random bytes for a seed or a salt (keep it until the reveal)."""
    return secrets.token_bytes(32)


def seed_commitment(seed: bytes, participant: str) -> bytes:
    """keccak256(abi_encode(seed, participant)), what commit_seed expects."""
    return keccak(abi_encode(["bytes32", "address"], [seed, to_checksum_address(participant)]))


def proposal_commitment(digest: bytes, salt: bytes, proposer: str) -> bytes:
    """keccak256(abi_encode(digest, salt, proposer)), what commit_proposal expects.

    `digest` is the sha2-256 digest inside the update's CID (`covey.store.cid.digest_of`).
    """
    return keccak(
        abi_encode(["bytes32", "bytes32", "address"], [digest, salt, to_checksum_address(proposer)])
    )


def accept_mask(verdicts: Sequence[bool]) -> int:
    """A ballot's `accepts`: bit i set when verdicts[i] (the proposal of proposers_of(round)[i])."""
    return sum(1 << i for i, accept in enumerate(verdicts) if accept)


def vote_commitment(accepts: int, salt: bytes, voter: str) -> bytes:
    """keccak256(abi_encode(accepts, salt, voter)), what commit_vote expects.

    `accepts` is a bit mask over the round's proposers in draw order (see `accept_mask`).
    """
    return keccak(
        abi_encode(["uint256", "bytes32", "address"], [accepts, salt, to_checksum_address(voter)])
    )
