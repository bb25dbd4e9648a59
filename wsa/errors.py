"""One error hierarchy, so the CLI can print any expected failure as one line and exit 1.

Messages follow ``<path>: <what is wrong>; <what to do>``. Anything that is *not* a
:class:`WsaError` is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class WsaError(Exception):
    """Base of every error wsa raises on purpose (bad input, bad option, missing file)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class FormatError(WsaError):
    """An adapter or dataset file that cannot be read exactly (unknown, corrupt, ambiguous, unsafe)."""


class StoreError(WsaError):
    """A store folder that is missing, incomplete, of another version, or inconsistent with its inputs."""


class ConfigError(WsaError):
    """An option or parameter value that is not allowed."""


class CollectionError(WsaError):
    """Adapters that cannot share one matrix (different modules, shapes or ranks) or bad files in a set.

    ``problems`` lists ``(path, reason)`` pairs so the CLI and ``wsa info`` can show all of them.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)
