"""Atomic file writes: a temp file in the same folder, fsync, ``os.replace``, fsync of the folder.

Why one module: every output wsa writes (store manifest, space, directions, exported adapters,
reports) must be either the old file or the new one after a crash, never half of either.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide, not something to flip while threads write


def write_with(path: str | Path, writer: Callable[[str], object]) -> Path:
    """Let ``writer(tmp_path)`` write a temp file, then make it ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def own_folder(parent: str | Path, name: str) -> Path:
    """``parent/name`` as a folder wsa may write into: refused if it is a symlink or resolves elsewhere.

    Why: an output folder is the user's, but what is already inside it may not be (a ``store`` or
    ``adapters`` link planted there would make wsa write, or replace, files in the link's target).
    """
    from wsa.errors import ConfigError

    parent, path = Path(parent), Path(parent) / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != parent.resolve()):
        raise ConfigError(
            f"{path} is a symlink; wsa writes only into folders it owns (remove it, or choose another --out)"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a folder; remove it, or choose another --out")
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Sorted-key JSON (stable bytes for the same content)."""
    return write_bytes(path, json.dumps(data, indent=indent, sort_keys=True, allow_nan=False).encode("utf-8"))
