"""A content-addressed folder: `put` bytes, get them back by CID, verified on every read.

Stands in for IPFS on one machine (no IPFS daemon is packaged here): files are named by their
CID, written atomically, and re-hashed when read, so a corrupted or substituted file is refused.
"""

from __future__ import annotations

from pathlib import Path

from covey.atomic import atomic_write_bytes
from covey.errors import DataError
from covey.store.cid import cid_for, digest_of, verify


class LocalStore:
    """Content-addressed blobs under `root/<cid>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        cid = cid_for(data)
        path = self.root / cid
        if not path.exists():
            atomic_write_bytes(path, data)
        return cid

    def get(self, cid: str) -> bytes:
        digest_of(cid)  # a malformed CID is an error before any file access
        path = self.root / cid
        if not path.is_file():
            raise DataError(f"{cid}: not in the store at {self.root}")
        data = path.read_bytes()
        verify(cid, data)
        return data

    def __contains__(self, cid: str) -> bool:
        return (self.root / cid).is_file()
