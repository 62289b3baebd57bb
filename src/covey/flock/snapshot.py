"""Save and restore the embedded chain, so that a FLock simulation resumes like any run.

The embedded chain (eth-tester on py-evm) keeps every block, receipt and state-trie node in one
in-memory key-value database. `dump_embedded` writes that database as length-prefixed
key/value pairs (no pickle); `restore_embedded` loads it into a fresh embedded chain made with
the same genesis (same accounts), whose head then is the saved head: same contracts, balances,
phases and events. The simulation stores a dump inside each round folder, so a killed run
resumes from the chain as it was when its last complete round was saved.
"""

from __future__ import annotations

import struct
from typing import Any

from covey.errors import DataError
from covey.flock.chain import Chain

MAGIC = b"covey-evm-state/1\n"
_LENGTH = struct.Struct(">I")


def dump_embedded(chain: Chain) -> bytes:
    """Every key/value of the embedded chain's database, sorted by key (same state, same bytes)."""
    store = _tester(chain).backend.chain.chaindb.db.wrapped_db.kv_store
    parts = [MAGIC]
    for key in sorted(store):
        value = store[key]
        parts += [_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value]
    return b"".join(parts)


def restore_embedded(chain: Chain, data: bytes) -> None:
    """Replace `chain`'s state with a dump made by `dump_embedded` (same genesis required)."""
    from eth.db.atomic import AtomicDB
    from eth.db.backends.memory import MemoryDB

    if not data.startswith(MAGIC):
        raise DataError("not an embedded chain state written by Covey (bad header)")
    store: dict[bytes, bytes] = {}
    view, at = memoryview(data), len(MAGIC)
    try:
        while at < len(data):
            (n,) = _LENGTH.unpack_from(view, at)
            key = bytes(view[at + 4 : at + 4 + n])
            at += 4 + n
            (n,) = _LENGTH.unpack_from(view, at)
            store[key] = bytes(view[at + 4 : at + 4 + n])
            at += 4 + n
    except struct.error:
        raise DataError("embedded chain state is truncated") from None
    if at != len(data):
        raise DataError("embedded chain state is truncated")
    backend = _tester(chain).backend
    backend.chain = type(backend.chain)(AtomicDB(MemoryDB(store)))


def _tester(chain: Chain) -> Any:
    tester = getattr(chain, "_tester", None)
    if tester is None:
        raise ValueError("only the embedded chain can be saved and restored")
    return tester
