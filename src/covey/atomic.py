"""Atomic writes: readers see the old state or the new one, never half of a write.

Files are written to a temporary sibling, flushed to disk, then renamed over the target
(`os.replace` is atomic on POSIX within one file system). Folders are staged as a hidden
sibling and swapped in with renames, so a failure leaves the previous folder untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from covey.errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (the parent folder must exist).

    The temporary file comes from `tempfile.mkstemp`: created with O_EXCL (and O_NOFOLLOW where
    the system has it), so no file or link planted under its name is written through, and with
    mode 0600, which the rename keeps: the result is readable by its owner alone.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(target: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a target that is a file, or a non-empty folder unless `overwrite` is set."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {target}: exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"{flag} {target}: folder exists and is not empty; pass --overwrite to replace it "
            "or choose another folder"
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Write secret `data` (a private key) to `path`, readable and writable by the owner alone.

    `atomic_write_bytes` gives that from the first byte: the bytes go into a new file created with
    mode 0600 (never chmod'ed afterwards, so at no moment can group or others open it), which then
    atomically replaces `path`. The separate name marks the callers that depend on it.
    """
    atomic_write_bytes(path, data)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it becomes `target`.

    If the block raises, the staging folder is removed and `target` is left as it was.
    With `overwrite`, an existing `target` is replaced only after the new one is complete.
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, backup / "previous")
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:  # put the previous folder back
            os.replace(backup / "previous", target)
            shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` so a crash after the rename cannot leave empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
