"""Private key files: written owner-only from the first byte, atomic, loadable; a key file that
group or others can read or write is refused, not loaded; the module is cheap to import."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from covey.atomic import write_private_file
from covey.errors import ConfigError
from covey.flock.keys import load_private_key

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


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602, 0o660, 0o666, 0o610, 0o601])
def test_a_key_file_others_can_reach_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    """As ssh does: readable or writable (or executable) by group or others is refused, with
    `chmod 600` in the message, and nothing of the key is shown."""
    key = tmp_path / "key"
    write_private_file(key, KEY_HEX.encode())
    key.chmod(mode)
    with pytest.raises(ConfigError, match=f"chmod 600 {key}") as info:
        load_private_key(key)
    assert stat.filemode(mode | stat.S_IFREG) in str(info.value)
    assert KEY_HEX[2:] not in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_an_owner_only_key_file_loads(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "key"
    write_private_file(key, KEY_HEX.encode())
    key.chmod(mode)
    assert load_private_key(key).address == KEY_ADDRESS


def test_the_mode_checked_is_the_mode_of_the_file_read(tmp_path: Path) -> None:
    """A link to a loose file is judged by the file it leads to, not the link's own mode."""
    loose = tmp_path / "loose"
    loose.write_text(KEY_HEX)
    loose.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(link)
