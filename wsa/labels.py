"""Attribute tables: read a label file, join it on adapter ids, and decide how each column is probed.

Why a module of its own: every labelled analysis (probes, sampling, editing) needs the same answer to
"which rows carry which label, and is this column a yes/no, a number or a category?". Doing it once
means one set of error messages (each naming the file and saying what to do) and one documented rule
for turning two-valued columns into 0/1, so a direction's sign means the same thing everywhere.

Supported files: ``.csv``, ``.tsv``/``.tab``, ``.parquet``/``.pq`` (needs pyarrow or fastparquet),
``.json`` (records ``[{"id": ..., "attr": ...}, ...]``, columns ``{"id": [...], "attr": [...]}`` or
an id-keyed object ``{"<id>": {"attr": ...}}``) and ``.jsonl`` (one record per line).

A label file is input like any other: whatever it holds, :func:`load_labels` returns a frame or raises
one :class:`~wsa.errors.FormatError`/:class:`~wsa.errors.ConfigError` line naming the file (and the
column or row). How hostile or odd content is handled:

- empty cells, ``nan``/``NA``/``null`` and JSON ``NaN`` are *missing* (the adapter is not labelled for
  that attribute);
- ``inf``/``-inf`` (text or JSON ``Infinity``) in a numeric column are *missing too*, with a warning in
  the report naming the column and the adapters — a probe cannot regress on infinity, and dropping
  the cell is what a researcher would do by hand;
- objects or lists as values, control characters in a column name, duplicate ids (also duplicate keys
  of an id-keyed JSON object), a top level that is not a table, JSON nested deeper than the parser's
  recursion limit, an empty file → refused;
- a UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import json
import math
import reprlib
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from wsa.atomic import write_bytes
from wsa.errors import ConfigError, FormatError
from wsa.text import first_line

#: Column names taken as the id column (case-insensitive), in this order, when ``id_column`` is not given.
ID_COLUMN_NAMES = ("id", "model", "name", "file")
#: A non-numeric column with more distinct values than this is not probed (one-vs-rest would be noise).
MAX_CATEGORIES = 50
#: Label columns one table may have (each is probed and plotted) and the longest column name (it labels figures).
MAX_COLUMNS = 1000
MAX_COLUMN_NAME = 200

#: Two-valued string columns whose meaning is known: the first of each pair maps to 1.
KNOWN_BINARY_PAIRS = (
    ("true", "false"),
    ("yes", "no"),
    ("y", "n"),
    ("t", "f"),
    ("on", "off"),
    ("present", "absent"),
    ("positive", "negative"),
    ("pos", "neg"),
)
#: A column is "numeric-looking" when at least this fraction of its non-empty values parse as numbers.
NUMERIC_LOOKING = 0.5

_READERS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".jsonl": "jsonl",
}


def load_labels(path: str | Path, ids: Sequence[str], *, id_column: str | None = None) -> pd.DataFrame:
    """Read an attribute table and align it to the store's ids.

    Parameters
    ----------
    path : str or Path
        The label file (CSV, TSV, Parquet, JSON or JSON lines; chosen by suffix).
    ids : sequence of str
        The store's (or space's) adapter ids; the result has exactly these rows, in this order.
    id_column : str, optional
        The column holding adapter ids. Default: the first column named ``id``, ``model``, ``name``
        or ``file`` (case-insensitive), else the first column.

    Returns
    -------
    pandas.DataFrame of shape (len(ids), n_attributes)
        Indexed by id (index name ``"id"``), one column per attribute. Columns whose values all parse
        as numbers are float64; others keep their (stripped) strings or booleans. Ids of the store that
        the table lacks get NaN rows. ``frame.attrs`` holds ``source``, ``id_column``, ``missing_ids``
        (store ids without a row), ``extra_ids`` (table ids not in the store), ``constant_columns``
        and ``warnings`` (one-line messages a report can show).

    Raises
    ------
    ConfigError
        The file is missing, has an unsupported suffix, lacks the requested id column, or shares no
        id with the store (the message shows example ids from both sides).
    FormatError
        The file cannot be parsed (also: empty, nested too deeply, a JSON top level that is not a table,
        duplicate JSON keys), has empty or duplicate ids, an object or list as a value, a column name
        with control characters, no attribute column, a numeric-looking column with non-numeric
        values, or only single-valued attributes. ``inf``/``-inf`` values are read as missing, with a
        warning in ``attrs["warnings"]`` (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            what = "is a folder, not a label file"
        elif path.exists():
            what = "is not a regular file"
        else:
            what = "label file not found"
        raise ConfigError(f"{what}; check the path given to --labels", path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"unsupported label file type {path.suffix or '(no suffix)'!r}; use one of {', '.join(sorted(_READERS))}",
            path,
        )
    table = _read_table(path, kind)
    table.columns = [str(c).strip() for c in table.columns]
    if len(table.columns) > MAX_COLUMNS:
        raise FormatError(
            f"{len(table.columns)} columns: more than {MAX_COLUMNS} attributes to probe; keep the ones to study", path
        )
    for c in table.columns:
        if len(c) > MAX_COLUMN_NAME:
            raise FormatError(f"column name {_show(c)} is longer than {MAX_COLUMN_NAME} characters; rename it", path)
        if any(unicodedata.category(ch) == "Cc" for ch in c):
            raise FormatError(f"column name {_show(c)} holds control characters; rename it", path)
    if table.shape[1] == 0:
        raise FormatError("no columns found; the first row must name the id column and the attributes", path)
    if len(set(table.columns)) != len(table.columns):
        dup = sorted({c for c in table.columns if list(table.columns).count(c) > 1})
        raise FormatError(f"duplicate column names {dup}; rename them", path)

    id_col = _id_column(table, id_column, path)
    for col in table.columns:
        _refuse_nested(table[col], col, table[id_col], path)
    table = table.apply(_strip_column)
    raw_ids = table[id_col]
    empty = raw_ids.isna()
    if empty.any():
        first = int(np.flatnonzero(empty.to_numpy())[0])
        raise FormatError(
            f"{int(empty.sum())} row(s) have no id in column {id_col!r} (first: data row {first + 1}); fill them in",
            path,
        )
    table[id_col] = raw_ids.map(_id_string)
    dup_mask = table[id_col].duplicated(keep=False)
    if dup_mask.any():
        dups = sorted(set(table.loc[dup_mask, id_col]))
        raise FormatError(
            f"duplicate ids in column {id_col!r}: {_examples(dups)}; keep one row per adapter",
            path,
        )
    attributes = [c for c in table.columns if c != id_col]
    if not attributes:
        raise FormatError(f"only the id column {id_col!r}; add at least one attribute column", path)

    table = table.set_index(id_col)
    store_ids = [str(i) for i in ids]
    store_set = set(store_ids)
    table_ids = list(table.index)
    matched = [i for i in table_ids if i in store_set]
    if not matched:
        raise ConfigError(
            f"no id in column {id_col!r} matches a store id (table: {_examples(table_ids, 3)}; "
            f"store: {_examples(store_ids, 3)}); pass --id-column or fix the ids",
            path,
        )
    extra = [i for i in table_ids if i not in store_set]
    table_set = set(table_ids)
    missing = [i for i in store_ids if i not in table_set]

    warnings = []
    for col in attributes:
        table[col] = _numeric_or_strings(table[col], col, path)
        if pd.api.types.is_float_dtype(table[col].dtype):
            infinite = np.isinf(table[col].to_numpy())
            if infinite.any():
                where = _examples(list(table.index[infinite]), 3)
                warnings.append(
                    f"{path}: attribute {_show(col)}: {int(infinite.sum())} infinite value(s) read as missing "
                    f"(ids {where})"
                )
                table.loc[infinite, col] = np.nan

    frame = table.reindex(store_ids)
    frame.index.name = "id"
    frame.columns.name = None
    constant = [c for c in attributes if frame[c].nunique(dropna=True) < 2]
    if len(constant) == len(attributes):
        raise FormatError(
            f"every attribute has a single value over the matched adapters ({_examples(constant)}); nothing to probe",
            path,
        )
    if extra:
        warnings.append(f"{path}: {len(extra)} id(s) not in the store were ignored (e.g. {_examples(extra, 3)})")
    if missing:
        warnings.append(f"{path}: {len(missing)} adapter(s) have no labels (e.g. {_examples(missing, 3)})")
    for col in constant:
        warnings.append(f"{path}: attribute {col!r} has a single value over the matched adapters; not probed")
    frame.attrs.update(
        source=str(path),
        id_column=id_col,
        missing_ids=missing,
        extra_ids=extra,
        constant_columns=constant,
        warnings=warnings,
    )
    return frame


def _read_table(path: Path, kind: str) -> pd.DataFrame:
    """Parse the file; every parser failure becomes one FormatError line naming the file.

    The parsers are third-party code reading the file author's bytes, so *any* exception they raise is
    the file's problem (reported with its type), never a traceback.
    """
    try:
        if kind in ("csv", "tsv"):
            # All as strings: we strip, then decide numeric-ness ourselves (and can name bad values).
            return pd.read_csv(
                path, sep="\t" if kind == "tsv" else ",", dtype=str, skipinitialspace=True, encoding="utf-8-sig"
            )
        if kind == "parquet":
            return pd.read_parquet(path)
        text = path.read_bytes().decode("utf-8-sig")
        if not text.strip():
            raise pd.errors.EmptyDataError
        if kind == "jsonl":
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    record = _json_loads(line, path, f"line {number}: ")
                    if not isinstance(record, dict):
                        raise FormatError(f"line {number} is not a JSON object; each line must be one record", path)
                    records.append(record)
            return pd.DataFrame.from_records(records)
        return _json_frame(_json_loads(text, path), path)
    except ImportError as exc:
        hint = f"reading Parquet needs pyarrow ({exc}); pip install pyarrow or convert to CSV"
        raise ConfigError(hint, path) from None
    except pd.errors.EmptyDataError:
        raise FormatError("the file is empty; expected a header row with the id column and attributes", path) from None
    except (ConfigError, FormatError):
        raise
    except RecursionError:
        raise FormatError(f"cannot read as {kind.upper()} (nested too deeply); check the file", path) from None
    except Exception as exc:  # a parser's failure on the file's bytes, see the docstring
        raise FormatError(f"cannot read as {kind.upper()} ({_clip(first_line(exc))}); check the file", path) from None


def _json_loads(text: str, path: Path, where: str = "") -> Any:
    """``json.loads`` that refuses duplicate keys and deep nesting, each as one FormatError line."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise FormatError(f"{where}duplicate key {_show(key)} in one JSON object; keep one", path)
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)  # the C parser bounds its recursion
    except RecursionError:
        raise FormatError(f"{where}JSON nested too deeply; a label table is flat (records of values)", path) from None
    except ValueError as exc:
        raise FormatError(f"{where}cannot read as JSON ({_clip(str(exc))}); check the file", path) from None


def _refuse_nested(col: pd.Series, name: str, ids: pd.Series, path: Path) -> None:
    """Label values are numbers, strings or booleans; an object or a list is refused, naming where."""
    if col.dtype != object:
        return
    for row, value in enumerate(col.to_numpy()):
        if isinstance(value, (dict, list, tuple, set, bytes, bytearray)):
            kind = "an object" if isinstance(value, dict) else "bytes" if isinstance(value, bytes) else "a list"
            where = f"data row {row + 1}"
            rid = ids.iloc[row]
            if isinstance(rid, (str, int, float)) and not isinstance(rid, bool):
                where += f" (id {_show(rid)})"
            raise FormatError(
                f"column {_show(name)}, {where}: the value is {kind}; a label is a number, a string or true/false",
                path,
            )


def _json_frame(data: Any, path: Path) -> pd.DataFrame:
    if isinstance(data, list):
        if not all(isinstance(r, dict) for r in data):
            raise FormatError("a JSON list must hold one object per adapter", path)
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict) and data:
        values = list(data.values())
        if all(isinstance(v, list) for v in values):
            lengths = {len(v) for v in values}
            if len(lengths) != 1:
                raise FormatError(f"JSON columns have different lengths {sorted(lengths)}", path)
            return pd.DataFrame(data)
        if all(isinstance(v, dict) for v in values):
            # {"<id>": {"attr": value}}: the keys are the ids.
            frame = pd.DataFrame.from_dict(data, orient="index")
            return frame.rename_axis("id").reset_index()
    raise FormatError(
        'JSON must be records [{"id": ..., ...}], columns {"id": [...], ...} or {"<id>": {...}}',
        path,
    )


def _id_column(table: pd.DataFrame, id_column: str | None, path: Path) -> str:
    columns = list(table.columns)
    if id_column is not None:
        if id_column not in columns:
            shown = _examples(columns, 10)
            raise ConfigError(f"no id column {id_column!r} (columns: {shown}); check --id-column", path)
        return id_column
    lower = {c.lower(): c for c in reversed(columns)}
    for name in ID_COLUMN_NAMES:
        if name in lower:
            return lower[name]
    return columns[0]


def _strip_column(col: pd.Series) -> pd.Series:
    """Strip surrounding spaces of string cells; empty strings become missing."""
    if col.dtype != object and not pd.api.types.is_string_dtype(col.dtype):
        return col

    def strip(v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            return v if v else np.nan
        return v

    return col.map(strip).astype(object)


def _id_string(v: Any) -> str:
    """Ids compare as strings; an integral float (JSON ``3.0``) reads as ``"3"``."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _numeric_or_strings(col: pd.Series, name: str, path: Path) -> pd.Series:
    """Numbers become float64; a mostly-numeric column with a few non-numbers is an error, not text."""
    if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
        return col.astype(np.float64) if not pd.api.types.is_bool_dtype(col.dtype) else col
    present = col.dropna()
    if present.empty:
        return col.astype(np.float64)
    if any(isinstance(v, (bool, np.bool_)) for v in present):
        return col
    numbers = pd.to_numeric(present, errors="coerce")
    bad = numbers.isna()
    if not bad.any():
        return pd.to_numeric(col, errors="coerce").astype(np.float64)
    if 1.0 - bad.mean() >= NUMERIC_LOOKING:
        examples = ", ".join(f"{v!r} (id {i!r})" for i, v in list(present[bad].items())[:3])
        raise FormatError(
            f"column {name!r} looks numeric but has {int(bad.sum())} non-numeric value(s): {examples}; "
            "fix them or leave the cells empty",
            path,
        )
    return col


def _examples(values: Sequence[Any], n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(_show(v) for v in values[:n])
    return shown + (f", … ({len(values)} in all)" if len(values) > n else "")


def _show(value: Any, limit: int = 60) -> str:
    """A value from the file for a message: repr'd, control characters escaped, at most ``limit`` long."""
    if isinstance(value, str):
        return repr(_clip(value, limit))
    r = reprlib.Repr()
    r.maxlevel, r.maxother, r.maxstring = 2, limit, limit
    return r.repr(value)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# Attribute kinds


@dataclass(frozen=True)
class AttributeInfo:
    """How one column is probed.

    ``kind`` is ``"binary"``, ``"continuous"``, ``"categorical"`` or ``"ignored"`` (then ``reason``
    says why). ``mapping`` maps each binary value (as a string) to 0 or 1; ``classes`` lists the
    categories of a categorical column in sorted order. ``rule`` names the binary rule that applied.
    """

    name: str
    kind: str
    n_labelled: int
    reason: str = ""
    rule: str = ""
    mapping: dict[str, int] = field(default_factory=dict)
    classes: tuple[str, ...] = ()

    def encode(self, values: pd.Series) -> np.ndarray:
        """Labels as numbers, NaN where missing: 0/1 (binary), float (continuous), class index (categorical).

        Returns
        -------
        ndarray of shape (len(values),), float64
        """
        out = np.full(len(values), np.nan)
        present = values.notna().to_numpy()
        vals = values[present]
        if self.kind == "binary":
            out[present] = [self.mapping[value_key(v)] for v in vals]
        elif self.kind == "continuous":
            out[present] = vals.astype(np.float64).to_numpy()
        elif self.kind == "categorical":
            index = {c: i for i, c in enumerate(self.classes)}
            out[present] = [index[value_key(v)] for v in vals]
        else:
            raise ConfigError(f"attribute {self.name!r} is not probed ({self.reason})")
        return out


class EncodedAttribute(NamedTuple):
    """One probed column: ``kind``, ``values`` (float64, NaN where missing), ``names`` ({code: class}), ``info``."""

    kind: str
    values: np.ndarray
    names: dict[int, str]
    info: AttributeInfo


def encode_attributes(labels: pd.DataFrame | None, ids: Sequence[str] | None = None) -> dict[str, EncodedAttribute]:
    """Every probed column of ``labels`` (rows aligned to ``ids`` when given), encoded as the probes encode it.

    The one label encoder of the analyzers: kinds and codes come from :func:`describe_attributes`, so binary
    0/1 and category indices mean the same in probes, maps, layers, sampling and interpolation; ``ignored``
    columns are left out.
    """
    if labels is None or labels.shape[1] == 0:
        return {}
    frame = labels if ids is None else labels.reindex(list(ids))
    out = {}
    for name, info in describe_attributes(frame).items():
        if info.kind == "ignored":
            continue
        names = (
            {code: value for value, code in info.mapping.items()}
            if info.kind == "binary"
            else dict(enumerate(info.classes))
        )
        out[name] = EncodedAttribute(info.kind, info.encode(frame[name]), names, info)
    return out


def describe_attributes(frame: pd.DataFrame) -> dict[str, AttributeInfo]:
    """Classify every column of a label frame and keep the 0/1 mapping of binary ones.

    Binary rule (a column with exactly two distinct non-missing values), first that applies:

    1. booleans: ``True`` → 1;
    2. known words, case-insensitive: true/false, yes/no, y/n, t/f, on/off, present/absent,
       positive/negative, pos/neg → the first word is 1;
    3. numbers: the larger value is 1 (so 0/1 stays, and w2w/CelebA's -1/+1 becomes 0/1 with +1 → 1);
    4. other strings: the lexicographically later value is 1 (``"blond" < "brown"`` → brown = 1).

    Other columns: numeric with more than two distinct values → ``"continuous"``; non-numeric with
    3 to 50 distinct values → ``"categorical"`` (one-vs-rest probes); anything else → ``"ignored"``
    with a reason (no labelled rows, a single value, too many categories).
    """
    return {str(col): _describe(str(col), frame[col]) for col in frame.columns}


def attribute_kinds(frame: pd.DataFrame) -> dict[str, str]:
    """``{column: "binary" | "continuous" | "categorical" | "ignored"}``; see :func:`describe_attributes`."""
    return {name: info.kind for name, info in describe_attributes(frame).items()}


def _describe(name: str, col: pd.Series) -> AttributeInfo:
    present = col.dropna()
    n = len(present)
    if n == 0:
        return AttributeInfo(name, "ignored", 0, reason="no labelled rows")
    keys = sorted({value_key(v) for v in present})
    distinct = len(keys)
    if distinct < 2:
        return AttributeInfo(name, "ignored", n, reason=f"a single value ({keys[0]!r})")
    is_bool = pd.api.types.is_bool_dtype(col.dtype) or all(isinstance(v, (bool, np.bool_)) for v in present)
    is_numeric = not is_bool and (
        pd.api.types.is_numeric_dtype(col.dtype) or pd.to_numeric(present, errors="coerce").notna().all()
    )
    if distinct == 2:
        rule, one = _binary_one(present, keys, is_bool, is_numeric)
        return AttributeInfo(name, "binary", n, rule=rule, mapping={k: int(k == one) for k in keys})
    if is_numeric:
        return AttributeInfo(name, "continuous", n)
    if distinct > MAX_CATEGORIES:
        return AttributeInfo(
            name, "ignored", n, reason=f"{distinct} distinct non-numeric values (more than {MAX_CATEGORIES})"
        )
    return AttributeInfo(name, "categorical", n, classes=tuple(keys))


def _binary_one(present: pd.Series, keys: list[str], is_bool: bool, is_numeric: bool) -> tuple[str, str]:
    """Which of the two value keys maps to 1, and the name of the rule that decided it."""
    if is_bool:
        return "boolean", value_key(True)
    lowered = {k.lower(): k for k in keys}
    for yes, no in KNOWN_BINARY_PAIRS:
        if set(lowered) == {yes, no}:
            return f"{yes}/{no}", lowered[yes]
    if is_numeric:
        values = sorted({float(v) for v in present})
        return "larger value", value_key(values[-1])
    return "lexicographically later", keys[-1]


def value_key(v: Hashable) -> str:
    """One spelling per value, JSON-safe: ``1.0`` and ``1`` read ``"1"``, ``True`` reads ``"True"``."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        if math.isfinite(f):
            return str(int(f)) if f.is_integer() else repr(f)
        return v
    return str(v)


def _metadata_field_ok(key: Any) -> bool:
    return isinstance(key, str) and 0 < len(key) <= 200 and not any(unicodedata.category(c) == "Cc" for c in key)


def _metadata_value(value: Any) -> Any:
    """A metadata value as a label cell: number, string or bool; anything else (or non-finite) is missing."""
    from wsa.training_metadata import MAX_VALUE

    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _clip(value.replace("\x00", ""), MAX_VALUE)
    return None


def _groups_adapters(field: str, values: list[Any]) -> bool:
    """Is a metadata field an attribute (it varies and groups adapters), not an identifier?

    Hashes, and text fields with a different value for every adapter (output names, titles), name files;
    they are left out of ``--labels metadata`` (ask for them by name with ``metadata:FIELD``).
    """
    present = [v for v in values if v is not None]
    distinct = {_id_string(v) for v in present}
    if len(distinct) < 2 or field.startswith("sshs_") or field.endswith("_hash"):
        return False
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    return numeric or len(distinct) < len(present)


#: ``--labels`` values that take the attributes from the adapters' own training metadata.
METADATA_SPEC = "metadata"


def is_metadata_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and (spec == METADATA_SPEC or spec.startswith(METADATA_SPEC + ":"))


def metadata_labels(rows: Sequence[Mapping[str, Any]], spec: str, out: str | Path) -> Path:
    """Write the store rows' training metadata as a label table (``out``, JSON records) and return its path.

    ``spec`` is ``metadata`` (every field that varies across the adapters, plus ``family`` and ``format``
    when they vary) or ``metadata:ss_network_dim,ss_base_model_version`` (exactly those fields). The file
    is then read like any label table (:func:`load_labels`), so kinds, missing values and reports work
    the same way.

    Metadata is the file authors' text (a store's rows may also have been edited), so it is made tame
    first: only string keys without control characters, of at most 200 characters, are fields; values
    that are not a number, a string or true/false (objects, lists) are left out, non-finite numbers
    become missing, and strings are cut to :data:`wsa.training_metadata.MAX_VALUE` characters.
    """
    records = []
    for row in rows:
        if not isinstance(row, Mapping) or row.get("id") is None:
            continue
        record: dict[str, Any] = {"id": str(row["id"])}
        training = row.get("training")
        items = [("family", row.get("family")), ("format", row.get("format"))]
        if isinstance(training, Mapping):
            items += list(training.items())
        for key, value in items:
            if _metadata_field_ok(key) and key != "id":
                record[key] = _metadata_value(value)
        records.append(record)
    fields = sorted({k for r in records for k in r} - {"id"})
    if spec == METADATA_SPEC:
        chosen = [f for f in fields if _groups_adapters(f, [r.get(f) for r in records])]
        if not chosen:
            raise ConfigError(
                f"--labels metadata: no metadata field varies across the {len(records)} adapters "
                f"(fields: {', '.join(fields) or 'none'})"
            )
    else:
        chosen = [f.strip() for f in spec.split(":", 1)[1].split(",") if f.strip()]
        unknown = [f for f in chosen if f not in fields]
        if not chosen or unknown:
            raise ConfigError(
                f"--labels {spec}: unknown metadata field(s) {unknown or '(none named)'}; "
                f"the adapters have: {', '.join(fields) or 'none'}"
            )
    table = [{"id": r["id"], **{f: r.get(f) for f in chosen}} for r in records]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, (json.dumps(table, indent=1, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    return path
