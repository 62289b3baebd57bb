"""Private keys: read from a file or an environment variable, never shown; written owner-only.

A key never comes from the command line (it would land in shell history and `ps`). It is read
from a file that only its owner can read or write (any other is refused, as ssh refuses such
a key, with the chmod that fixes it) or from an environment variable, and
lives only inside a `PrivateKey`, whose repr and str show the address alone. Error messages
say what is wrong with a key without quoting any of it.

Every private key Covey writes (TLS and SuperNode keys for Flower, devnet accounts) goes through
`covey.atomic.write_private_file`, which creates the file readable by its owner alone from its
first byte. The Ethereum libraries load when a key is used, so naming keys stays cheap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from covey.envvars import PRIVATE_KEY_ENV
from covey.errors import ConfigError

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class PrivateKey:
    """An Ethereum account key that signs transactions and never prints itself."""

    __slots__ = ("_key", "address")

    _key: bytes
    address: ChecksumAddress

    def __init__(self, key: bytes) -> None:
        from eth_account import Account
        from eth_utils.address import to_checksum_address

        if len(key) != 32:
            raise ConfigError(f"a private key is 32 bytes; this one has {len(key)}")
        if not 0 < int.from_bytes(key, "big") < _SECP256K1_ORDER:
            raise ConfigError("the private key is out of range for secp256k1 (0 or >= the order)")
        object.__setattr__(self, "_key", bytes(key))
        object.__setattr__(self, "address", to_checksum_address(Account.from_key(key).address))

    @classmethod
    def from_hex(cls, text: str, *, source: str = "key") -> PrivateKey:
        """Parse 64 hex digits (an optional 0x, surrounding whitespace allowed)."""
        digits = text.strip()
        if digits[:2] in ("0x", "0X"):
            digits = digits[2:]
        if len(digits) != 64:
            raise ConfigError(
                f"{source}: expected 64 hex digits (optionally 0x-prefixed), got {len(digits)}"
                " characters"
            )
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raise ConfigError(f"{source}: not a hex string") from None
        return cls(raw)

    def sign_transaction(self, transaction: dict[str, Any]) -> bytes:
        """Sign a filled-in transaction; returns the raw bytes to broadcast."""
        from eth_account import Account

        signed = Account.sign_transaction(transaction, self._key)
        return bytes(signed.raw_transaction)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("PrivateKey is immutable")

    def __repr__(self) -> str:
        return f"PrivateKey(address={self.address})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # pickling would write the key in clear wherever the pickle goes
        raise TypeError("PrivateKey cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and other.address == self.address

    def __hash__(self) -> int:
        return hash(self.address)


def load_private_key(
    path: str | os.PathLike[str] | None = None, env: str = PRIVATE_KEY_ENV
) -> PrivateKey:
    """Load the key from `path` if given, else from the environment variable `env`.

    The file holds the key as hex on its first line, and only its owner may read or write
    it (mode 0600 or 0400): a file that group or others can read or write is refused with a
    ConfigError saying `chmod 600 FILE`, before its contents are read: others may have read
    the key already, or (with write access) replaced it with one they know.
    """
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as opened:  # the mode of the file read, not of a path swapped
                mode = os.fstat(opened.fileno()).st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise ConfigError(
                        f"key file {file} can be read or written by group or others (mode "
                        f"{stat.filemode(mode)}); a key must be its owner's alone: run "
                        f"`chmod 600 {file}` (and use a new key if others may have read it)"
                    )
                text = opened.read().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"key file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"key file {file} cannot be read: {type(e).__name__}") from None
        lines = text.strip().splitlines()
        return PrivateKey.from_hex(lines[0] if lines else "", source=f"key file {file}")
    value = os.environ.get(env)
    if value is None or not value.strip():
        raise ConfigError(
            f"no private key: set the environment variable {env} or pass a key file"
            " (keys are never taken from the command line)"
        )
    return PrivateKey.from_hex(value, source=f"environment variable {env}")
