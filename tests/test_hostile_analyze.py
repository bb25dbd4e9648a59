"""Hostile inputs to `wsa analyze` (issue 12): configs, label files, metadata, degenerate collections, non-finite
values, CSV formula injection and terminal text. Each class has a positive control that must succeed, and every
refusal must be one WsaError line naming the file (and the key, column or row)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsa.analyses.base import SkipAnalysis
from wsa.errors import ConfigError, WsaError
from wsa.labels import load_labels, metadata_labels
from wsa.pipeline import AnalyzeConfig, load_config, run_analysis
from wsa.reports.html import _csv_bytes, write_report
from wsa.synthetic import synth_collection
from wsa.training_metadata import parse_training_metadata, trigger_words

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
]
FAST = {"manifold": {"methods": ["pca"]}, "probes": {"n_shuffles": 3, "n_bootstrap": 10}}
FORMULA = ("=", "+", "-", "@", "\t", "\r")
#: Examples per fuzz test; WSA_FUZZ_EXAMPLES=10000 for a long run.
FUZZ = int(os.environ.get("WSA_FUZZ_EXAMPLES", "0")) or None


def one_line_naming(exc: BaseException, *parts: str) -> str:
    message = str(exc)
    assert isinstance(exc, WsaError), type(exc)
    assert "\n" not in message and "\r" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("hostile_analyze")
    synth_collection(root / "src", 7, seed=3, modules=MODULES, n_factors=3, progress=False)
    return sorted(p for p in (root / "src").iterdir() if p.is_dir())


def collection(root: Path, sources: list[Path]) -> Path:
    """A folder of adapters m0, m1, ... copied from ``sources`` (repeats allowed: identical adapters)."""
    root.mkdir(parents=True)
    for i, src in enumerate(sources):
        shutil.copytree(src, root / f"m{i}")
    return root


def run(inputs: Path, out: Path, **kwargs) -> dict:
    params = kwargs.pop("analyzer_params", FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_analysis([inputs], out, AnalyzeConfig(n_components=10, analyzer_params=params, **kwargs), progress=False)
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------ 1. configs


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_config_analyzers_string_and_valid_values(tmp_path: Path) -> None:
    """Positive control: a full valid config loads exactly; a string of analyzers is a comma list, not letters."""
    one = load_config(write(tmp_path / "one.toml", '[analyze]\nanalyzers = "pca"\n'))
    assert one.analyzers == ["pca"]
    two = load_config(write(tmp_path / "two.toml", '[analyze]\nanalyzers = "pca, manifold"\n'))
    assert two.analyzers == ["pca", "manifold"]
    full = load_config(
        write(
            tmp_path / "full.toml",
            "\ufeff# a comment with [[[ and { and a.b.c.d\n"
            '[analyze]\nanalyzers = ["pca", "manifold"]\nn_components = 5\nseed = 7\ndevice = "cpu"\n'
            'labels = "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.a.b.c.d.e.f.g.csv"\n'
            '[manifold]\nmethods = ["pca"]\ncolor_by = ["x"]\nmin_dist = 0.5\n[probes]\nc = 2\n',
        )
    )
    assert (full.analyzers, full.n_components, full.seed, full.device) == (["pca", "manifold"], 5, 7, "cpu")
    assert full.analyzer_params == {
        "manifold": {"methods": ["pca"], "color_by": ["x"], "min_dist": 0.5},
        "probes": {"c": 2},
    }


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[analyze]\nanalyzers = ["pca", "nope"]\n', "analyzers"),
        ("[analyze]\nanalyzers = []\n", "analyzers"),
        ('[analyze]\nanalyzers = ["pca", "pca"]\n', "analyzers"),
        ("[analyze]\nanalyzers = 3\n", "analyzers"),
        ("[analyze]\nn_components = nan\n", "n_components"),
        ("[analyze]\nn_components = 3.5\n", "n_components"),
        ("[analyze]\nn_components = true\n", "n_components"),
        ("[analyze]\nn_components = 0\n", "n_components"),
        ("[analyze]\nseed = 9223372036854775807\n", "seed"),
        ("[analyze]\nseed = -1\n", "seed"),
        ("[analyze]\ncenter = 1\n", "center"),
        ('[analyze]\nsolver = "magic"\n', "solver"),
        ('[analyze]\ndevice = "tpu"\n', "device"),
        ("[analyze]\nlabels = [1]\n", "labels"),
        ("[analyze]\ndecode_steps = 100000\n", "decode_steps"),
        ("[analyze]\nbogus = 1\n", "bogus"),
        ("analyze = [1]\n", "analyze"),
        ('[manifold]\nmethods = "pca"\n', "methods"),
        ("[manifold]\nn_neighbors = inf\n", "n_neighbors"),
        ("[manifold]\nmin_dist = nan\n", "min_dist"),
        ("[manifold]\nbogus = 1\n", "bogus"),
        ('[pca]\nheldout_ks = ["abc"]\n', "heldout_ks"),
        ("[pca]\neval_k = -3\n", "eval_k"),
        ('[interpolation]\npairs = [["a"]]\n', "pairs"),
        ("[sampling]\nkinds = [[1]]\n", "kinds"),
        ("[gallery]\nedit_strengths = [nan]\n", "edit_strengths"),
        ("[nope]\nx = 1\n", "nope"),
        ("manifold = 3\n", "manifold"),
        ('[analyze]\n"\\u001b[31m" = 1\n', "\\x1b[31m"),  # a control character is shown escaped
        ("[analyze\n", "TOML"),
        (b"\xff\xfe\x00", "UTF-8"),
    ],
)
def test_config_hostile_values_refused(tmp_path: Path, text: str | bytes, key: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = one_line_naming(info.value, str(path), key)
    assert "\x1b" not in message


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
        "a = " + "{b=" * 100_000 + "1" + "}" * 100_000 + "\n",
        "x." * 100_000 + "y = 1\n",  # tomllib is quadratic in a dotted key's length
        "[" + "x." * 50_000 + "y]\n",
    ],
)
def test_config_nested_deep_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "deep.toml", text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.perf_counter() - t0 < 5
    one_line_naming(info.value, str(path))
    # Positive control: the same characters inside a string are not structure.
    ok = write(tmp_path / "ok.toml", '[analyze]\nlabels = """' + text[:2000].replace('"', "") + '"""\n')
    assert load_config(ok).labels is not None


def test_config_tomllib_recursion_error_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind the shape check, a RecursionError from the parser itself still becomes a ConfigError."""
    import tomllib

    path = write(tmp_path / "c.toml", "[analyze]\nseed = 1\n")
    assert load_config(path).seed == 1

    def recurse(_text: str) -> dict:
        raise RecursionError

    monkeypatch.setattr(tomllib, "loads", recurse)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    one_line_naming(info.value, str(path), "nested")


_KEYS = st.sampled_from(
    ["analyzers", "n_components", "seed", "device", "labels", "center", "solver", "methods", "n_neighbors", "c", "x"]
)
_SCALARS = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=8)
)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3), max_leaves=8
)
_TABLES = st.sampled_from(["analyze", "manifold", "pca", "probes", "sampling", "interpolation", "gallery", "zzz"])


@settings(max_examples=FUZZ or 150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.dictionaries(_TABLES, st.dictionaries(_KEYS, _VALUES, max_size=4), max_size=3),
    noise=st.text(alphabet='[]{}=.,"#\n abc1', max_size=40),
    use_noise=st.booleans(),
)
def test_config_fuzz_config_error_or_success(tmp_path: Path, doc: dict, noise: str, use_noise: bool) -> None:
    text = "".join(
        f"[{t}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()) for t, table in doc.items()
    )
    path = write(tmp_path / "fuzz.toml", noise if use_noise else text)
    try:
        config = load_config(path)
    except ConfigError as exc:
        one_line_naming(exc, str(path))
    else:
        assert isinstance(config, AnalyzeConfig)


# ------------------------------------------------------------------------------------------- 2. labels

IDS = ["a", "b", "c", "d"]


def test_labels_non_finite_values_are_missing_with_a_warning(tmp_path: Path) -> None:
    """inf/-inf (text or JSON Infinity) are missing, with a warning naming the column and ids; nan is missing."""
    csv_path = write(tmp_path / "l.csv", "id,x,y\na,1,yes\nb,inf,no\nc,-inf,yes\nd,nan,no\n")
    frame = load_labels(csv_path, IDS)
    assert frame["x"].tolist()[0] == 1.0 and frame["x"].isna().tolist() == [False, True, True, True]
    assert any("'x'" in w and "infinite" in w and "'b'" in w for w in frame.attrs["warnings"])
    records = '[{"id": "a", "x": Infinity}, {"id": "b", "x": NaN}, {"id": "c", "x": 2}, {"id": "d", "x": 3}]'
    js = write(tmp_path / "l.json", records)
    frame = load_labels(js, IDS)
    assert frame["x"].isna().tolist() == [True, True, False, False]
    # Positive control: BOMs are ignored, finite values are kept as numbers.
    bom = write(tmp_path / "bom.csv", "\ufeffid,x\na,1\nb,2\nc,3\nd,4\n")
    assert load_labels(bom, IDS)["x"].tolist() == [1.0, 2.0, 3.0, 4.0]
    bom_json = write(tmp_path / "bom.json", "\ufeff" + json.dumps({"a": {"x": 1}, "b": {"x": 2}}))
    assert load_labels(bom_json, IDS)["x"].tolist()[:2] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("nested.json", json.dumps([{"id": "a", "x": {"k": 1}}, {"id": "b", "x": 2}]), "'x'"),
        ("list.json", json.dumps([{"id": "a", "x": [1, 2]}, {"id": "b", "x": 2}]), "'a'"),
        ("id_list.json", json.dumps([{"id": ["a"], "x": 1}, {"id": "b", "x": 2}]), "'id'"),
        ("keyed.json", '{"a": {"x": {"y": 1}}, "b": {"x": 2}}', "'x'"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested"),
        ("deep_obj.json", '{"a":' * 100_000 + "1" + "}" * 100_000, "nested"),
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "line 1"),
        ("number.json", "3", "JSON"),
        ("null.json", "null", "JSON"),
        ("string.json", '"x"', "JSON"),
        ("line.jsonl", '{"id": "a", "x": 1}\n[1]\n', "line 2"),
        ("dup.csv", "id,x\na,1\na,2\nb,3\n", "'a'"),
        ("dupkey.json", '{"a": {"x": 1}, "a": {"x": 2}, "b": {"x": 3}}', "'a'"),
        ("control.csv", "id,x\x1b[31m\na,1\nb,2\n", "\\x1b"),
        ("empty.csv", "", "empty"),
        ("empty.json", "", "empty"),
        ("binary.csv", b"\xff\xfe\x00\x01", "CSV"),
        ("broken.parquet", b"PAR1garbagePAR1", "PARQUET"),
    ],
)
def test_labels_hostile_files_refused(tmp_path: Path, name: str, text: str | bytes, fragment: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(WsaError) as info:
        load_labels(path, IDS)
    message = one_line_naming(info.value, str(path), fragment)
    assert "\x1b" not in message and len(message) < 600


_LABEL_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(["inf", "-inf", "nan", "=1+1", "\x1b", ""]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


@settings(max_examples=FUZZ or 120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(
        st.fixed_dictionaries(
            {"id": st.sampled_from(IDS) | _LABEL_VALUES},
            optional={"x": _LABEL_VALUES, "y": _LABEL_VALUES, "=f": _LABEL_VALUES},
        ),
        max_size=6,
    ),
    top=st.sampled_from(["records", "keyed", "columns", "jsonl"]),
)
def test_labels_fuzz_json_wsa_error_or_frame(tmp_path: Path, records: list, top: str) -> None:
    if top == "records":
        text, name = json.dumps(records), "f.json"
    elif top == "jsonl":
        text, name = "\n".join(json.dumps(r) for r in records), "f.jsonl"
    elif top == "keyed":
        text, name = (
            json.dumps({str(r.get("id")): {k: v for k, v in r.items() if k != "id"} for r in records}),
            "f.json",
        )
    else:
        keys = sorted({k for r in records for k in r})
        text, name = json.dumps({k: [r.get(k) for r in records] for k in keys}), "f.json"
    path = write(tmp_path / name, text)
    try:
        frame = load_labels(path, IDS)
    except WsaError as exc:
        one_line_naming(exc, str(path))
    else:
        assert list(frame.index) == IDS
        for col in frame.columns:
            values = frame[col].dropna().tolist()
            assert not any(isinstance(v, (dict, list)) for v in values)
            assert not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def test_metadata_labels_and_parsing_survive_hostile_metadata(tmp_path: Path) -> None:
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    header = {
        "ss_network_dim": "²",  # str.isdigit() is True, int() is not
        "ss_network_alpha": "+-5",
        "ss_seed": "9" * 5000,  # beyond int's digit limit
        "ss_learning_rate": "nan",
        "ss_output_name": "x" * 10_000_000,
        "ss_tag_frequency": deep,
        "ss_\x1bevil": "v",
        "ss_" + "k" * 1000: "v",
    }
    out = parse_training_metadata(header)
    assert "ss_\x1bevil" not in out and not any(len(k) > 200 for k in out)
    assert len(out["ss_output_name"]) <= 200 and "trigger_words" not in out
    assert out["ss_network_dim"] == "²" and out["ss_learning_rate"] == "nan"  # kept as (short) text, not a number
    assert trigger_words('{"d": {"cat": 3, "dog": "2", "x": {"y": 1}, "z": NaN, "w": 1e999}}') == ["cat", "dog"]
    # Positive control: a normal header parses to numbers and trigger words.
    ok = parse_training_metadata({"ss_network_dim": "16", "ss_tag_frequency": '{"d": {"cat": 3, "dog": 1}}'})
    assert ok == {"ss_network_dim": 16, "trigger_words": "cat, dog"}

    rows = [
        {"id": "a", "family": "sd15", "training": {"ss_x": "p", "ss_y": float("nan"), "ss_z": {"deep": [1]}}},
        {"id": "b", "family": "sd15", "training": {"ss_x": "q", "ss_y": 2.0, "ss_z": [1, 2], "\x1b": "e"}},
        {"id": "c", "family": "sd15", "training": ["not", "a", "dict"]},
        {"id": "d", "family": "sd15", "training": {"ss_x": "p", "ss_y": 1.0}},
        "not a row",
    ]
    path = metadata_labels(rows, "metadata", tmp_path / "meta.json")
    frame = load_labels(path, IDS)
    assert "ss_z" not in frame.columns or frame["ss_z"].isna().all()
    assert frame.loc["a", "ss_x"] == "p" and math.isnan(frame.loc["a", "ss_y"])


# --------------------------------------------------------------------------------- 3. degenerate collections


def test_identical_adapters_give_a_report_with_a_note(tmp_path: Path, adapters: list[Path]) -> None:
    """Ten copies of one adapter: every analyzer is skipped with the reason, no crash (was pca.py:127)."""
    res = run(collection(tmp_path / "same", [adapters[0]] * 10), tmp_path / "rep")
    assert any("all adapters are identical: no variance to analyse" in w for w in res["run"]["warnings"])
    sections = {r["analyzer"]: r for r in res["results"]}
    assert sections["pca"]["data"]["skipped_because"].startswith("all adapters are identical")
    assert "identical" in (tmp_path / "rep" / "index.html").read_text()


def test_small_collections_skip_what_needs_more(tmp_path: Path, adapters: list[Path]) -> None:
    labels = write(tmp_path / "l.csv", "id,attr,const\nm0,yes,7\nm1,no,7\nm2,yes,7\nm3,no,7\nm4,yes,7\nm5,no,7\n")
    # Positive control: six different adapters run every default analyzer, manifold included.
    six = run(collection(tmp_path / "six", adapters[:6]), tmp_path / "r6", labels=str(labels))
    ran = {r["analyzer"] for r in six["results"] if "skipped_because" not in r["data"]}
    assert {"pca", "manifold", "probes", "sampling"} <= ran
    assert any("'const'" in w and "single value" in w for w in six["run"]["warnings"])  # the constant column
    # Three adapters with the default analyzers: manifold is skipped with its reason, the run succeeds.
    three = run(collection(tmp_path / "three", adapters[:3]), tmp_path / "r3")
    manifold = next(r for r in three["results"] if r["analyzer"] == "manifold")
    assert "at least 5" in manifold["data"]["skipped_because"]
    assert any(w.startswith("manifold: skipped") for w in three["run"]["warnings"])
    assert "pca" in {r["analyzer"] for r in three["results"] if "skipped_because" not in r["data"]}
    # Two: sampling is skipped, PCA still has its one component, outliers run.
    two = run(collection(tmp_path / "two", adapters[:2]), tmp_path / "r2", analyzers=["pca", "sampling", "outliers"])
    skipped = {r["analyzer"] for r in two["results"] if "skipped_because" in r["data"]}
    assert skipped == {"sampling"}
    # One: a clear refusal naming the store.
    with pytest.raises(ConfigError) as info:
        run(collection(tmp_path / "one", adapters[:1]), tmp_path / "r1")
    one_line_naming(info.value, "1 adapter", "at least 2")


def test_pca_alone_skips_on_zero_variance(tmp_path: Path, adapters: list[Path]) -> None:
    from wsa.analyses import AnalysisContext, get_analyzer
    from wsa.space import fit_space
    from wsa.store import ingest

    store = ingest([collection(tmp_path / "same", [adapters[1]] * 4)], tmp_path / "store", progress=False)
    space = fit_space(store, 3, progress=False)
    with pytest.raises(SkipAnalysis, match="identical"):
        get_analyzer("pca")().fit(AnalysisContext(store=store, space=space, progress=False))


# --------------------------------------------------------------------------------------------- 4. non-finite


def test_non_finite_rows_are_named(tmp_path: Path, adapters: list[Path]) -> None:
    from wsa.pipeline import nonfinite_rows
    from wsa.store import ingest, open_store

    store = ingest([collection(tmp_path / "c", adapters[:5])], tmp_path / "store", progress=False)
    assert nonfinite_rows(store) == []  # positive control
    matrix = np.load(store.matrix_path, mmap_mode="r+")
    bad = store.ids[3]
    matrix[3, 2] = np.nan
    matrix.flush()
    del matrix
    assert nonfinite_rows(open_store(tmp_path / "store")) == [bad]
    with pytest.raises(WsaError) as info:
        run(tmp_path / "store", tmp_path / "rep", analyzers=["pca"])
    one_line_naming(info.value, repr(bad), "NaN or Inf")


def test_report_notes_non_finite_values(tmp_path: Path) -> None:
    from wsa.analyses.base import Metric, Result, Table

    result = Result(
        "x",
        "X",
        "summary",
        metrics=(Metric("m", float("nan")),),
        tables=(Table("t", "c", ("id", "v"), (("a", float("inf")), ("b", 1.5))),),
        data={"arr": np.array([1.0, np.nan, -np.inf])},
    )
    clean = Result("y", "Y", "summary", metrics=(Metric("m", 0.5),))
    write_report([result, clean], {"title": "t"}, tmp_path)
    text = (tmp_path / "results.json").read_text()

    def strict(name: str) -> None:
        raise AssertionError(f"{name} in results.json")

    payload = json.loads(text, parse_constant=strict)
    notes = {r["analyzer"]: r["notes"] for r in payload["results"]}
    assert any("4 non-finite value(s)" in n for n in notes["x"]) and notes["y"] == []
    rows = list(csv.reader((tmp_path / "x_t.csv").read_text().splitlines()))
    assert rows[1] == ["a", ""] and rows[2] == ["b", "1.5"]


# ---------------------------------------------------------------------------------------------------- 5. CSV


def test_csv_cells_and_headers_are_neutralised(tmp_path: Path, adapters: list[Path]) -> None:
    from wsa.analyses.base import Table

    table = Table(
        "t",
        "c",
        ('=HYPERLINK("http://x","y")', "\tcol", "value"),
        (("\tid", "\rid", -1.5), ("=1+1", "@x", -3), ("ok", "-x", 0.25)),
    )
    rows = list(csv.reader(io.StringIO(_csv_bytes(table).decode(), newline="")))
    assert rows[0] == ['\'=HYPERLINK("http://x","y")', "'\tcol", "value"]
    assert rows[1] == ["'\tid", "'\rid", "-1.5"]  # numbers stay numbers, a negative one too
    assert rows[2] == ["'=1+1", "'@x", "-3"] and rows[3] == ["ok", "'-x", "0.25"]
    # End to end: a label column named as a formula reaches no CSV as one.
    labels = write(tmp_path / "l.csv", '"=HYPERLINK(""http://x"")",id\nyes,m0\nno,m1\nyes,m2\nno,m3\nyes,m4\nno,m5\n')
    run(collection(tmp_path / "c", adapters[:6]), tmp_path / "rep", labels=str(labels), analyzers=["pca", "probes"])
    seen = False
    for path in (tmp_path / "rep").glob("*.csv"):
        for row in csv.reader(path.read_text().splitlines()):
            for cell in row:
                seen |= "HYPERLINK" in cell
                if cell.startswith(FORMULA):
                    float(cell)  # only numbers may start with - or +
    assert seen


# ----------------------------------------------------------------------------------------------- 6. terminal


def test_cli_echo_is_terminal_safe(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsa.cli import main

    listing = CliRunner().invoke(main, ["analyze", "--list"])
    assert listing.exit_code == 0 and "pca" in listing.output and "\x1b" not in listing.output
    bad = write(tmp_path / "c.toml", '[analyze]\n"\\u001b]0;pwned\\u0007" = 1\n')
    result = CliRunner().invoke(main, ["analyze", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "error:" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "\\x1b" in result.output


def test_python_config_is_checked_too(tmp_path: Path) -> None:
    """A config built in Python (or by the CLI's overrides) gets the same checks before any work."""
    for bad, key in ((AnalyzeConfig(n_components="5"), "n_components"), (AnalyzeConfig(analyzers="pca,x"), "'x'")):
        with pytest.raises(ConfigError) as info:
            run_analysis([tmp_path], tmp_path / "out", bad, progress=False)
        one_line_naming(info.value, key)
    good = AnalyzeConfig(analyzers="pca, manifold")
    good.check()
    assert good.analyzers == ["pca", "manifold"]
