"""Label tables: every file type joins on adapter ids, every bad table ends in one clear line, and
every column gets the kind (and 0/1 rule) the docs promise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsa.errors import ConfigError, FormatError
from wsa.labels import attribute_kinds, describe_attributes, load_labels

IDS = ["m0", "m1", "m2", "m3"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    """Every error names the file and fits on one line (the CLI prints it as is)."""
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --------------------------------------------------------------------------------------- file types

RECORDS = [
    {"id": "m0", "smile": "yes", "age": 31},
    {"id": "m1", "smile": "no", "age": 45.5},
    {"id": "m2", "smile": "yes", "age": 22},
    {"id": "m3", "smile": "no", "age": 60},
]


def check_frame(frame: pd.DataFrame) -> None:
    assert list(frame.index) == IDS
    assert frame.index.name == "id"
    assert list(frame.columns) == ["smile", "age"]
    assert frame["age"].dtype == np.float64
    np.testing.assert_allclose(frame["age"].to_numpy(), [31, 45.5, 22, 60])
    assert list(frame["smile"]) == ["yes", "no", "yes", "no"]
    assert frame.attrs["missing_ids"] == []
    assert frame.attrs["extra_ids"] == []


def test_csv_strips_values_and_names(tmp_path):
    # Spaces around names and values (hand-edited spreadsheets) must not break the join.
    path = write(tmp_path / "a.csv", " id , smile ,age\n m0 , yes ,31\nm1,no, 45.5\nm2,yes,22\nm3 ,no,60\n")
    check_frame(load_labels(path, IDS))


def test_tsv(tmp_path):
    path = write(tmp_path / "a.tsv", "id\tsmile\tage\nm0\tyes\t31\nm1\tno\t45.5\nm2\tyes\t22\nm3\tno\t60\n")
    check_frame(load_labels(path, IDS))


def test_json_records(tmp_path):
    check_frame(load_labels(write(tmp_path / "a.json", json.dumps(RECORDS)), IDS))


def test_json_columns(tmp_path):
    columns = {key: [r[key] for r in RECORDS] for key in ("id", "smile", "age")}
    check_frame(load_labels(write(tmp_path / "a.json", json.dumps(columns)), IDS))


def test_json_keyed_by_id(tmp_path):
    keyed = {r["id"]: {"smile": r["smile"], "age": r["age"]} for r in RECORDS}
    check_frame(load_labels(write(tmp_path / "a.json", json.dumps(keyed)), IDS))


def test_jsonl(tmp_path):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n")
    check_frame(load_labels(path, IDS))


def test_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "a.parquet"
    pd.DataFrame(RECORDS).to_parquet(path)
    check_frame(load_labels(path, IDS))


def test_id_column_choice(tmp_path):
    # 'model' is found by name even when not first; an explicit id_column wins; else the first column.
    by_name = write(tmp_path / "a.csv", "smile,model\nyes,m0\nno,m1\n")
    assert list(load_labels(by_name, IDS[:2]).columns) == ["smile"]
    explicit = write(tmp_path / "b.csv", "key,smile,name\nm0,yes,x\nm1,no,y\n")
    assert list(load_labels(explicit, IDS[:2], id_column="key").columns) == ["smile", "name"]
    first = write(tmp_path / "c.csv", "adapter,smile\nm0,yes\nm1,no\n")
    assert load_labels(first, IDS[:2]).attrs["id_column"] == "adapter"


def test_numeric_ids_in_json_match_string_ids(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"id": i, "x": float(i)} for i in range(4)]))
    frame = load_labels(path, ["0", "1", "2", "3"])
    np.testing.assert_allclose(frame["x"].to_numpy(), [0, 1, 2, 3])


def test_order_follows_store_ids(tmp_path):
    path = write(tmp_path / "a.csv", "id,x\nm3,3\nm1,1\nm0,0\nm2,2\n")
    frame = load_labels(path, IDS)
    np.testing.assert_allclose(frame["x"].to_numpy(), [0, 1, 2, 3])


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(ConfigError) as exc:
        load_labels(path, IDS)
    assert "not found" in one_line(exc, path)


def test_unsupported_suffix(tmp_path):
    path = write(tmp_path / "a.xlsx", "x")
    with pytest.raises(ConfigError) as exc:
        load_labels(path, IDS)
    assert ".csv" in one_line(exc, path)


def test_unreadable_json(tmp_path):
    path = write(tmp_path / "a.json", "{not json")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "cannot read as JSON" in one_line(exc, path)


def test_wrong_json_shape(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([1, 2, 3]))
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "one object per adapter" in one_line(exc, path)


def test_empty_file(tmp_path):
    path = write(tmp_path / "a.csv", "")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "empty" in one_line(exc, path)


def test_no_such_id_column(tmp_path):
    path = write(tmp_path / "a.csv", "id,x\nm0,1\n")
    with pytest.raises(ConfigError) as exc:
        load_labels(path, IDS, id_column="adapter")
    message = one_line(exc, path)
    assert "no id column 'adapter'" in message
    assert "'id'" in message  # the columns that do exist


def test_only_id_column(tmp_path):
    path = write(tmp_path / "a.csv", "id\nm0\nm1\n")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "attribute column" in one_line(exc, path)


def test_duplicate_ids(tmp_path):
    # ' m1' and 'm1' are the same id once stripped.
    path = write(tmp_path / "a.csv", "id,x\nm0,1\nm1,2\n m1,3\nm2,4\n")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    message = one_line(exc, path)
    assert "duplicate ids" in message
    assert "'m1'" in message
    assert "'m0'" not in message


def test_empty_id(tmp_path):
    path = write(tmp_path / "a.csv", "id,x\nm0,1\n,2\n")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "no id" in one_line(exc, path)


def test_extra_and_missing_ids_are_reported_not_fatal(tmp_path):
    path = write(tmp_path / "a.csv", "id,x\nm0,1\nm1,2\nm2,5\nzz,9\nyy,8\n")
    frame = load_labels(path, IDS)
    assert frame.attrs["extra_ids"] == ["zz", "yy"]
    assert frame.attrs["missing_ids"] == ["m3"]
    assert np.isnan(frame.loc["m3", "x"])
    assert frame.loc["m2", "x"] == 5
    assert any("not in the store" in w for w in frame.attrs["warnings"])
    assert any("no labels" in w for w in frame.attrs["warnings"])


def test_no_matching_ids_shows_examples_from_both_sides(tmp_path):
    path = write(tmp_path / "a.csv", "id,x\nmodel_0,1\nmodel_1,2\nmodel_2,3\nmodel_3,4\n")
    with pytest.raises(ConfigError) as exc:
        load_labels(path, IDS)
    message = one_line(exc, path)
    assert "'model_0', 'model_1', 'model_2'" in message
    assert "'m0', 'm1', 'm2'" in message
    assert "'model_3'" not in message  # three examples, not the whole list


def test_non_numeric_value_in_numeric_column(tmp_path):
    path = write(tmp_path / "a.csv", "id,age\nm0,31\nm1,45\nm2,old\nm3,60\n")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    message = one_line(exc, path)
    assert "'age'" in message
    assert "'old'" in message
    assert "'m2'" in message


def test_text_column_is_not_numeric_looking(tmp_path):
    # Mostly words with one number is a categorical column, not a broken numeric one.
    path = write(tmp_path / "a.csv", "id,hair\nm0,blond\nm1,brown\nm2,black\nm3,7\n")
    assert list(load_labels(path, IDS)["hair"]) == ["blond", "brown", "black", "7"]


def test_single_valued_attribute_is_flagged(tmp_path):
    path = write(tmp_path / "a.csv", "id,x,same\nm0,1,a\nm1,2,a\nm2,3,a\nm3,4,a\n")
    frame = load_labels(path, IDS)
    assert frame.attrs["constant_columns"] == ["same"]
    info = describe_attributes(frame)["same"]
    assert info.kind == "ignored"
    assert "single value" in info.reason


def test_all_attributes_single_valued(tmp_path):
    path = write(tmp_path / "a.csv", "id,same\nm0,a\nm1,a\n")
    with pytest.raises(FormatError) as exc:
        load_labels(path, IDS)
    assert "single value" in one_line(exc, path)


# ------------------------------------------------------------------------------------------- kinds


def frame_of(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame(columns, index=[f"m{i}" for i in range(n)])


NA = np.nan


@pytest.mark.parametrize(
    ("values", "one", "rule", "expected"),
    [
        (["yes", "no", "yes", None], "yes", "yes/no", [1, 0, 1, NA]),
        (["No", "Yes", "Yes", "No"], "Yes", "yes/no", [0, 1, 1, 0]),  # case-insensitive
        (["false", "true", "true", "false"], "true", "true/false", [0, 1, 1, 0]),
        ([True, False, True, None], "True", "boolean", [1, 0, 1, NA]),
        ([-1.0, 1.0, 1.0, -1.0], "1", "larger value", [0, 1, 1, 0]),  # w2w / CelebA ±1
        ([0.0, 1.0, 0.0, NA], "1", "larger value", [0, 1, 0, NA]),
        (["brown", "blond", "brown", "blond"], "brown", "lexicographically later", [1, 0, 1, 0]),
    ],
)
def test_binary_rule(values, one, rule, expected):
    info = describe_attributes(frame_of(a=values))["a"]
    assert info.kind == "binary"
    assert info.rule == rule
    assert info.mapping[one] == 1
    assert sorted(info.mapping.values()) == [0, 1]
    np.testing.assert_array_equal(info.encode(pd.Series(values)), expected)


def test_minus_one_plus_one_from_csv(tmp_path):
    # As in w2w's CelebA-derived labels: -1 = absent, +1 = present.
    path = write(tmp_path / "a.csv", "id,Male,Young\nm0,-1,1\nm1,1,1\nm2,1,-1\nm3,-1,-1\n")
    frame = load_labels(path, IDS)
    info = describe_attributes(frame)
    assert attribute_kinds(frame) == {"Male": "binary", "Young": "binary"}
    np.testing.assert_array_equal(info["Male"].encode(frame["Male"]), [0, 1, 1, 0])


def test_continuous_categorical_ignored():
    rng = np.random.default_rng(0)
    frame = frame_of(
        score=rng.standard_normal(60),
        hair=list(np.array(["black", "blond", "brown", "red"])[rng.integers(0, 4, 60)]),
        name=[f"person {i}" for i in range(60)],  # 60 distinct strings: too many categories
        empty=[np.nan] * 60,
        ordinal=list(rng.integers(1, 4, 60).astype(float)),  # 1, 2, 3: numeric with 3 values
    )
    kinds = attribute_kinds(frame)
    assert kinds == {
        "score": "continuous",
        "hair": "categorical",
        "name": "ignored",
        "empty": "ignored",
        "ordinal": "continuous",
    }
    info = describe_attributes(frame)
    assert info["hair"].classes == ("black", "blond", "brown", "red")
    assert "more than 50" in info["name"].reason
    assert info["empty"].reason == "no labelled rows"
    codes = info["hair"].encode(frame["hair"])
    assert [info["hair"].classes[int(c)] for c in codes] == list(frame["hair"])


def test_two_valued_numbers_are_binary_not_continuous():
    # Negative control for the continuous rule: exactly two distinct numbers is binary.
    assert attribute_kinds(frame_of(a=[3.0, 7.0, 3.0, 7.0])) == {"a": "binary"}
    assert attribute_kinds(frame_of(a=[3.0, 7.0, 3.0, 8.0])) == {"a": "continuous"}


def test_encode_refuses_ignored():
    info = describe_attributes(frame_of(a=["x", "x"]))["a"]
    with pytest.raises(ConfigError, match="not probed"):
        info.encode(pd.Series(["x", "x"]))
