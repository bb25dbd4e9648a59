"""Store and ingest: exact rows, round trips, gauge invariance, incremental updates, resume, mixed sets."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import wsa
from wsa.errors import CollectionError, ConfigError, StoreError
from wsa.formats._tensorfile import reading_headers_only
from wsa.store import builder as ingest_mod
from wsa.store.dataset import dataset_sources
from wsa.store.representations import canonical_factors
from wsa.synthetic import synth_collection


@pytest.fixture(autouse=True)
def _general_reader_only(monkeypatch):
    """These tests count and break ``Source.load``; the fast path (tests/test_fastpath.py) bypasses it."""
    from wsa.store import fastpath

    monkeypatch.setattr(fastpath, "_DISABLED", True)


SMALL_MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 12, 8),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", 16, 16),
]


def make_collection(root: Path, n: int = 6, rank: int = 2, seed: int = 0) -> Path:
    synth_collection(root, n, seed=seed, rank=rank, modules=SMALL_MODULES, n_factors=4, progress=False)
    return root


def peft_keys_flat(folder: Path) -> np.ndarray:
    """w2w's flattening: sorted PEFT keys, each tensor flattened, concatenated."""
    sd = load_file(folder / "adapter_model.safetensors")
    return torch.cat([sd[k].flatten() for k in sorted(sd)]).numpy()


def test_raw_row_is_w2w_flattening(tmp_path: Path) -> None:
    loras = make_collection(tmp_path / "loras")
    store = wsa.ingest(loras, tmp_path / "space", progress=False)
    assert store.ids == [f"id_{i}" for i in range(6)]
    assert store.matrix.shape == (6, store.layout.n_features)
    for i, rid in enumerate(store.ids):
        np.testing.assert_array_equal(store.row(i), peft_keys_flat(loras / rid / "unet"))


@pytest.mark.parametrize("representation", ["raw", "canonical", "delta"])
def test_rows_round_trip_to_the_same_delta(tmp_path: Path, representation: str) -> None:
    loras = make_collection(tmp_path / "loras")
    store = wsa.ingest(loras, tmp_path / representation, repr=representation, progress=False)
    for rid in store.ids:
        original = wsa.load_adapter(loras / rid / "unet")
        restored = store.to_adapter(rid)
        assert list(restored.modules) == list(original.modules)
        for name in original.modules:
            torch.testing.assert_close(restored.delta(name), original.delta(name), atol=1e-6, rtol=1e-5)
    if representation == "delta":
        assert store.n_features == sum(math.prod(m.shape) for m in original.modules.values())
    else:
        assert store.n_features == original.n_params


def _write_peft(folder: Path, tensors: dict[str, torch.Tensor], alpha: float, r: int) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["to_q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_canonical_is_gauge_invariant_and_raw_is_not(tmp_path: Path) -> None:
    torch.manual_seed(0)
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = torch.randn(3, 10), torch.randn(7, 3)
    m = torch.randn(3, 3) + 3 * torch.eye(3)  # an invertible change of gauge: (B·M, M⁻¹·A)
    _write_peft(tmp_path / "c/one", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, 6.0, 3)
    _write_peft(
        tmp_path / "c/two",
        {f"{key}.lora_A.weight": torch.linalg.solve(m, a), f"{key}.lora_B.weight": b @ m},
        6.0,
        3,
    )
    canonical = wsa.ingest(tmp_path / "c", tmp_path / "can", repr="canonical", progress=False)
    np.testing.assert_allclose(canonical.row("one"), canonical.row("two"), atol=1e-5)
    raw = wsa.ingest(tmp_path / "c", tmp_path / "raw", progress=False)
    assert np.abs(raw.row("one") - raw.row("two")).max() > 1e-2  # negative control: raw sees the gauge


def test_canonical_factors_properties() -> None:
    torch.manual_seed(1)
    up, down = torch.randn(9, 2), torch.randn(2, 5)
    bc, ac = canonical_factors(up, down, 0.5, rank=3)  # padded to rank 3
    torch.testing.assert_close((bc @ ac).float(), 0.5 * up @ down, atol=1e-6, rtol=1e-6)
    assert torch.all(ac[2] == 0) and torch.all(bc[:, 2] == 0)
    norms = ac.norm(dim=1)[:2] * bc.norm(dim=0)[:2]
    assert norms[0] >= norms[1]  # singular values descending
    pivots = ac[:2].abs().argmax(dim=1)
    assert torch.all(ac[torch.arange(2), pivots] > 0)  # the sign rule
    bc2, ac2 = canonical_factors(-up, -down, 0.5, rank=3)  # sign flip of both factors: same ΔW
    torch.testing.assert_close(ac2, ac)
    torch.testing.assert_close(bc2, bc)


def test_raw_folds_alpha_relative_to_reference(tmp_path: Path) -> None:
    torch.manual_seed(2)
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    a, b = torch.randn(1, 6), torch.randn(6, 1)
    _write_peft(tmp_path / "c/a", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, 4.0, 1)
    _write_peft(tmp_path / "c/b", {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b / 2}, 8.0, 1)
    store = wsa.ingest(tmp_path / "c", tmp_path / "s", progress=False)
    np.testing.assert_allclose(store.row("a"), store.row("b"), rtol=1e-6)  # same ΔW, same row
    assert store.layout.modules[0].scale == 4.0


def test_float16_store(tmp_path: Path) -> None:
    loras = make_collection(tmp_path / "loras")
    store = wsa.ingest(loras, tmp_path / "s16", dtype="float16", progress=False)
    assert store.matrix.dtype == np.float16
    np.testing.assert_allclose(store.row(0), peft_keys_flat(loras / "id_0" / "unet"), rtol=1e-3, atol=1e-6)


def test_incremental_update_reuses_adds_and_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loras = make_collection(tmp_path / "loras", n=5)
    wsa.ingest(loras, tmp_path / "s", progress=False)
    make_collection(tmp_path / "more", n=7, seed=3)
    os.rename(tmp_path / "more" / "id_6", loras / "id_6")  # a new adapter
    import shutil

    shutil.rmtree(loras / "id_1")  # a removed adapter
    loads: list[str] = []
    real_load = ingest_mod.Source.load

    def counting_load(self):  # type: ignore[no-untyped-def]
        if not reading_headers_only():  # the family/rank scan reads headers of new files only; not counted
            loads.append(self.id)
        return real_load(self)

    monkeypatch.setattr(ingest_mod.Source, "load", counting_load)
    store = wsa.ingest(loras, tmp_path / "s", progress=False)
    assert store.ids == ["id_0", "id_2", "id_3", "id_4", "id_6"]
    assert loads == ["id_6"]  # only the new file was read
    np.testing.assert_array_equal(store.row("id_6"), peft_keys_flat(loras / "id_6" / "unet"))
    assert len(list((tmp_path / "s").glob("matrix-*.npy"))) == 1  # the old matrix is gone


def test_rehash_detects_content_change_with_same_size_and_mtime(tmp_path: Path) -> None:
    loras = make_collection(tmp_path / "loras", n=3)
    wsa.ingest(loras, tmp_path / "s", progress=False)
    target = loras / "id_1" / "unet" / "adapter_model.safetensors"
    st = target.stat()
    sd = load_file(target)
    sd = {k: v * 2 for k, v in sd.items()}
    save_file(sd, str(target), metadata={"format": "pt"})
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    stale = wsa.ingest(loras, tmp_path / "s", progress=False)
    assert not np.array_equal(stale.row("id_1"), peft_keys_flat(target.parent))  # size+mtime trusted
    fresh = wsa.ingest(loras, tmp_path / "s", rehash=True, progress=False)
    np.testing.assert_array_equal(fresh.row("id_1"), peft_keys_flat(target.parent))


def test_interrupted_ingest_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loras = make_collection(tmp_path / "loras", n=8)
    monkeypatch.setattr(ingest_mod, "CHECKPOINT_SECONDS", 0.0)
    real_encode = ingest_mod.encode
    calls: list[int] = []

    def failing_encode(adapter, layout, out=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # a crash half-way
        return real_encode(adapter, layout, out)

    monkeypatch.setattr(ingest_mod, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        wsa.ingest(loras, tmp_path / "s", workers=1, progress=False)
    assert (tmp_path / "s" / ".partial" / "plan.json").is_file()
    with pytest.raises(StoreError, match="resume"):
        wsa.open_store(tmp_path / "s")
    calls.clear()
    monkeypatch.setattr(ingest_mod, "encode", lambda a, lay, out=None: (calls.append(1), real_encode(a, lay, out))[1])
    store = wsa.ingest(loras, tmp_path / "s", workers=1, progress=False)
    assert len(calls) == 4  # rows 0-3 were kept from the first run
    assert not (tmp_path / "s" / ".partial").exists()
    for rid in store.ids:
        np.testing.assert_array_equal(store.row(rid), peft_keys_flat(loras / rid / "unet"))


def test_mixed_ranks_fail_with_list_then_skip_bad(tmp_path: Path) -> None:
    make_collection(tmp_path / "loras", n=5, rank=2)
    make_collection(tmp_path / "other", n=2, rank=3, seed=9)
    os.rename(tmp_path / "other" / "id_0", tmp_path / "loras" / "odd")
    with pytest.raises(CollectionError) as err:
        wsa.ingest(tmp_path / "loras", tmp_path / "s", progress=False)
    assert "1 of 6 adapters cannot join" in str(err.value)
    assert "odd" in err.value.problems[0][0] and "rank" in err.value.problems[0][1]
    store = wsa.ingest(tmp_path / "loras", tmp_path / "s", skip_bad=True, progress=False)
    assert "odd" not in store.ids and len(store) == 5
    assert store.manifest["problems"][0]["source"].endswith("odd")
    np.testing.assert_array_equal(store.row("id_4"), peft_keys_flat(tmp_path / "loras" / "id_4" / "unet"))


def test_modules_intersect_and_union(tmp_path: Path) -> None:
    synth_collection(tmp_path / "c", 3, modules=SMALL_MODULES, rank=1, progress=False)
    synth_collection(tmp_path / "d", 2, modules=SMALL_MODULES[:2], rank=1, seed=5, progress=False)
    os.rename(tmp_path / "d" / "id_0", tmp_path / "c" / "short")
    with pytest.raises(CollectionError):
        wsa.ingest(tmp_path / "c", tmp_path / "exact", progress=False)
    inter = wsa.ingest(tmp_path / "c", tmp_path / "inter", modules="intersect", progress=False)
    assert inter.layout.names == [m for m, _, _ in SMALL_MODULES[:2]]
    union = wsa.ingest(tmp_path / "c", tmp_path / "union", modules="union", repr="delta", progress=False)
    short = union.to_adapter("short")
    assert float(short.delta(SMALL_MODULES[3][0]).abs().max()) == 0.0  # missing module is ΔW = 0
    with pytest.raises(ConfigError, match="union needs --repr delta"):
        wsa.ingest(tmp_path / "c", tmp_path / "bad", modules="union", progress=False)


def test_empty_folder_and_bad_store(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectionError, match="no adapter files found"):
        wsa.ingest(tmp_path / "empty", tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="not a wsa store"):
        wsa.open_store(tmp_path / "empty")
    loras = make_collection(tmp_path / "loras", n=2)
    store = wsa.ingest(loras, tmp_path / "s", progress=False)
    manifest = json.loads((store.path / "wsa_store.json").read_text())
    manifest["wsa_format_version"] = 99
    (store.path / "wsa_store.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 99"):
        wsa.open_store(store.path)


def test_w2w_dataset_matches_folders(tmp_path: Path) -> None:
    loras = make_collection(tmp_path / "loras", n=4, rank=1)
    rows, dims = [], {}
    for i in range(4):
        sd = load_file(loras / f"id_{i}" / "unet" / "adapter_model.safetensors")
        rows.append(torch.cat([sd[k].flatten() for k in sorted(sd)]))
        dims = {k: [[sd[k].numel()], sd[k].shape] for k in sorted(sd)}
    torch.save(torch.stack(rows), tmp_path / "all_weights.pt")
    torch.save(dims, tmp_path / "weight_dimensions.pt")
    sources = dataset_sources(tmp_path / "all_weights.pt", tmp_path / "weight_dimensions.pt", alpha=27.0)
    from_dataset = wsa.ingest(tmp_path / "all_weights.pt", tmp_path / "ds", sources=sources, progress=False)
    from_files = wsa.ingest(loras, tmp_path / "files", progress=False)
    np.testing.assert_array_equal(np.asarray(from_dataset.matrix), np.asarray(from_files.matrix))
    assert from_dataset.ids == ["row_0", "row_1", "row_2", "row_3"]
    np.save(tmp_path / "m.npy", torch.stack(rows)[:, :-1].numpy())
    with pytest.raises(wsa.FormatError, match="covers"):
        dataset_sources(tmp_path / "m.npy", tmp_path / "weight_dimensions.pt")


def test_unchanged_collection_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loras = make_collection(tmp_path / "loras", n=4)
    first = wsa.ingest(loras, tmp_path / "s", progress=False)

    def no_load(self):  # type: ignore[no-untyped-def]
        raise AssertionError("an unchanged collection must not be read again")

    monkeypatch.setattr(ingest_mod.Source, "load", no_load)
    again = wsa.ingest(loras, tmp_path / "s", progress=False)
    assert again.matrix_path == first.matrix_path
    (loras / "id_2" / "unet" / "adapter_model.safetensors").touch()  # mtime changes -> that row is re-read
    with pytest.raises(AssertionError, match="must not be read"):
        wsa.ingest(loras, tmp_path / "s", progress=False)


def test_read_rows_matches_the_memory_map(tmp_path: Path) -> None:
    store = wsa.ingest(make_collection(tmp_path / "loras", n=6), tmp_path / "s", dtype="float16", progress=False)
    order = [4, 5, 0, 2, 3]  # runs and jumps
    np.testing.assert_array_equal(store.read_rows(order), np.asarray(store.matrix[order], dtype=np.float32))
    blocks = np.concatenate([b for _, b in store.iter_blocks(block_rows=4)])
    np.testing.assert_array_equal(blocks, np.asarray(store.matrix, dtype=np.float32))
    with pytest.raises(StoreError, match="out of range"):
        store.read_rows([6])


def test_outputs_get_normal_permissions(tmp_path: Path) -> None:
    from wsa.atomic import write_json

    target = write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
