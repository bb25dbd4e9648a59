"""Hostile stores and faults (issue 12): a manifest is input, nothing leaves its folder, finite or refused.

Each case has a positive control (the same path succeeding on good input), so a check that refused
everything would fail here too. Every refusal must be one line naming the file (and the manifest key).
"""

from __future__ import annotations

import collections
import fcntl
import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import wsa
from wsa.cli import main
from wsa.errors import CollectionError, FormatError, StoreError, WsaError
from wsa.store import builder
from wsa.store.dataset import dataset_sources
from wsa.synthetic import synth_collection

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
]
KEY = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(autouse=True)
def _general_reader_only(monkeypatch):
    from wsa.store import fastpath

    monkeypatch.setattr(fastpath, "_DISABLED", True)


def collection(root: Path, n: int = 4, seed: int = 0) -> Path:
    synth_collection(root, n, seed=seed, rank=2, modules=MODULES, n_factors=2, progress=False)
    return root


def peft(folder: Path, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    save_file(
        {f"{KEY}.lora_A.weight": a.contiguous(), f"{KEY}.lora_B.weight": b.contiguous()},
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": alpha, "target_modules": ["to_q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def one_line(exc: BaseException, *names: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for name in names:
        assert name in text, (name, text)
    return text


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def tamper(store: Path, edit) -> None:
    path = store / "wsa_store.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("built")
    wsa.ingest(collection(root / "loras"), root / "store", progress=False)
    return root / "store"


def copy_store(built: Path, dst: Path) -> Path:
    shutil.copytree(built, dst)
    return dst


# ------------------------------------------------------------------------------ the manifest is input


@pytest.mark.parametrize(
    "name", ["../victim.npy", "/tmp/matrix-x.npy", "sub/matrix-a.npy", "matrix-..npy", "matrix-a.npy\x00", 7, None]
)
def test_matrix_name_must_be_a_bare_file_in_the_store(built: Path, tmp_path: Path, name) -> None:
    store = copy_store(built, tmp_path / "s")
    assert len(wsa.open_store(store).matrix) == 4  # positive control
    tamper(store, lambda m: m.update(matrix=name))
    with pytest.raises(StoreError) as err:
        wsa.open_store(store)
    one_line(err.value, str(store), "'matrix'")


def test_tampered_manifest_never_deletes_a_file_outside(tmp_path: Path) -> None:
    loras = collection(tmp_path / "loras")
    store = tmp_path / "store"
    wsa.ingest(loras, store, progress=False)
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"precious")
    tamper(store, lambda m: m.update(matrix="../victim.npy"))
    (loras / "id_0" / "unet" / "adapter_model.safetensors").touch()  # a re-ingest would replace the matrix
    with pytest.raises(StoreError, match="'matrix'"):
        wsa.ingest(loras, store, progress=False)
    assert victim.read_bytes() == b"precious"
    # A link named like a matrix, pointing outside: refused on open; the cleanup helper removes only the link.
    outside = tmp_path / "matrix-outside.npy"
    np.save(outside, np.zeros((4, 3), np.float32))
    (store / "matrix-link.npy").symlink_to(outside)
    builder._remove_old_matrix(store / "matrix-link.npy", store)
    builder._remove_old_matrix(outside, store)  # not inside the store: kept
    assert outside.is_file() and not (store / "matrix-link.npy").exists()


def test_matrix_symlink_outside_is_refused(built: Path, tmp_path: Path) -> None:
    store = copy_store(built, tmp_path / "s")
    real = next(store.glob("matrix-*.npy"))
    outside = tmp_path / "elsewhere.npy"
    real.rename(outside)
    real.symlink_to(outside)
    with pytest.raises(StoreError) as err:
        wsa.open_store(store).matrix  # noqa: B018
    one_line(err.value, "outside the store")


def test_fifo_matrix_fails_fast(built: Path, tmp_path: Path) -> None:
    store = copy_store(built, tmp_path / "s")
    real = next(store.glob("matrix-*.npy"))
    real.unlink()
    os.mkfifo(real)
    outcome: dict[str, object] = {}

    def attempt() -> None:
        opened = wsa.open_store(store)
        for access in (lambda: opened.matrix, lambda: opened.read_rows([0]), lambda: opened.row(0)):
            try:
                access()
                outcome.setdefault("ok", 0)
            except StoreError as exc:
                outcome.setdefault("errors", []).append(str(exc))  # type: ignore[union-attr]

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "opening a FIFO matrix hung"
    errors = outcome["errors"]
    assert len(errors) == 3 and "ok" not in outcome  # type: ignore[arg-type]
    for text in errors:  # type: ignore[union-attr]
        assert "not a regular file" in text and "\n" not in text


@pytest.mark.parametrize(("shift", "word"), [(-1, "overlaps"), (1, "gap")])
def test_layout_offsets_must_be_contiguous(built: Path, tmp_path: Path, shift: int, word: str) -> None:
    store = copy_store(built, tmp_path / "s")

    def edit(m):
        m["layout"]["modules"][1]["parts"][0]["offset"] += shift

    tamper(store, edit)
    with pytest.raises(StoreError) as err:
        wsa.open_store(store)
    one_line(err.value, "'layout.modules[1].parts[0].offset'", word)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m["layout"]["modules"][0].update(rank=3), "do not have rank 3"),  # down r × in, up out × r
        (lambda m: m["layout"]["modules"][0].update(scale=float("nan")), "scale"),
        (lambda m: m["layout"]["modules"][0].update(kind="evil"), "kind"),
        (lambda m: m["layout"]["modules"][1].update(name=m["layout"]["modules"][0]["name"]), "twice"),
        (lambda m: m["rows"][1].update(id=m["rows"][0]["id"]), "twice"),
        (lambda m: m.update(dtype="float64"), "'dtype'"),
        (lambda m: m.update(n_rows=True), "'n_rows'"),
        (lambda m: m.update(repr="evil"), "'repr'"),
        (lambda m: m.update(n_features=m["n_features"] + 1), "'n_features'"),
        (lambda m: m.pop("layout"), "'layout'"),
        (lambda m: m["rows"][0].pop("id"), "rows[0].id"),
        (lambda m: m["rows"][2].update(delta_norm="big"), "rows[2].delta_norm"),
    ],
)
def test_bad_manifest_values_name_the_key(built: Path, tmp_path: Path, edit, key: str) -> None:
    store = copy_store(built, tmp_path / "s")
    tamper(store, edit)
    with pytest.raises(StoreError) as err:
        wsa.open_store(store)
    one_line(err.value, str(store), key)


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=6,
    )


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_raise_only_store_errors(built: Path, data) -> None:
    """Drop or replace random manifest keys: the store opens and reads, or fails with one StoreError line."""
    original = json.loads((built / "wsa_store.json").read_text())
    manifest = json.loads(json.dumps(original))
    paths = [p for p in _paths(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, (dict, list)):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_json_values())
        except (KeyError, IndexError, TypeError):
            continue
    target = built.parent / "mutated"
    target.mkdir(exist_ok=True)
    for f in built.glob("matrix-*.npy"):
        if not (target / f.name).exists():
            os.link(f, target / f.name)
    (target / "wsa_store.json").write_text(json.dumps(manifest))
    try:
        store = wsa.open_store(target)
        store.read_rows(range(len(store)))
        np.asarray(store.matrix)
        if len(store):
            store.to_adapter(0)
        from wsa.inspect import store_summary

        store_summary(store)
    except StoreError as exc:
        one_line(exc, str(target))


# ---------------------------------------------------------------------------------------------- export


def test_export_names_stay_inside_out(built: Path, tmp_path: Path) -> None:
    store = copy_store(built, tmp_path / "deep" / "s")
    hostile = ["../../evil", "..", ".", "a/b", "a__b", "x\x1b[2Jy"]

    def edit(m):
        for row, rid in zip(m["rows"], hostile, strict=False):
            row["id"] = rid
        m["rows"][-1]["id"] = "A__B"  # differs from a__b only by case

    tamper(store, edit)
    out = tmp_path / "deep" / "out"
    for fmt in ("kohya", "peft"):
        code, stdout, stderr = run_cli("export", str(store), "--ids", "all", "--format", fmt, "--out", str(out / fmt))
        assert code == 0, stderr
        written = [Path(line) for line in stdout.splitlines()]
        assert len(written) == 4 and len({p.name.lower() for p in written}) == 4
        for p in written:
            assert p.resolve().parent == (out / fmt).resolve()
            assert not p.name.startswith(".")
            adapter = wsa.load_adapter(p)
            assert len(adapter.modules) == len(MODULES)  # positive control: what was written loads back
    assert all(out in p.parents for p in tmp_path.rglob("*evil*"))
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "evil").exists()


def test_export_refuses_non_finite_and_fp16_overflow(built: Path, tmp_path: Path) -> None:
    store = copy_store(built, tmp_path / "s")
    matrix = next(store.glob("matrix-*.npy"))
    mm = np.load(matrix, mmap_mode="r+")
    mm[1, 3] = 1e6  # beyond float16
    mm[2, 0] = np.nan
    mm.flush()
    del mm
    out = tmp_path / "out"
    ids = wsa.open_store(store).ids
    code, _, stderr = run_cli("export", str(store), "--ids", ids[0], "--dtype", "float16", "--out", str(out))
    assert code == 0, stderr  # positive control
    code, _, stderr = run_cli("export", str(store), "--ids", ids[1], "--dtype", "float16", "--out", str(out))
    assert code == 1 and "float16" in stderr and MODULES[0][0] in stderr
    code, _, stderr = run_cli("export", str(store), "--ids", ids[1], "--out", str(out))
    assert code == 0, stderr  # float32 holds it
    code, _, stderr = run_cli("export", str(store), "--ids", ids[2], "--out", str(out))
    assert code == 1 and "not finite" in stderr and len(stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- finite or refused


def test_float16_overflow_is_refused_then_skipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    c = tmp_path / "c"
    for i in range(3):
        peft(c / f"ok_{i}", torch.randn(2, 8), torch.randn(8, 2))
    peft(c / "huge", torch.randn(2, 8) * 1e5, torch.randn(8, 2))
    full = wsa.ingest(c, tmp_path / "f32", progress=False)  # positive control: float32 holds 1e5
    assert len(full) == 4
    with pytest.raises(CollectionError) as err:
        wsa.ingest(c, tmp_path / "f16", dtype="float16", progress=False)
    one_line(err.value, "huge", KEY.removeprefix("base_model.model."), "overflows float16")
    store = wsa.ingest(c, tmp_path / "f16", dtype="float16", skip_bad=True, progress=False)
    assert store.ids == ["ok_0", "ok_1", "ok_2"]
    assert "overflows float16" in store.manifest["problems"][0]["reason"]
    assert np.isfinite(np.asarray(store.matrix, dtype=np.float32)).all()


def test_delta_overflow_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(1)
    c = tmp_path / "c"
    peft(c / "ok", torch.randn(2, 8), torch.randn(8, 2))
    peft(c / "boom", torch.full((2, 8), 1e20), torch.full((8, 2), 1e20))
    with pytest.raises(WsaError) as err:
        wsa.ingest(c, tmp_path / "d", repr="delta", progress=False)
    one_line(err.value, "boom")
    store = wsa.ingest(c, tmp_path / "d", repr="delta", skip_bad=True, progress=False)
    assert store.ids == ["ok"] and np.isfinite(np.asarray(store.matrix)).all()


def _dataset(tmp_path: Path, config: str | None) -> tuple[Path, Path]:
    folder = tmp_path / "ds"
    folder.mkdir()
    a, b = torch.randn(4, 1, 8), torch.randn(4, 8, 1)
    rows = torch.cat([a.reshape(4, -1), b.reshape(4, -1)], 1)
    np.save(folder / "m.npy", rows.numpy())
    (folder / "layout.json").write_text(
        json.dumps([[f"{KEY}.lora_A.weight", [1, 8]], [f"{KEY}.lora_B.weight", [8, 1]]])
    )
    if config is not None:
        (folder / "adapter_config.json").write_text(config)
    return folder / "m.npy", folder / "layout.json"


@pytest.mark.parametrize(
    "config",
    ['{"lora_alpha": NaN, "r": 1}', '{"lora_alpha": Infinity}', '{"lora_alpha": "abc"}', '{"r": 1.5}', "[1]", "{"],
)
def test_dataset_config_must_be_finite(tmp_path: Path, config: str) -> None:
    matrix, layout = _dataset(tmp_path, config)
    with pytest.raises(FormatError) as err:
        dataset_sources(matrix, layout)
    one_line(err.value, "adapter_config.json")


def test_dataset_alpha_zero_is_scale_zero_as_peft(tmp_path: Path) -> None:
    matrix, layout = _dataset(tmp_path, '{"lora_alpha": 0, "r": 1}')
    store = wsa.ingest(matrix, tmp_path / "s", sources=dataset_sources(matrix, layout), progress=False)
    assert store.layout.modules[0].scale == 0.0
    assert float(store.to_adapter(0).delta(store.layout.names[0]).abs().max()) == 0.0
    (tmp_path / "ds" / "adapter_config.json").write_text('{"lora_alpha": 2, "r": 1}')  # positive control
    store = wsa.ingest(matrix, tmp_path / "s2", sources=dataset_sources(matrix, layout), progress=False)
    assert store.layout.modules[0].scale == 2.0


# ---------------------------------------------------------------------------------------------- faults


def test_second_writer_fails_at_once(tmp_path: Path) -> None:
    loras = collection(tmp_path / "loras", n=2)
    out = tmp_path / "s"
    out.mkdir()
    with (out / ".wsa.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result: dict[str, BaseException] = {}

        def attempt() -> None:
            try:
                wsa.ingest(loras, out, progress=False)
            except BaseException as exc:  # the test inspects it
                result["exc"] = exc

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the second writer waited for the lock"
        assert isinstance(result.get("exc"), StoreError)
        one_line(result["exc"], str(out), "another `wsa ingest`")
    assert len(wsa.ingest(loras, out, progress=False)) == 2  # lock released: works


Usage = collections.namedtuple("Usage", "total used free")


def test_full_disk_is_refused_with_figures_and_no_junk(tmp_path: Path, monkeypatch) -> None:
    loras = collection(tmp_path / "loras", n=3)
    out = tmp_path / "s"
    monkeypatch.setattr(builder.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 100, 100))
    with pytest.raises(StoreError) as err:
        wsa.ingest(loras, out, progress=False)
    text = one_line(err.value, str(out), "needs", "100 bytes free")
    assert "matrix" in text
    assert not (out / ".partial").exists() and not list(out.glob("matrix-*"))
    monkeypatch.undo()
    assert len(wsa.ingest(loras, out, progress=False)) == 3  # positive control


def test_full_disk_at_compaction_keeps_what_resume_needs(tmp_path: Path, monkeypatch) -> None:
    loras = collection(tmp_path / "loras", n=3)
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    out = tmp_path / "s"
    real = shutil.disk_usage
    calls: list[int] = []

    def usage(p):  # enough for the matrix, then nothing for the compacted copy
        calls.append(1)
        return real(p) if len(calls) == 1 else Usage(10**6, 10**6 - 10, 10)

    monkeypatch.setattr(builder.shutil, "disk_usage", usage)
    with pytest.raises(StoreError) as err:
        wsa.ingest(loras, out, skip_bad=True, progress=False)
    one_line(err.value, "compacted matrix", "10 bytes free")
    assert (out / ".partial" / "plan.json").is_file() and not list(out.glob("matrix-*.npy"))
    monkeypatch.undo()
    store = wsa.ingest(loras, out, skip_bad=True, progress=False)  # resumes, nothing re-read needed
    assert len(store) == 3 and not (out / ".partial").exists()


def test_enospc_while_writing_is_one_line_and_resumable(tmp_path: Path, monkeypatch) -> None:
    import errno

    loras = collection(tmp_path / "loras", n=3)
    out = tmp_path / "s"

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builder.os, "pwrite", full)
    with pytest.raises(StoreError) as err:
        wsa.ingest(loras, out, workers=1, progress=False)
    one_line(err.value, "No space left on device", "resume")
    assert (out / ".partial" / "plan.json").is_file()
    monkeypatch.undo()
    assert len(wsa.ingest(loras, out, workers=1, progress=False)) == 3


def test_out_under_a_file_is_one_line(tmp_path: Path) -> None:
    loras = collection(tmp_path / "loras", n=2)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError) as err:
        wsa.ingest(loras, tmp_path / "afile" / "s", progress=False)
    one_line(err.value, "cannot create the store folder")
    code, _, stderr = run_cli("ingest", str(loras), "--out", str(tmp_path / "afile" / "s"), "-q")
    assert code == 1 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_one_line(tmp_path: Path) -> None:
    loras = collection(tmp_path / "loras", n=2)
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "existing").mkdir()
    parent.chmod(0o500)
    (parent / "existing").chmod(0o500)
    try:
        for out in (parent / "new", parent / "existing"):
            with pytest.raises(StoreError) as err:
                wsa.ingest(loras, out, progress=False)
            one_line(err.value, str(out))
            code, _, stderr = run_cli("ingest", str(loras), "--out", str(out), "-q")
            assert code == 1 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    finally:
        (parent / "existing").chmod(0o700)
        parent.chmod(0o700)
    assert len(wsa.ingest(loras, parent / "new", progress=False)) == 2


# ------------------------------------------------------------------------------------------- smaller


def test_skip_bad_finds_good_files_after_16_bad(tmp_path: Path) -> None:
    c = tmp_path / "c"
    c.mkdir()
    for i in range(17):
        (c / f"a_bad_{i:02d}.safetensors").write_bytes(b"\x00" * 40)
    torch.manual_seed(2)
    for i in range(3):
        peft(c / f"z_good_{i}", torch.randn(2, 8), torch.randn(8, 2))
    with pytest.raises(CollectionError) as err:  # without --skip-bad: the bad files listed
        wsa.ingest(c, tmp_path / "s", progress=False)
    one_line(err.value, "17 of 20")
    store = wsa.ingest(c, tmp_path / "s", skip_bad=True, progress=False)
    assert store.ids == ["z_good_0", "z_good_1", "z_good_2"]
    assert len(store.manifest["problems"]) == 17


def test_info_on_interrupted_store_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    loras = collection(tmp_path / "loras", n=4)
    out = tmp_path / "s"
    real_encode = builder.encode
    calls: list[int] = []

    def failing(adapter, layout, out=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(adapter, layout, out)

    monkeypatch.setattr(builder, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(builder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        wsa.ingest(loras, out, repr="canonical", workers=1, progress=False)
    monkeypatch.undo()
    code, stdout, stderr = run_cli("info", str(out))
    assert code == 0, stderr
    assert "no adapter files found" not in stdout + stderr
    assert "resume" in stdout and f"wsa ingest {loras} --out {out} --repr canonical" in stdout
    assert "2 of 4 rows" in stdout
    code, stdout, _ = run_cli("info", "--json", str(out))
    assert json.loads(stdout)["kind"] == "interrupted-store"
    wsa.ingest(loras, out, repr="canonical", workers=1, progress=False)  # the command it gave resumes
    code, stdout, _ = run_cli("info", str(out))
    assert code == 0 and "4 × " in stdout  # positive control: a finished store


# --------------------------------------------------------------------------------------- saved spaces


@pytest.fixture(scope="module")
def space_dir(built: Path, tmp_path_factory) -> Path:
    from wsa.space import fit_space

    folder = tmp_path_factory.mktemp("space")
    fit_space(wsa.open_store(built), 2, device="cpu").save(folder)
    return folder


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m.update(n_components="2"), "'n_components'"),
        (lambda m: m.update(ids=[1, 2, 3, 4]), "'ids'"),
        (lambda m: m.update(total_variance=float("inf")), "'total_variance'"),
        (lambda m: m.pop("config"), "'config'"),
        (lambda m: m.update(n_samples=True), "'n_samples'"),
    ],
)
def test_space_json_fields_are_checked(space_dir: Path, tmp_path: Path, edit, key: str) -> None:
    from wsa.space import Space

    folder = copy_store(space_dir, tmp_path / "sp")
    Space.load(folder)  # positive control
    meta = json.loads((folder / "space.json").read_text())
    edit(meta)
    (folder / "space.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError) as err:
        Space.load(folder)
    one_line(err.value, str(folder), key)


def test_space_tensors_must_be_finite(space_dir: Path, tmp_path: Path) -> None:
    import hashlib

    from safetensors.numpy import load, save

    from wsa.space import Space

    folder = copy_store(space_dir, tmp_path / "sp")
    tensors = dict(load((folder / "space.safetensors").read_bytes()))
    tensors["components"] = tensors["components"].copy()
    tensors["components"][0, 0] = np.nan
    blob = save(tensors)
    (folder / "space.safetensors").write_bytes(blob)
    meta = json.loads((folder / "space.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "space.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError) as err:
        Space.load(folder)
    one_line(err.value, "components", "NaN")
    assert math.isfinite(float(Space.load(space_dir).components[0, 0]))
