"""Content identifiers: an update is named by the hash of its bytes, as IPFS names files.

A CID here is CIDv1 with the `raw` codec and a sha2-256 multihash, written in base32
(`bafkrei...`): the same identifier `ipfs add --cid-version 1 --raw-leaves` gives a single-block
file, so updates can later move through IPFS unchanged. The 32-byte sha2-256 digest inside it is
what goes on chain (`bytes32`), and `cid_from_digest` turns it back into the CID.
"""

from __future__ import annotations

import hashlib

from multiformats import CID, multihash

from covey.errors import DataError


def cid_for(data: bytes) -> str:
    """The CIDv1 (raw, sha2-256, base32) of `data`."""
    return str(cid_from_digest(hashlib.sha256(data).digest()))


def cid_from_digest(digest: bytes) -> str:
    if len(digest) != 32:
        raise DataError(f"a sha2-256 digest has 32 bytes, got {len(digest)}")
    return str(CID("base32", 1, "raw", multihash.wrap(digest, "sha2-256")))


def digest_of(cid: str) -> bytes:
    """The raw sha2-256 digest inside a CID (the on-chain `bytes32`)."""
    try:
        parsed = CID.decode(cid)
    except Exception as e:  # multiformats raises several types for malformed input
        raise DataError(f"{cid!r} is not a CID ({e})") from None
    if parsed.hashfun.name != "sha2-256" or parsed.codec.name != "raw":
        raise DataError(
            f"{cid}: expected a raw sha2-256 CID, got {parsed.codec.name}/{parsed.hashfun.name}"
        )
    return bytes(multihash.unwrap(parsed.digest))


def verify(cid: str, data: bytes) -> None:
    """Raise unless `data` hashes to `cid`: nothing fetched from a peer is trusted unverified."""
    if hashlib.sha256(data).digest() != digest_of(cid):
        raise DataError(f"{cid}: the fetched bytes do not match their content hash; rejected")
