"""Writing private keys: owner-only from the first byte, atomic, loadable; cheap to import."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from covey.flock.keys import load_private_key, write_private_file

KEY_HEX = "0x" + "00" * 31 + "01"
KEY_ADDRESS = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A usual umask (0022: new files readable by all) and chmod that fails: a key file must be
    owner-only when it is created, not fixed up afterwards."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("private files must be created owner-only, not chmod'ed")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def owner_only(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_private_file_is_owner_only_from_creation(tmp_path: Path, no_chmod: None) -> None:
    key = tmp_path / "key"
    write_private_file(key, KEY_HEX.encode())
    assert owner_only(key)
    assert key.read_bytes() == KEY_HEX.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["key"], "no temporary file is left"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no InsecureKeyFileWarning
        assert load_private_key(key).address == KEY_ADDRESS


def test_private_file_replaces_a_readable_file_atomically(tmp_path: Path, no_chmod: None) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"old")
    assert not owner_only(key)
    write_private_file(key, b"new")
    assert key.read_bytes() == b"new" and owner_only(key)


def test_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_private_file(key, "text, not bytes")  # type: ignore[arg-type]
    assert key.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_keys_module_does_not_load_the_ethereum_libraries() -> None:
    """Flower's certificates use write_private_file; they must not pay for eth_account."""
    code = "import sys, covey.flock.keys; print('eth_account' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
