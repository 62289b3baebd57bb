"""Content addressing: CIDs, a verified local store, and safetensors-only update bytes."""

from __future__ import annotations

import base64
import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from covey.errors import DataError
from covey.store.cid import cid_for, cid_from_digest, digest_of, verify
from covey.store.local import LocalStore
from covey.store.updates import deserialize_update, serialize_update


def test_cid_is_cidv1_raw_sha256_base32() -> None:
    data = b"hello"
    digest = hashlib.sha256(data).digest()
    # built by hand from the spec: version 1, codec raw (0x55), sha2-256 (0x12), 32 bytes
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest
    expected = "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    assert cid_for(data) == expected
    assert digest_of(expected) == digest and cid_from_digest(digest) == expected


def test_verify_and_bad_cids() -> None:
    verify(cid_for(b"abc"), b"abc")
    with pytest.raises(DataError, match="do not match"):
        verify(cid_for(b"abc"), b"abd")
    with pytest.raises(DataError, match="is not a CID"):
        digest_of("not-a-cid")
    with pytest.raises(DataError, match="32 bytes"):
        cid_from_digest(b"short")


def test_local_store_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    cid = store.put(b"adapter bytes")
    assert cid in store and store.get(cid) == b"adapter bytes"
    assert store.put(b"adapter bytes") == cid  # idempotent
    (tmp_path / "store" / cid).write_bytes(b"swapped bytes")
    with pytest.raises(DataError, match="do not match"):
        store.get(cid)
    with pytest.raises(DataError, match="not in the store"):
        store.get(cid_for(b"missing"))


def test_updates_are_safetensors_and_pickles_are_refused() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 2), "a.lora_B.weight": torch.zeros(2, 4)}
    data = serialize_update(state, {"round": "3"})
    assert data == serialize_update(state, {"round": "3"})  # same tensors, same CID
    back = deserialize_update(data)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(DataError, match="not a valid safetensors"):
        deserialize_update(pickle.dumps(state))
    with pytest.raises(DataError, match="not a valid safetensors"):
        deserialize_update(b"\x00" * 16)
