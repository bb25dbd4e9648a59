"""A folder as people hold it: several families, trainers and ranks, a bad file, a re-upload.

Checks what a user sees: ``wsa info`` per file (family, format, ranks, metadata) and duplicates;
``wsa ingest`` refusing a mix of families with the groups listed, taking one with ``--family``,
padding mixed ranks in ``canonical`` exactly and refusing them in ``raw`` with the reason;
``wsa analyze`` fitting one space per family with every left-out file listed, and metadata labels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import wsa
from wsa.cli import main
from wsa.store import ingest, open_store

D = 16
FLUX_MODULES = {  # BFL name: (out, in)
    "double_blocks.0.img_attn.qkv": (3 * D, D),
    "double_blocks.0.img_attn.proj": (D, D),
    "single_blocks.0.linear1": (7 * D, D),
}
SD_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 24),
}


def _factors(out: int, inp: int, rank: int, g: torch.Generator):
    return torch.randn(rank, inp, generator=g) / inp**0.5, torch.randn(out, rank, generator=g)


def _flux_kohya(path, rank, seed, meta=None):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (o, i) in FLUX_MODULES.items():
        down, up = _factors(o, i, rank, g)
        key = "lora_unet_" + name.replace(".", "_")
        t |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(rank / 2)}
    save_file(t, str(path), metadata=meta)


def _flux_comfy(path, rank, seed, meta=None):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (o, i) in FLUX_MODULES.items():
        down, up = _factors(o, i, rank, g)
        t |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
    save_file(t, str(path), metadata=meta)


def _sd_kohya(path, rank, seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (o, i) in SD_MODULES.items():
        down, up = _factors(o, i, rank, g)
        key = "lora_unet_" + name.replace(".", "_")
        t |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    save_file(t, str(path), metadata={"ss_base_model_version": "sd_v1"})


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "loras"
    (root / "flux").mkdir(parents=True)
    (root / "sd").mkdir()
    _flux_kohya(
        root / "flux" / "a_kohya_r4.safetensors", 4, 1, {"ss_base_model_version": "flux1", "ss_network_dim": "4"}
    )
    _flux_kohya(
        root / "flux" / "b_kohya_r8.safetensors", 8, 2, {"ss_base_model_version": "flux1", "ss_network_dim": "8"}
    )
    _flux_comfy(root / "flux" / "c_comfy_r16.safetensors", 16, 3, {"ss_base_model_version": "flux1_dev"})
    _flux_comfy(root / "flux" / "d_comfy_r2.safetensors", 2, 4)
    for k in range(3):
        _sd_kohya(root / "sd" / f"s{k}.safetensors", 4, 10 + k)
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return root


def test_info_lists_family_format_ranks_metadata_and_duplicates(folder):
    # A re-upload: the same tensors, another header.
    from safetensors import safe_open

    with safe_open(str(folder / "flux" / "a_kohya_r4.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(folder / "flux" / "a_reupload.safetensors"), metadata={"ss_output_name": "renamed"})

    result = CliRunner().invoke(main, ["info", str(folder), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert {g["family"]: g["count"] for g in s["families"]} == {"flux1": 5, "sd15": 3}
    files = {f["id"]: f for f in s["files"]}
    assert files["flux/a_kohya_r4"]["format"] == "kohya"
    assert files["flux/c_comfy_r16"]["format"] == "comfyui"
    assert files["flux/c_comfy_r16"]["ranks"] == [16]
    assert files["flux/b_kohya_r8"]["training"]["ss_network_dim"] == 8
    assert ["flux/a_kohya_r4", "flux/a_reupload"] in s["duplicates"]
    assert [p["source"] for p in s["problems"]] == [str(folder / "broken.safetensors")]

    text = CliRunner().invoke(main, ["info", str(folder), "--quiet"]).output
    assert "families   flux1: 5, sd15: 3" in text
    assert "ss_base_model_version=flux1_dev" in text


def test_ingest_refuses_mixed_families_listing_the_groups(folder, tmp_path):
    result = CliRunner().invoke(main, ["ingest", str(folder), "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "2 model families: flux1 (4 files), sd15 (3 files)" in line and "--family" in line


def test_mixed_ranks_pad_exactly_in_canonical_and_are_refused_in_raw(folder, tmp_path):
    store = ingest([folder], tmp_path / "c", repr="canonical", family="flux1", skip_bad=True, progress=False)
    assert len(store) == 4
    assert {m.rank for m in store.layout.modules} == {16}
    left = {d["source"]: d["reason"] for d in store.manifest["left_out"]}
    assert len(left) == 3 and all("family sd15" in r for r in left.values())
    for row_id in store.ids:
        source = next(r["source"] for r in store.rows if r["id"] == row_id)
        original = wsa.load_adapter(source)
        back = store.to_adapter(row_id)
        for name in original.modules:
            a, b = original.delta(name), back.delta(name)
            assert float((a - b).norm() / a.norm()) < 1e-5, (row_id, name)
    with pytest.raises(wsa.errors.CollectionError, match="use --repr canonical"):
        ingest([folder / "flux"], tmp_path / "r", repr="raw", progress=False)


def test_fused_kohya_and_split_comfy_of_one_delta_share_the_module_set(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = _factors(3 * D, D, 4, g)
    fused = tmp_path / "fused.safetensors"
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(fused))
    split = {}
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        split[f"transformer.transformer_blocks.0.attn.{leaf}.lora_A.weight"] = down.clone()
        split[f"transformer.transformer_blocks.0.attn.{leaf}.lora_B.weight"] = up[j * D : (j + 1) * D].clone()
    save_file(split, str(tmp_path / "split.safetensors"))
    store = ingest([tmp_path], tmp_path / "s", repr="canonical", progress=False)
    m = np.asarray(store.matrix)
    assert store.manifest["family"] == "flux1"
    assert np.allclose(m[0], m[1], atol=1e-6)  # the same ΔW: the same gauge-fixed row


def test_analyze_splits_families_and_lists_left_out_files(folder, tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(
        main, ["analyze", str(folder), "--out", str(out), "--analyzers", "pca", "--space", "delta", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    top = (out / "index.html").read_text()
    assert "flux1" in top and "sd15" in top and "broken.safetensors" in top
    assert (out / "flux1" / "index.html").is_file() and (out / "sd15" / "index.html").is_file()
    flux = json.loads((out / "flux1" / "results.json").read_text())
    collection = next(r for r in flux["results"] if r["analyzer"] == "collection")
    assert collection["data"]["family"] == "flux1"
    assert len(open_store(out / "flux1" / "store")) == 4

    refused = CliRunner().invoke(
        main, ["analyze", str(folder), "--out", str(tmp_path / "x"), "--families", "refuse", "--quiet"]
    )
    assert refused.exit_code == 1 and "flux1: 4 file(s)" in refused.output


def test_metadata_labels_and_colour_by(folder, tmp_path):
    _flux_kohya(folder / "flux" / "e_kohya_r8.safetensors", 8, 5, {"ss_network_dim": "8"})  # maps need 5
    out = tmp_path / "m"
    args = ["analyze", str(folder / "flux"), "--out", str(out), "--space", "delta", "--quiet"]
    args += ["--analyzers", "pca,manifold", "--labels", "metadata:ss_network_dim,family"]
    args += ["--color-by", "ss_network_dim"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "metadata_labels.json").read_text())
    assert {r["id"]: r["ss_network_dim"] for r in table}["b_kohya_r8"] == 8
    # A column that is absent (or constant in one family after a split) is an alert, not a lost report.
    odd = CliRunner().invoke(main, [*args[:-2], "--color-by", "nope", "--out", str(tmp_path / "n")])
    assert odd.exit_code == 0, odd.output
    assert "nope" in " ".join(json.loads((tmp_path / "n" / "results.json").read_text())["run"]["warnings"])


def test_metadata_labels_after_a_split_by_family_never_lose_a_report(folder, tmp_path):
    """The help's example on a mixed folder: within each family the base-model field is constant."""
    out = tmp_path / "mixed"
    args = ["analyze", str(folder), "--out", str(out), "--space", "delta", "--quiet", "--analyzers", "pca"]
    result = CliRunner().invoke(main, [*args, "--labels", "metadata", "--color-by", "ss_base_model_version"])
    assert result.exit_code == 0, result.output
    flux = json.loads((out / "flux1" / "results.json").read_text())["run"]
    assert "labels" in flux  # ss_network_dim varies among the Flux files
    sd = json.loads((out / "sd15" / "results.json").read_text())["run"]
    assert (out / "sd15" / "index.html").is_file() and "labels" not in sd  # constant metadata: no labels, an alert
    assert any(w.startswith("labels:") for w in sd["warnings"])
