"""The analyzer contract (scikit-learn style) and the frozen results analyzers hand to reports.

Why this shape: parameters are stored as given and validated in ``fit`` (so ``get_params`` round-trips
and configs echo exactly); results are plain, JSON-serialisable values (so the report, the
``results.json`` twin and tests all read the same numbers); analyzers never keep the N × D matrix.
"""

from __future__ import annotations

import inspect
import math
import numbers
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from wsa.errors import ConfigError, WsaError
from wsa.results import Figure, Metric, Result, Table, json_safe  # noqa: F401  (the analyzer contract re-exports them)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from wsa.space import FittedSpace
    from wsa.store import Store


class NotFittedError(WsaError):
    """``result()`` or a transform was called before ``fit``."""


class SkipAnalysis(WsaError):
    """The collection cannot support this analyzer (too few adapters, no variance): skip it, with this reason.

    ``wsa analyze`` shows the reason in the report (an alert and a short section) and runs the others.
    """


#: Largest int an analyzer parameter or run option may take: counts and seeds beyond it are typos.
MAX_INT = 2**31 - 1


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` bounded in depth and length: config values may be nested or huge."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 3, limit, limit, 6, 6
    try:
        return r.repr(value)[: limit * 2]
    except (RecursionError, ValueError):  # pragma: no cover - reprlib bounds depth already
        return f"<{type(value).__name__}>"


def type_problem(value: Any, hint: Any) -> str | None:
    """``None`` when ``value`` fits the annotation ``hint``, else what was expected (for a message).

    Lenient where TOML and Python differ: lists stand for tuples, any integral number for ``int`` (not
    ``bool``), any finite real for ``float``. Ints must lie within ±:data:`MAX_INT`; floats must be finite.
    """
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if hint is type(None) or hint is None:
        return None if value is None else "None"
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(hint)
        problems = [type_problem(value, h) for h in options]
        if any(p is None for p in problems):
            return None
        return ", or ".join(dict.fromkeys(p for p in problems if p))
    if hint is bool:
        return None if isinstance(value, (bool, np.bool_)) else "true or false"
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return None if abs(int(value)) <= MAX_INT else f"an int within ±{MAX_INT}"
        return "an int"
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            if isinstance(value, numbers.Integral) and abs(int(value)) > 2**53:
                return "a finite number"
            return None if math.isfinite(float(value)) else "a finite number"
        return "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple, typing.Sequence, Sequence):
        if not isinstance(value, (list, tuple)):
            return "a list"
        args = typing.get_args(hint)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                return f"a list of {len(args)} items"
            items = list(zip(value, args, strict=True))
        else:
            item = args[0] if args else Any
            items = [(v, item) for v in value]
        for v, h in items:
            problem = type_problem(v, h)
            if problem is not None:
                return f"a list whose items are {problem}"
        return None
    if origin is dict or hint is dict:
        return None if isinstance(value, Mapping) else "a table"
    return None


@dataclass
class AnalysisContext:
    """What every analyzer may read. Built once per ``wsa analyze`` run.

    ``space`` is the fitted PCA of the store, in either geometry: an analyzer asks it only the questions of
    :class:`wsa.space.FittedSpace` (one code path for both geometries; weights come from
    :func:`wsa.points.points_for`, never from the explicit space's components);
    ``labels`` is aligned to ``space.ids`` (one row per adapter, ``None`` where no table was given);
    ``results`` holds the results of analyzers that ran earlier (e.g. ``probes`` for ``sampling``);
    ``artifacts`` is for fitted objects later analyzers and commands reuse (probe directions).
    """

    store: Store
    space: FittedSpace
    labels: pd.DataFrame | None = None
    random_state: int = 0
    device: str = "auto"
    out: Path | None = None
    decoder: Callable[..., Any] | None = None
    results: dict[str, Result] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


class Analyzer:
    """Base class: ``fit(ctx) -> self`` then ``result() -> Result``.

    Subclasses set ``name``, ``title``, ``reference``, declare keyword-only ``__init__`` parameters
    that are stored unchanged, list checks in ``_parameter_constraints`` (parameter -> (predicate,
    description)), and put fitted state in attributes ending in ``_``.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    requires_decoder: ClassVar[bool] = False  # needs ``ctx.decoder`` (``wsa analyze --decode``)
    # Analyzers whose ``ctx.artifacts[name]`` this one reads when they are in the run: they run first
    # (``wsa.analyses.run_order``); without them it runs on its own. Its own artifacts go under ``name``.
    requires: ClassVar[tuple[str, ...]] = ()
    # Reads ``space.components``/``mean``/``scale`` or maps through them; False for analyzers that ask only
    # the questions of ``wsa.space.FittedSpace``, which also run on a ΔW space fitted from factor Grams
    # (``--space delta``).
    _parameter_constraints: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind == p.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Analyzer:
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ConfigError(
                    f"analyzer {self.name!r} has no parameter {key!r} (parameters: {', '.join(sorted(valid))})"
                )
            setattr(self, key, value)
        return self

    @classmethod
    def _param_hints(cls) -> dict[str, Any]:
        try:
            return typing.get_type_hints(cls.__init__)
        except Exception:  # a plug-in's annotations that do not resolve: no type checks, constraints still apply
            return {}

    def _validate_params(self) -> None:
        """Type-check every parameter against its annotation, then apply ``_parameter_constraints``.

        Raises
        ------
        ConfigError
            One line naming the analyzer, the parameter, what it must be and (briefly) what it was.
        """
        hints = self._param_hints()
        for key in self._param_names():
            value = getattr(self, key)
            problem = type_problem(value, hints.get(key, Any))
            if problem is not None:
                raise ConfigError(
                    f"The {key!r} parameter of {self.name} must be {problem}; got {short_repr(value)} instead."
                )
        for key, (check, description) in self._parameter_constraints.items():
            value = getattr(self, key)
            try:
                ok = bool(check(value))
            except (TypeError, ValueError, OverflowError, AttributeError):
                ok = False
            if not ok:
                raise ConfigError(
                    f"The {key!r} parameter of {self.name} must be {description}; got {short_repr(value)} instead."
                )

    def fit(self, ctx: AnalysisContext) -> Analyzer:
        raise NotImplementedError

    def write_artifacts(self, out: Path) -> list[Path]:
        """Files a fitted analyzer leaves for other commands (the probes' directions for ``wsa edit``).

        Called by the pipeline after ``fit`` (``fit`` itself only sets attributes); ``out`` is the report
        folder. The default writes nothing.
        """
        return []

    def _check_is_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; call 'fit' first.")

    def result(self) -> Result:
        raise NotImplementedError


def positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and 0 < float(v) < 1


def one_of(options: Sequence[Any]) -> Callable[[Any], bool]:
    return lambda v: v in options
