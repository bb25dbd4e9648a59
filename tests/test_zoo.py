"""The LoRA zoo, the shipped zoos, the attribute oracle and per-sample adapters (BatchedLoRA).

Why these checks: every measurement of the embedded world rests on (i) zoo files being standard
adapters that wsa's loaders, peft and diffusers read the same way, (ii) batched per-sample adapters
computing exactly what a loaded PEFT LoRA computes, (iii) an interrupted zoo resuming to the same
weights, (iv) the shipped zoo unpacking bit for bit, and (v) the oracle reading attributes accurately.
A few-step zoo of three identities on the shipped base runs in seconds on a CPU.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

import wsa
from wsa.decoding import BatchedLoRA, DenseStack, LowRankStack
from wsa.decoding.stacks import stacks_from_adapters
from wsa.errors import ConfigError, StoreError
from wsa.worlds import builtin_base, get_family
from wsa.worlds.model import BaseModel
from wsa.worlds.zoo import ZooConfig, build_zoo, target_layers, train_group

FEW = {
    "n": 3,
    "steps": 4,
    "images_per_identity": 2,
    "batch_per_identity": 2,
    "group_size": 3,
    "device": "cpu",
    "progress": False,
}


@pytest.fixture(scope="module")
def faces():
    return get_family("faces")


@pytest.fixture(scope="module")
def base():
    return BaseModel.load(builtin_base("faces"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, faces):
    out = tmp_path_factory.mktemp("zoo")
    record = build_zoo(faces, None, out, **FEW)
    return out, record


def test_zoo_writes_standard_adapters_attributes_and_references(zoo, faces):
    out, record = zoo
    table = pd.read_csv(out / "attributes.csv")
    expected = faces.sample_identities(3, seed=ZooConfig().seed)
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    for identity in table.id:
        adapter = wsa.load_adapter(out / identity)
        assert adapter.format == "peft" and len(adapter.modules) == 28
        assert {m.rank for m in adapter.modules.values()} == {1}
        assert all(".attn1.to_" in n or ".attn2.to_" in n for n in adapter.modules)
        assert (out / identity / "reference.png").is_file()
        config = json.loads((out / identity / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "builtin:faces"
    assert record["summary"]["identities"] == 3 and record["groups"][0]["size"] == 3
    assert record["prompt"].startswith("a sks face")


def test_shared_initialisation_and_distinct_identities(zoo):
    out, _ = zoo
    a, b = (wsa.load_adapter(out / i) for i in ("id_00000", "id_00001"))
    name = sorted(a.modules)[0]
    # After a few steps the down factors are still near the shared init; the up factors differ.
    down_a, down_b = a.modules[name].tensors["down"], b.modules[name].tensors["down"]
    assert torch.nn.functional.cosine_similarity(down_a.flatten(), down_b.flatten(), dim=0) > 0.9
    assert not torch.equal(a.modules[name].tensors["up"], b.modules[name].tensors["up"])


def test_zoo_ingests_into_a_store(zoo, tmp_path):
    out, _ = zoo
    store = wsa.ingest([out], tmp_path / "store", progress=False)
    assert len(store) == 3 and store.n_features == 4480


def test_batched_lora_equals_peft_per_sample(zoo, base):
    from peft import PeftModel

    out, _ = zoo
    ids = ["id_00000", "id_00001", "id_00002"]
    adapters = [wsa.load_adapter(out / i) for i in ids]
    lora = BatchedLoRA(base.unet, stacks_from_adapters(adapters))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([10, 400, 800, 999])
    ctx = base.encode_prompts(["a sks face, smiling, on blue"] * 4).detach()
    with torch.no_grad(), lora.active([2, 0, 1, -1]):
        ours = base.unet(x, t, ctx).sample
    with torch.no_grad():
        plain = base.unet(x, t, ctx).sample
    torch.testing.assert_close(ours[3], plain[3])  # -1: the base model alone
    for row, k in ((0, 2), (1, 0), (2, 1)):
        peft_unet = PeftModel.from_pretrained(copy.deepcopy(base.unet), str(out / ids[k]))
        with torch.no_grad():
            ref = peft_unet(x[row : row + 1], t[row : row + 1], ctx[row : row + 1]).sample
        torch.testing.assert_close(ours[row : row + 1], ref, atol=1e-5, rtol=1e-4)
        assert (ref - plain[row : row + 1]).abs().max() > 1e-4  # the adapter does something


def test_dense_stack_equals_low_rank_stack(zoo, base):
    out, _ = zoo
    adapters = [wsa.load_adapter(out / i) for i in ("id_00000", "id_00001")]
    low = stacks_from_adapters(adapters)
    dense = {n: DenseStack(torch.stack([a.delta(n) for a in adapters])) for n in low}
    assert all(isinstance(s, LowRankStack) for s in low.values())
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([100, 600])
    ctx = base.encode_prompts(["a sks face, neutral, on blue"] * 2).detach()
    results = []
    for stacks in (low, dense):
        with torch.no_grad(), BatchedLoRA(base.unet, stacks).active([1, 0]):
            results.append(base.unet(x, t, ctx).sample)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_batched_lora_rejects_bad_assignments(base):
    layers = target_layers(base.unet, "to_q")
    name, layer = next(iter(layers.items()))
    stack = LowRankStack(torch.zeros(2, 1, layer.in_features), torch.zeros(2, layer.out_features, 1), torch.ones(2))
    lora = BatchedLoRA(base.unet, {name: stack})
    with pytest.raises(ConfigError, match="outside"), lora.active([0, 2]):
        pass
    with pytest.raises(ConfigError, match="no layer"):
        BatchedLoRA(base.unet, {"nope.to_q": stack})


def test_rerun_is_a_no_op_and_more_identities_only_train_the_new(zoo, faces, tmp_path):
    out, _ = zoo
    before = {p: p.stat().st_mtime_ns for p in out.glob("id_*/adapter_model.safetensors")}
    record = build_zoo(faces, None, out, **FEW)
    assert {p: p.stat().st_mtime_ns for p in out.glob("id_*/adapter_model.safetensors")} == before
    assert record["summary"]["identities"] == 3
    with pytest.raises(ConfigError, match="other options"):
        build_zoo(faces, None, out, **{**FEW, "rank": 2})


def test_interrupted_group_resumes_to_the_same_weights(faces, base, tmp_path):
    cfg = ZooConfig(**{**FEW, "steps": 4, "checkpoint_every": 2})
    identities = faces.sample_identities(2, seed=cfg.seed)

    class Stop(Exception):
        pass

    class Bar:
        def __init__(self, stop_after: int | None) -> None:
            self.n, self.stop_after = 0, stop_after

        def update(self, k: int) -> None:
            self.n += k
            if self.stop_after is not None and self.n >= self.stop_after:
                raise Stop

        def set_postfix(self, **_: object) -> None:
            pass

    checkpoint = tmp_path / "group.pt"
    with pytest.raises(Stop):
        train_group(base, faces, identities, [0, 1], cfg, torch.device("cpu"), checkpoint, Bar(3))
    assert checkpoint.is_file()
    resumed = train_group(base, faces, identities, [0, 1], cfg, torch.device("cpu"), checkpoint, Bar(None))
    straight = train_group(base, faces, identities, [0, 1], cfg, torch.device("cpu"), None, Bar(None))
    for name in straight.up:
        torch.testing.assert_close(resumed.up[name], straight.up[name])
        torch.testing.assert_close(resumed.down[name], straight.down[name])


def test_diffusers_format_and_bad_options(faces, tmp_path):
    build_zoo(faces, None, tmp_path / "d", **{**FEW, "n": 2, "format": "diffusers", "dtype": "float16"})
    adapter = wsa.load_adapter(tmp_path / "d" / "id_00000")
    assert adapter.format == "diffusers" and len(adapter.modules) == 28
    with pytest.raises(ConfigError, match="format"):
        build_zoo(faces, None, tmp_path / "x", **{**FEW, "format": "zip"})
    with pytest.raises(ConfigError, match="match no attention projection"):
        build_zoo(faces, None, tmp_path / "y", **{**FEW, "targets": "to_z"})
    with pytest.raises(ConfigError, match="unknown zoo option"):
        build_zoo(faces, None, tmp_path / "z", colour="red")
    with pytest.raises(ConfigError, match="trained on 'faces'"):
        build_zoo(get_family("dogs"), builtin_base("faces"), tmp_path / "w", **FEW)


# ----------------------------------------------------------------------------------------------
# Shipped zoos


@pytest.mark.parametrize(("family", "count"), [("faces", 1000), ("dogs", 200)])
def test_shipped_zoo_unpacks_bit_for_bit(family, count, tmp_path):
    from wsa.worlds.shipped import describe, packed_adapters, shipped_zoo, unpack_zoo

    info = describe(shipped_zoo(family))
    assert info["identities"] == count and info["modules"] == 28 and info["rank"] == 1
    out = unpack_zoo(family, tmp_path / family, n=3, progress=False)
    ids, stacks, _, _ = packed_adapters(shipped_zoo(family))
    for i, identity in enumerate(ids[:3]):
        adapter = wsa.load_adapter(out / identity)
        for name, (down, up) in stacks.items():
            assert torch.equal(adapter.modules[name].tensors["down"], down[i])
            assert torch.equal(adapter.modules[name].tensors["up"], up[i])
    table = pd.read_csv(out / "attributes.csv")
    assert list(table.id) == ids[:3]
    assert json.loads((out / "zoo.json").read_text())["identities_unpacked"] == 3


def test_pack_round_trip(zoo, tmp_path):
    from wsa.worlds.shipped import pack_zoo, unpack_zoo

    out, _ = zoo
    packed = pack_zoo(out, tmp_path / "packed")
    again = unpack_zoo("faces", tmp_path / "again", source=packed, progress=False)
    for identity in ("id_00000", "id_00002"):
        a, b = wsa.load_adapter(out / identity), wsa.load_adapter(again / identity)
        for name in a.modules:
            assert torch.equal(a.modules[name].tensors["up"].half(), b.modules[name].tensors["up"])


# ----------------------------------------------------------------------------------------------
# The oracle


@pytest.mark.parametrize("family", ["faces", "dogs"])
def test_shipped_oracle_reads_fresh_renders(family):
    from wsa.worlds.oracle import builtin_oracle, render_pool

    oracle = builtin_oracle(family)
    images, truth = render_pool(get_family(family), 256, seed=31_337)
    scores = oracle.score(images, truth)
    for name, s in scores.items():
        if "accuracy" in s:
            assert s["accuracy"] >= 0.9, (name, s)
    best_r2 = max(s["r2"] for s in scores.values() if "r2" in s)
    assert best_r2 >= 0.9
    assert oracle.confidence(images).mean() > 0.9
    # Shuffled truth is far worse: the oracle reads the image, not the marginals.
    shuffled = truth.sample(frac=1.0, random_state=0).reset_index(drop=True)
    worse = oracle.score(images, shuffled)
    assert np.mean([s["accuracy"] for s in worse.values() if "accuracy" in s]) < 0.7


def test_oracle_checksum_and_training_round(tmp_path, faces):
    from wsa.worlds.oracle import Oracle, train_oracle

    oracle = train_oracle(faces, tmp_path / "o", train_images=256, test_images=64, steps=3, progress=False)
    loaded = Oracle.load(tmp_path / "o")
    images = faces.render(faces.sample_identities(4, 0), faces.sample_nuisance(4, 0), size=32)
    torch.testing.assert_close(loaded.outputs(images), oracle.outputs(images), atol=2e-2, rtol=2e-2)
    assert "per_attribute" in loaded.info["held_out"]
    weights = tmp_path / "o" / "oracle.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreError, match="sha256"):
        Oracle.load(tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# Decoding through `wsa analyze --decode`


def test_analyze_decode_gallery_on_an_unpacked_zoo(tmp_path):
    from click.testing import CliRunner

    from wsa.cli import main
    from wsa.worlds.shipped import unpack_zoo

    zoo_dir = unpack_zoo("faces", tmp_path / "zoo", n=30, progress=False)
    out = tmp_path / "report"
    args = [
        "analyze",
        str(zoo_dir),
        "--labels",
        str(zoo_dir / "attributes.csv"),
        "--out",
        str(out),
        "--analyzers",
        "pca,probes,interpolation,sampling,gallery",
        "--decode",
        "--decode-steps",
        "3",
        "-q",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    gallery = next(r for r in results["results"] if r["analyzer"] == "gallery")
    assert {f["name"] for f in gallery["figures"]} == {"members", "samples", "paths", "edits"}
    assert len(gallery["data"]["edits"]["strips"]) == 4 * 2  # 4 attributes × 2 members
    assert gallery["data"]["decoder"]["base"] == "builtin:faces"
    fidelity = {row["attribute"]: row for row in gallery["data"]["fidelity"]}
    assert set(fidelity) == {a.name for a in get_family("faces").attributes}
    html = (out / "index.html").read_text()
    assert "Decoded models" in html


def test_gallery_without_decode_and_unknown_base_are_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from wsa.cli import main
    from wsa.synthetic import synth_collection

    loras = tmp_path / "loras"
    synth_collection(loras, 4, progress=False)
    result = CliRunner().invoke(main, ["analyze", str(loras), "--out", str(tmp_path / "r"), "--analyzers", "gallery"])
    assert result.exit_code != 0 and "--decode" in result.output
    result = CliRunner().invoke(main, ["analyze", str(loras), "--out", str(tmp_path / "r"), "--decode", "-q"])
    assert result.exit_code != 0 and "--base" in result.output


def test_decoder_is_deterministic_and_batch_invariant(tmp_path):
    from wsa.decoding.decoder import decoder_for_store
    from wsa.worlds.shipped import unpack_zoo

    zoo_dir = unpack_zoo("faces", tmp_path / "zoo", n=3, progress=False)
    store = wsa.ingest([zoo_dir], tmp_path / "store", progress=False)
    decoder = decoder_for_store(store, device="cpu", steps=3)
    assert decoder.base_ref == "builtin:faces" and decoder.prompt.startswith("a sks face")
    rows = store.read_rows([0, 1, 2])
    together = decoder.images(rows, [0, 1, 2, -1], [5, 5, 6, 5])
    alone = decoder.images(rows[1:2], [0], [5])
    torch.testing.assert_close(together[1:2], alone, atol=1e-3, rtol=1e-3)  # batch size changes float sums
    assert (together[0] - together[1]).abs().max() > 1e-3  # different adapters, different pictures
    with pytest.raises(ConfigError, match="features"):
        decoder.images(np.zeros((1, 7), dtype=np.float32), [0], [0])


def test_unpack_cli(tmp_path):
    from click.testing import CliRunner

    from wsa.cli import main

    result = CliRunner().invoke(
        main, ["world", "unpack", "dogs", "--out", str(tmp_path / "d"), "--n", "2", "--format", "kohya"]
    )
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "d").glob("*.safetensors"))
    assert files == ["id_00000.safetensors", "id_00001.safetensors"]
    assert wsa.load_adapter(tmp_path / "d" / "id_00000.safetensors").format == "kohya"


def test_world_passthrough_help_lists_options():
    from click.testing import CliRunner

    from wsa.cli import main

    for command, option in (
        ("zoo", "--images-per-identity"),
        ("train-oracle", "--train-images"),
        ("train-base", "--n-identities"),
    ):
        result = CliRunner().invoke(main, ["world", command, "--help"])
        assert result.exit_code == 0 and option in result.output and "Example" in result.output
