"""The ingest fast path gives the same store as the general reader, and steps aside when it must.

Why: the fast path copies bytes by a map learned from one file; any file it cannot vouch for
(another header, another config, non-finite values, other formats) must go through the general
reader, so the store never depends on which path read a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import wsa
from wsa.errors import CollectionError
from wsa.store import fastpath
from wsa.synthetic import synth_collection


def ingest_both(paths, tmp_path: Path, monkeypatch, **kw):
    monkeypatch.setattr(fastpath, "_DISABLED", True)
    slow = wsa.ingest(paths, tmp_path / "slow", progress=False, **kw)
    monkeypatch.setattr(fastpath, "_DISABLED", False)
    fastpath._templates.clear()
    fast = wsa.ingest(paths, tmp_path / "fast", progress=False, **kw)
    return slow, fast


def assert_same(slow, fast) -> None:
    assert slow.ids == fast.ids
    np.testing.assert_array_equal(np.asarray(slow.matrix), np.asarray(fast.matrix))
    assert slow.rows == [{**r, "source": r["source"]} for r in fast.rows]


def test_uniform_collection_same_store(tmp_path, monkeypatch):
    synth_collection(tmp_path / "loras", 12, progress=False)
    slow, fast = ingest_both([tmp_path / "loras"], tmp_path, monkeypatch)
    assert_same(slow, fast)
    assert len(fastpath._templates) == 1 and next(iter(fastpath._templates.values())) is not None


def test_other_headers_configs_and_fp16_fall_back_or_learn(tmp_path, monkeypatch):
    root = tmp_path / "loras"
    synth_collection(root, 8, progress=False)
    # one adapter in fp16 (another header), one with another alpha (another config: scale folding)
    w = root / "id_3" / "unet" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(w)).items()}, str(w))
    cfg = root / "id_5" / "unet" / "adapter_config.json"
    config = json.loads(cfg.read_text())
    config["lora_alpha"] = 13.5
    cfg.write_text(json.dumps(config))
    slow, fast = ingest_both([root], tmp_path, monkeypatch)
    assert_same(slow, fast)


def test_non_finite_values_get_the_general_error(tmp_path, monkeypatch):
    root = tmp_path / "loras"
    synth_collection(root, 5, progress=False)
    w = root / "id_4" / "unet" / "adapter_model.safetensors"
    tensors = load_file(str(w))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = torch.nan
    save_file(tensors, str(w))
    fastpath._templates.clear()
    with pytest.raises(CollectionError, match="id_4"):
        wsa.ingest([root], tmp_path / "s", progress=False)
    store = wsa.ingest([root], tmp_path / "s2", progress=False, skip_bad=True)
    assert (len(store) == 4 and "NaN" in store.manifest["problems"][0]["reason"]) or "nan" in str(
        store.manifest["problems"]
    ).lower()


def test_representations_other_than_raw_use_the_general_reader(tmp_path, monkeypatch):
    synth_collection(tmp_path / "loras", 6, progress=False)
    slow, fast = ingest_both([tmp_path / "loras"], tmp_path, monkeypatch, repr="canonical")
    assert_same(slow, fast)
    assert fastpath._templates == {}


def test_higher_rank_collection_same_store(tmp_path, monkeypatch):
    synth_collection(tmp_path / "loras", 6, rank=3, progress=False)
    slow, fast = ingest_both([tmp_path / "loras"], tmp_path, monkeypatch)
    assert_same(slow, fast)
    assert next(iter(fastpath._templates.values())) is not None


def test_truncated_file_with_a_known_header_gets_the_general_error(tmp_path, monkeypatch):
    root = tmp_path / "loras"
    synth_collection(root, 5, progress=False)
    w = root / "id_4" / "unet" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # same header bytes, data cut short
    fastpath._templates.clear()
    with pytest.raises(CollectionError, match="id_4"):
        wsa.ingest([root], tmp_path / "s", progress=False)
