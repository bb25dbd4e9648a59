"""Pluggable analyzers of a fitted weight space (installed as ``wsa.analyses``).

Adding an analyzer is one module plus one registry entry: subclass :class:`Analyzer` in
``analyses/<name>.py``, decorate it with ``@register_analyzer``, and add the module name to
``BUILTIN`` below. Third-party packages register under the entry-point group ``wsa.analyzers``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from wsa.analyses.base import (
    AnalysisContext,
    Analyzer,
    Figure,
    Metric,
    NotFittedError,
    Result,
    SkipAnalysis,
    Table,
)
from wsa.errors import ConfigError
from wsa.registry import Registry

ANALYZERS: Registry[type[Analyzer]] = Registry("analyzer")

#: Built-in analyzers, in the order they are listed (and run, where ``requires`` leaves the order free).
BUILTIN = ("pca", "layers", "probes", "manifold", "interpolation", "sampling", "outliers", "gallery")
ENTRY_POINT_GROUP = "wsa.analyzers"
_loaded = False


def register_analyzer(cls: type[Analyzer]) -> type[Analyzer]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return ANALYZERS.register(cls.name)(cls)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        try:
            importlib.import_module(f"wsa.analyses.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"wsa.analyses.{module}":
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in ANALYZERS:
            continue
        try:
            cls = ep.load()
        except Exception as exc:
            dist = getattr(ep.dist, "name", "?")
            raise ConfigError(f"analyzer plug-in {ep.name!r} from {dist!r} failed to load: {exc}") from None
        ANALYZERS.register(ep.name)(cls)


def get_analyzer(name: str) -> type[Analyzer]:
    _load_all()
    return ANALYZERS.get(name)


def available_analyzers() -> list[str]:
    """Registered names in run order (built-ins first, then plug-ins alphabetically)."""
    _load_all()
    names = ANALYZERS.names()
    return [n for n in BUILTIN if n in names] + [n for n in names if n not in BUILTIN]


def run_order(names: list[str]) -> list[str]:
    """``names`` ordered so that each analyzer runs after those it ``requires`` (when they are in the run).

    Ties keep the order of :func:`available_analyzers`; a cycle among plug-ins is a :class:`ConfigError`.
    Why declared, not positional: a plug-in that reads the probes' directions says so, instead of relying
    on where the tuple happens to put it.
    """
    rank = {n: i for i, n in enumerate(available_analyzers())}
    todo = sorted(dict.fromkeys(names), key=lambda n: rank.get(n, len(rank)))
    needs = {n: [r for r in get_analyzer(n).requires if r in todo and r != n] for n in todo}
    done: list[str] = []
    while todo:
        ready = next((n for n in todo if all(r in done for r in needs[n])), None)
        if ready is None:
            raise ConfigError(f"analyzers {todo} require each other in a cycle (their `requires`)")
        done.append(ready)
        todo.remove(ready)
    return done


__all__ = [
    "ANALYZERS",
    "AnalysisContext",
    "Analyzer",
    "Figure",
    "Metric",
    "NotFittedError",
    "Result",
    "SkipAnalysis",
    "Table",
    "available_analyzers",
    "get_analyzer",
    "register_analyzer",
    "run_order",
]
