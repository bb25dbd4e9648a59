"""Hostile adapter files, one test per class (issue 12): each is a one-line FormatError naming the file,
skipped under ``--skip-bad``, never a traceback, never slow. Each class has a positive control: the same
file without the defect loads (``tests/hostile.good_kohya`` / ``write_peft``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import save

import wsa
from tests.hostile import GOOD_DATA, GOOD_HEADER, KEY, PEFT_NAME, _deep, good_kohya, join_safetensors, write_peft
from tests.tiny import reference_deltas
from wsa.cli import main
from wsa.formats._modules import pattern_value


def expect(path: Path, *fragments: str, blame: Path | None = None) -> str:
    with pytest.raises(wsa.FormatError) as info:
        wsa.load_adapter(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(blame or path)), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def header_file(tmp_path: Path, header: object, data: bytes = GOOD_DATA) -> Path:
    path = tmp_path / "h.safetensors"
    path.write_bytes(join_safetensors(header, data))
    return path


def test_positive_controls(tmp_path: Path) -> None:
    assert wsa.load_adapter(header_file(tmp_path, GOOD_HEADER)).format == "kohya"
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()
    assert wsa.load_adapter(write_peft(tmp_path / "p", config)).format == "peft"


# ------------------------------------------------------------------------------ safetensors headers


@pytest.mark.parametrize("opener", ["[", "{"])
def test_header_nested_deep(tmp_path: Path, opener: str) -> None:
    start = time.perf_counter()
    expect(header_file(tmp_path, _deep(100_000, opener)), "nested too deeply")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("header", [[1, 2], 7, "x", None])
def test_header_not_an_object(tmp_path: Path, header: object) -> None:
    expect(header_file(tmp_path, header), "not an object")


def test_entry_without_data_offsets(tmp_path: Path) -> None:
    header = json.loads(json.dumps(GOOD_HEADER))
    del header[f"{KEY}.lora_up.weight"]["data_offsets"]
    expect(header_file(tmp_path, header), "data_offsets")


def test_overlapping_and_trailing_bytes(tmp_path: Path) -> None:
    header = json.loads(json.dumps(GOOD_HEADER))
    down, up = header[f"{KEY}.lora_down.weight"], header[f"{KEY}.lora_up.weight"]
    up["data_offsets"] = list(down["data_offsets"])  # same bytes read as two tensors
    expect(header_file(tmp_path, header), "overlap")
    expect(header_file(tmp_path / "..", GOOD_HEADER, GOOD_DATA + b"\0" * 8), "after the last tensor")


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    header = {**GOOD_HEADER, "__metadata__": {"ss_network_dim": 4}}
    expect(header_file(tmp_path, header), "__metadata__")


# ------------------------------------------------------------------------------ factors


def kohya(tmp_path: Path, **changes: torch.Tensor) -> Path:
    tensors = good_kohya()
    for part, t in changes.items():
        tensors[f"{KEY}.{part}"] = t
    path = tmp_path / f"k{len(list(tmp_path.iterdir()))}.safetensors"
    path.write_bytes(save(tensors))
    return path


def test_rank_zero(tmp_path: Path) -> None:
    path = kohya(tmp_path, **{"lora_down.weight": torch.zeros(0, 8), "lora_up.weight": torch.zeros(8, 0)})
    expect(path, "rank 0")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_and_bool_factors(tmp_path: Path, dtype: torch.dtype) -> None:
    path = kohya(tmp_path, **{"lora_down.weight": torch.ones(4, 8).to(dtype)})
    expect(path, "not float")


def test_three_dimensional_down(tmp_path: Path) -> None:
    expect(kohya(tmp_path, **{"lora_down.weight": torch.ones(4, 8, 2)}), "3-D")


@pytest.mark.parametrize("alpha", [math.nan, math.inf])
def test_non_finite_alpha_tensor(tmp_path: Path, alpha: float) -> None:
    expect(kohya(tmp_path, alpha=torch.tensor(alpha)), "alpha")


# ------------------------------------------------------------------------------ PEFT configs


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ([1, 2], "not an object"),
        (None, "not an object"),
        ({"r": 4, "lora_alpha": "abc"}, "lora_alpha must be a finite number"),
        ({"r": 4, "lora_alpha": math.nan}, "lora_alpha must be a finite number"),
        ({"r": 4, "lora_alpha": math.inf}, "lora_alpha must be a finite number"),
        ({"r": True, "lora_alpha": 4}, "r must be a positive integer"),
        ({"r": 0, "lora_alpha": 4}, "r must be a positive integer"),
        ({"r": 4, "rank_pattern": ["to_q"]}, "rank_pattern must be an object"),
        ({"r": 4, "rank_pattern": {"to_q": "two"}}, "positive integer"),
        ({"r": 4, "rank_pattern": {"to_[q": 4}}, "not a valid regular expression"),
        ({"r": 4, "alpha_pattern": {"to_q": math.nan}}, "finite number"),
        ({"r": 4, "use_rslora": "yes"}, "use_rslora"),
        ({"peft_type": ["LORA"]}, "PEFT type"),
    ],
)
def test_bad_peft_config(tmp_path: Path, config: object, fragment: str) -> None:
    folder = write_peft(tmp_path / "a", json.dumps(config).encode())  # json.dumps writes NaN/Infinity as peft reads
    expect(folder, fragment, blame=folder / "adapter_config.json")


def test_peft_config_nested_deep(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", _deep(100_000, "["))
    expect(folder, "nested too deeply", blame=folder / "adapter_config.json")


@pytest.mark.parametrize("pattern", ["(a|aa)*b", "(a+)+b", "(.*)*x", "(?P<g>a)(?P=g)", "a*b*c*d"])
def test_redos_patterns_are_refused_fast(tmp_path: Path, pattern: str) -> None:
    name = "a" * 40
    config = json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {pattern: 4}}).encode()
    folder = write_peft(tmp_path / "a", config, weights_name=name)
    start = time.perf_counter()
    expect(folder, "will not run", blame=folder / "adapter_config.json")
    assert time.perf_counter() - start < 1


def _peft_match(patterns: dict[str, int], module: str) -> int | None:
    """peft's own rule (peft.utils.other.get_pattern_key), for the patterns wsa accepts."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key) if key in patterns else None


words = st.sampled_from(["down_blocks", "0", "1", "attn1", "attn2", "to_q", "to_k", "to_out", "proj_in", "ff"])
names = st.lists(words, min_size=1, max_size=6).map(".".join)


@settings(max_examples=200, deadline=None, database=None)
@given(module=names, keys=st.lists(names | st.sampled_from(["to_.", "attn[12].to_q", "to_(q|k)", ".*_k"]), max_size=4))
def test_pattern_lookup_agrees_with_peft(module: str, keys: list[str]) -> None:
    patterns = {k: i + 1 for i, k in enumerate(dict.fromkeys(keys))}
    assert pattern_value(patterns, module, "cfg", "rank_pattern") == _peft_match(patterns, module)


def test_lora_alpha_zero_follows_peft(tmp_path: Path) -> None:
    """peft: scaling = lora_alpha / r, so alpha 0 means ΔW = 0 (kohya reads 0 as alpha = rank; not here)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=0, target_modules=["0"], init_lora_weights=False))
    assert float(reference_deltas(peft_model)["0"].abs().max()) == 0.0  # peft's own answer
    for alpha, zero in ((0, True), (8, False)):
        folder = write_peft(tmp_path / f"a{alpha}", json.dumps({"r": 4, "lora_alpha": alpha}).encode())
        delta = wsa.load_adapter(folder).delta(PEFT_NAME)
        assert bool(float(delta.abs().max()) == 0.0) is zero


# ------------------------------------------------------------------------------ the file system


def test_symlinks_fifo_and_folders(tmp_path: Path) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    expect(loop, "symlink loop")
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "missing.safetensors")
    expect(dangling, "broken symlink")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    expect(fifo, "not a regular file")
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(wsa.FormatError):
        wsa.load_adapter(folder)


def test_unreadable_and_vanishing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = header_file(tmp_path, GOOD_HEADER)

    def denied(self: Path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    expect(path, "Permission denied")
    monkeypatch.undo()

    real = Path.read_bytes

    def vanish(self: Path) -> bytes:
        if self.suffix == ".safetensors":
            self.unlink()
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", vanish)
    expect(path, "cannot read")


# ------------------------------------------------------------------------------ the commands


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """Two good adapters among one file of each hostile class above."""
    folder = tmp_path / "loras"
    folder.mkdir()
    for i in range(2):
        (folder / f"good{i}.safetensors").write_bytes(save(good_kohya()))
    (folder / "deep.safetensors").write_bytes(join_safetensors(_deep(100_000, "["), GOOD_DATA))
    (folder / "list.safetensors").write_bytes(join_safetensors([1], GOOD_DATA))
    tensors = good_kohya()
    tensors[f"{KEY}.lora_down.weight"] = torch.zeros(0, 8)
    tensors[f"{KEY}.lora_up.weight"] = torch.zeros(8, 0)
    (folder / "rank0.safetensors").write_bytes(save(tensors))
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    (folder / "dangling.safetensors").symlink_to(folder / "missing.safetensors")
    write_peft(folder / "nan_alpha", b'{"r": 4, "lora_alpha": NaN}')
    write_peft(folder / "redos", b'{"r": 4, "lora_alpha": 8, "rank_pattern": {"(a|aa)*b": 4}}')
    write_peft(folder / "list_config", b"[]")
    (folder / "evil\x1b[31m\nerror: forged.safetensors").write_bytes(b"\x01\x02")
    return folder


def test_ingest_skip_bad_skips_each_hostile_file(hostile_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(hostile_folder), "--out", str(tmp_path / "s"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    store = wsa.open_store(tmp_path / "s")
    assert sorted(store.ids) == ["good0", "good1"]
    problems = {Path(p["source"]).name for p in store.manifest["problems"]}
    assert len(problems) == 9, problems
    assert "\x1b" not in result.output and "\nerror: forged" not in result.output


def test_ingest_without_skip_bad_is_one_line(hostile_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(hostile_folder), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "\x1b" not in result.output
    assert re.search(r"error: .*", result.output)


def test_info_on_each_hostile_file(hostile_folder: Path) -> None:
    for path in sorted(hostile_folder.iterdir()):
        result = CliRunner().invoke(main, ["info", str(path)])
        assert result.exit_code in (0, 1, 2), (path, result.output)  # 2: click says the path does not exist
        assert result.exception is None or isinstance(result.exception, SystemExit), (path, result.exception)
        assert "\x1b" not in result.output, path


def test_unexpected_exception_is_one_line_without_debug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wsa.store

    def broken(*args, **kwargs):
        raise TypeError("something wsa did not expect")

    monkeypatch.setattr(wsa.store, "ingest", broken)
    (tmp_path / "a.safetensors").write_bytes(save(good_kohya()))
    result = CliRunner().invoke(main, ["ingest", str(tmp_path), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "internal error (TypeError: something wsa did not expect)" in result.output
    assert "--debug" in result.output
    debug = CliRunner().invoke(main, ["--debug", "ingest", str(tmp_path), "--out", str(tmp_path / "s")])
    assert isinstance(debug.exception, TypeError)


# ------------------------------------------------------------------------------ found by the red team


def test_a_poison_alpha_cannot_become_the_reference(tmp_path: Path) -> None:
    """An alpha of 1e-45 sorted first would make every other file's rescaled factors overflow."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_poison.safetensors").write_bytes(save({**good_kohya(), f"{KEY}.alpha": torch.tensor(1e-45)}))
    for i in range(3):
        (folder / f"good{i}.safetensors").write_bytes(save(good_kohya()))
    expect(folder / "a_poison.safetensors", "outside any trainer's range")
    result = CliRunner().invoke(main, ["ingest", str(folder), "--out", str(tmp_path / "s"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert sorted(wsa.open_store(tmp_path / "s").ids) == ["good0", "good1", "good2"]


@pytest.mark.parametrize(
    ("down", "up", "mid", "fragment"),
    [
        ((2, 8, 3, 3), (8, 2, 3, 3), None, "must be out × rank"),  # a kernel on both sides
        ((2, 8, 1, 1), (8, 2, 1, 1), (5, 5, 3, 3), "mid"),  # mid of another rank
        ((2, 8, 1, 1), (8, 2, 1, 1), (2, 2), "mid"),  # 2-D mid
        ((2, 8, 1, 3, 3), (8, 2, 1, 1), None, "different numbers of dimensions"),
    ],
)
def test_inconsistent_lora_shapes(tmp_path: Path, down, up, mid, fragment: str) -> None:
    changes = {"lora_down.weight": torch.randn(down), "lora_up.weight": torch.randn(up)}
    if mid is not None:
        changes["lora_mid.weight"] = torch.randn(mid)
    expect(kohya(tmp_path, **changes), fragment)
    ok = {"lora_down.weight": torch.randn(2, 8, 1, 1), "lora_up.weight": torch.randn(8, 2, 1, 1)}
    assert wsa.load_adapter(kohya(tmp_path, **ok, **{"lora_mid.weight": torch.randn(2, 2, 3, 3)})).modules


def test_factors_claiming_a_huge_delta_are_refused_fast(tmp_path: Path) -> None:
    """LoKr factors of a few kB can claim a ΔW of terabytes; checking them would form it."""
    name = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(save({f"{name}.lokr_w1": torch.randn(256, 256), f"{name}.lokr_w2": torch.randn(128, 128)}))
    start = time.perf_counter()
    expect(path, "larger than any model's layer")
    assert time.perf_counter() - start < 2


def test_pickles_of_parameters_float8_and_colliding_keys(tmp_path: Path) -> None:
    tensors = good_kohya()
    params = {k: torch.nn.Parameter(v) for k, v in tensors.items()}
    torch.save(params, tmp_path / "param.pt")
    assert wsa.load_adapter(tmp_path / "param.pt").modules  # a dict of nn.Parameter is a common way to save
    torch.save({**tensors, f"{KEY}.lora_up.weight": tensors[f"{KEY}.lora_up.weight"].to(torch.float8_e5m2)},
               tmp_path / "f8.pt")  # fmt: skip
    expect(tmp_path / "f8.pt", "unsupported type")
    torch.save({1: torch.ones(1), "1": torch.ones(1)}, tmp_path / "dup.pt")
    expect(tmp_path / "dup.pt", "two tensors named")


def test_peft_alpha_far_outside_any_range(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", json.dumps({"r": 4, "lora_alpha": 1e308}).encode())
    expect(folder, "outside any trainer's range", blame=folder / "adapter_config.json")


def test_huge_peft_config_is_refused_before_reading(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", b"{}")
    with (folder / "adapter_config.json").open("wb") as fh:
        fh.truncate(1 << 33)  # 8 GiB, sparse
    expect(folder, "larger than", blame=folder / "adapter_config.json")


@pytest.mark.parametrize(
    "layout",
    [
        "null",
        "7",
        '{"a.lora_A.weight": 4}',
        '{"a.lora_A.weight": [4, -2]}',
        '{"a.lora_A.weight": [1.5]}',
        "[[1, 2, 3]]",
    ],
)
def test_w2w_json_layouts_are_checked(tmp_path: Path, layout: str) -> None:
    from wsa.store.dataset import read_layout_file

    path = tmp_path / "layout.json"
    path.write_text(layout)
    with pytest.raises(wsa.FormatError) as info:
        read_layout_file(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    path.write_text('{"a.lora_A.weight": [1, 4], "a.lora_B.weight": [4, 1]}')
    assert read_layout_file(path) == [("a.lora_A.weight", (1, 4)), ("a.lora_B.weight", (4, 1))]


def test_analyze_does_not_write_through_planted_symlinks(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        t = good_kohya()
        t[f"{KEY}.lora_up.weight"] = torch.randn(8, 4, generator=g)
        (folder / f"m{i}.safetensors").write_bytes(save(t))
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (out / "store").symlink_to(victim)
    result = CliRunner().invoke(main, ["analyze", str(folder), "--analyzers", "pca", "--out", str(out)])
    assert result.exit_code == 1 and "symlink" in result.output, result.output
    assert list(victim.iterdir()) == []
    (out / "store").unlink()
    result = CliRunner().invoke(main, ["analyze", str(folder), "--analyzers", "pca", "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_more_modules_than_any_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsa.formats._modules as modules

    blocks = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{x}" for x in ("q", "k", "v")]
    tensors = {f"{b}.lora_down.weight": torch.randn(2, 8) for b in blocks}
    tensors.update({f"{b}.lora_up.weight": torch.randn(8, 2) for b in blocks})
    path = tmp_path / "many.safetensors"
    path.write_bytes(save(tensors))
    assert len(wsa.load_adapter(path).modules) == 3
    monkeypatch.setattr(modules, "MAX_MODULES", 2)
    expect(path, "3 modules: more than any model has")


def test_label_tables_too_wide_or_with_huge_names(tmp_path: Path) -> None:
    from wsa.labels import MAX_COLUMN_NAME, MAX_COLUMNS, load_labels

    ids = ["a", "b"]
    ok = tmp_path / "ok.csv"
    ok.write_text("id,beard\na,1\nb,0\n")
    assert list(load_labels(ok, ids).columns) == ["beard"]
    long_name = tmp_path / "long.csv"
    long_name.write_text(f"id,{'x' * (MAX_COLUMN_NAME + 1)}\na,1\nb,0\n")
    wide = tmp_path / "wide.csv"
    wide.write_text("id," + ",".join(f"c{i}" for i in range(MAX_COLUMNS + 1)) + "\na" + ",1" * (MAX_COLUMNS + 1) + "\n")
    for path, fragment in ((long_name, "longer than"), (wide, "more than")):
        with pytest.raises(wsa.WsaError, match=fragment) as info:
            load_labels(path, ids)
        assert str(info.value).startswith(str(path))
