"""What an analysis found, in a form every output reads the same way: metrics, tables, figures, notes, data.

Why its own module, below both ``wsa.analyses`` and ``wsa.reports``: analyzers make these and reports render
them; neither should reach into the other to share the types (the report imported the analyzer contract
and a private helper to get them). ``to_json`` gives the ``results.json`` form, with :func:`json_safe`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


@dataclass(frozen=True)
class Metric:
    """One headline number, with what a reader needs to judge it."""

    name: str
    value: float | None
    higher_is_better: bool | None = None
    chance: float | None = None
    ci: tuple[float, float] | None = None
    units: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": json_safe(self.value),
            "higher_is_better": self.higher_is_better,
            "chance": json_safe(self.chance),
            "ci": None if self.ci is None else [json_safe(self.ci[0]), json_safe(self.ci[1])],
            "units": self.units,
        }


@dataclass(frozen=True)
class Table:
    """A table for the report (sortable) and a CSV file (``<analyzer>_<name>.csv``)."""

    name: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    write_csv: bool = True
    max_rows_in_report: int = 200

    @classmethod
    def from_frame(cls, name: str, caption: str, frame: pd.DataFrame, **kwargs: Any) -> Table:
        rows = tuple(tuple(json_safe(v) for v in rec) for rec in frame.itertuples(index=False, name=None))
        return cls(name, caption, tuple(str(c) for c in frame.columns), rows, **kwargs)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "caption": self.caption,
            "columns": [str(c) for c in self.columns],
            "rows": [json_safe(list(r)) for r in self.rows],
        }


@dataclass(frozen=True)
class Figure:
    """A PNG with a caption that says what to look for."""

    name: str
    caption: str
    png: bytes

    @classmethod
    def from_matplotlib(cls, name: str, caption: str, fig: Any, dpi: int = 110) -> Figure:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return cls(name, caption, buf.getvalue())

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass(frozen=True)
class Result:
    """What one analyzer found: headline metrics, tables, figures, notes, and every number (``data``)."""

    analyzer: str
    title: str
    summary: str
    metrics: tuple[Metric, ...] = ()
    tables: tuple[Table, ...] = ()
    figures: tuple[Figure, ...] = ()
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "analyzer": self.analyzer,
            "title": self.title,
            "summary": self.summary,
            "params": json_safe(dict(self.params)),
            "metrics": [m.to_json() for m in self.metrics],
            "tables": [t.to_json() for t in self.tables],
            "figures": [{"name": f.name, "caption": f.caption} for f in self.figures],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "data": json_safe(dict(self.data)),
        }


def json_safe(value: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, NaN/Inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value
