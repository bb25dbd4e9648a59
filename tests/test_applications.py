"""``wsa sample / edit / invert / interpolate / decode`` and exporting points, on a small unpacked zoo.

Why these checks: each command must write adapters that load back into the same point (exact for raw
rows, energy reported for SVD re-factoring of delta rows), decode deterministically, calibrate edit
strength in σ of the collection's score, debias jointly, and refuse bad input with one line. The
space is fitted once on 40 shipped faces LoRAs with few PCs so everything runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import wsa
from wsa.cli import main
from wsa.cli.apply import parse_seeds
from wsa.editing import edit_direction, edited_points
from wsa.errors import ConfigError
from wsa.points import export_adapters, refactor_dense
from wsa.store.representations import encode
from wsa.workspace import Workspace


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from wsa.worlds.shipped import unpack_zoo

    root = tmp_path_factory.mktemp("apps")
    zoo = unpack_zoo("faces", root / "zoo", n=40, progress=False)
    out = root / "report"
    code, output = run(
        "analyze",
        str(zoo),
        "--labels",
        str(zoo / "attributes.csv"),
        "--analyzers",
        "pca,probes",
        "--n-components",
        "16",
        "--out",
        str(out),
        "-q",
    )
    assert code == 0, output
    return out


def test_workspace_records_base_prompt_and_layout(report):
    ws = Workspace.open(report)
    assert ws.info["base"] == "builtin:faces" and ws.info["prompt"].startswith("a sks face")
    assert ws.layout.n_features == 4480 and ws.store is not None
    row, how = ws.member("id_00003")
    assert how == "store row"
    np.testing.assert_array_equal(row[0], ws.store.read_rows([ws.store.index("id_00003")])[0])
    with pytest.raises(ConfigError, match="neither a member id"):
        ws.member("id_99999")


def test_edit_strength_is_calibrated_and_zero_is_identity(report):
    ws = Workspace.open(report)
    direction = edit_direction(ws, "beard")
    row, _ = ws.member("id_00001")
    rows = edited_points(ws, row, direction, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(rows[0], row[0], atol=1e-6)
    z = ws.points.coefficients(rows)[:, : direction.vector.shape[0]]
    moved = z @ direction.vector
    # One unit of strength moves the model's score by one σ of the collection's scores.
    np.testing.assert_allclose(moved[1] - moved[0], direction.sigma, rtol=1e-3)
    np.testing.assert_allclose(moved[2] - moved[0], 2 * direction.sigma, rtol=1e-3)
    scores = np.asarray(ws.space.coefficients[:, : direction.vector.shape[0]]) @ direction.vector
    np.testing.assert_allclose(np.std(scores, ddof=1), direction.sigma, rtol=1e-5)


def test_joint_debiasing_is_orthogonal_to_every_listed_direction(report):
    ws = Workspace.open(report)
    d = edit_direction(ws, "beard", ["bald", "glasses", "hair_colour"])
    pcs = ws.directions["pc"]
    others = ["bald", "glasses"] + [n for n in pcs if n.startswith("hair_colour=")]
    for name in others:
        assert abs(float(np.dot(d.vector, pcs[name]))) < 1e-5, name
    assert np.isclose(np.linalg.norm(d.vector), 1.0, atol=1e-5) and 0 < d.retained <= 1
    with pytest.raises(ConfigError, match="its own attribute"):
        edit_direction(ws, "beard", ["beard"])
    with pytest.raises(ConfigError, match="no direction"):
        edit_direction(ws, "moustache")


def test_edit_command_writes_adapter_grid_and_record(report, tmp_path):
    out = tmp_path / "edit"
    code, output = run(
        "edit",
        str(report),
        "--model",
        "id_00002",
        "--attr",
        "beard",
        "--strength",
        "+2",
        "--debias",
        "bald",
        "--seeds",
        "0-1",
        "--sample-steps",
        "2",
        "--inject-after",
        "1",
        "--out",
        str(out),
        "-q",
    )
    assert code == 0, output
    record = json.loads((out / "wsa_edit.json").read_text())
    assert record["edit"]["debiased_against"] == ["bald"] and record["edit"]["strengths_decoded"] == [0.0, 2.0]
    assert len(record["images"][0]["oracle"]["reads"]) == 4  # 2 strengths × 2 seeds, read by the oracle
    adapter = wsa.load_adapter(out / "adapters" / "id_00002_beard_+2")
    ws = Workspace.open(report)
    expected = edited_points(ws, ws.member("id_00002")[0], edit_direction(ws, "beard", ["bald"]), [2.0])[0]
    np.testing.assert_allclose(encode(adapter, ws.layout), expected, rtol=1e-6, atol=1e-7)
    assert (out / "grid.png").is_file()


def test_sample_interpolate_decode_commands(report, tmp_path):
    code, output = run(
        "sample",
        str(report),
        "--n",
        "3",
        "--seeds",
        "0",
        "--sample-steps",
        "2",
        "--format",
        "kohya",
        "--out",
        str(tmp_path / "s"),
        "-q",
    )
    assert code == 0, output
    record = json.loads((tmp_path / "s" / "wsa_sample.json").read_text())
    assert [m["name"] for m in record["models"]] == ["sample_000", "sample_001", "sample_002"]
    assert wsa.load_adapter(tmp_path / "s" / "adapters" / "sample_000.safetensors").format == "kohya"
    code, output = run(
        "interpolate",
        str(report),
        "--from",
        "id_00001",
        "--to",
        "id_00004",
        "--steps",
        "3",
        "--seeds",
        "0",
        "--sample-steps",
        "2",
        "--out",
        str(tmp_path / "i"),
        "-q",
    )
    assert code == 0, output
    ws = Workspace.open(report)
    a, b = ws.member("id_00001")[0][0], ws.member("id_00004")[0][0]
    mid = encode(wsa.load_adapter(tmp_path / "i" / "adapters" / "path_01"), ws.layout)
    np.testing.assert_allclose(mid, (a + b) / 2, rtol=1e-5, atol=1e-6)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks face, smiling, on red\na sks face, neutral, on blue\n")
    code, output = run(
        "decode",
        str(report),
        "--models",
        f"id_00001,{tmp_path / 's' / 'adapters' / 'sample_000.safetensors'}",
        "--prompts",
        str(prompts),
        "--seeds",
        "0-1",
        "--sample-steps",
        "2",
        "--out",
        str(tmp_path / "d"),
        "-q",
    )
    assert code == 0, output
    record = json.loads((tmp_path / "d" / "wsa_decode.json").read_text())
    assert len(record["images"][0]["oracle"]["reads"]) == 2 * 2 * 2
    prompts.write_text("a sks zebra\n")
    code, output = run(
        "decode", str(report), "--models", "id_00001", "--prompts", str(prompts), "--out", str(tmp_path / "d2"), "-q"
    )
    assert code != 0 and "zebra" in output and "Traceback" not in output


def test_invert_recovers_a_member_better_than_the_mean(report, tmp_path):
    from wsa.inversion import invert, load_image
    from wsa.worlds import get_family

    ws = Workspace.open(report)
    decoder = ws.decoder(device="cpu", steps=2)
    faces = get_family("faces")
    table = faces.sample_identities(3, seed=1)
    image = faces.render(table.iloc[2:3], faces.neutral_nuisance(1), size=32)[0]
    result = invert(ws, decoder, image, steps=25, lr=0.1, batch=4, progress=False)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert result.point.shape == (ws.layout.n_features,)
    # the file round trip through the command line, with a mask
    from PIL import Image

    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "me.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    code, output = run(
        "invert",
        str(report),
        str(tmp_path / "me.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--opt-steps",
        "3",
        "--seeds",
        "0",
        "--sample-steps",
        "2",
        "--out",
        str(tmp_path / "inv"),
        "-q",
    )
    assert code == 0, output
    assert wsa.load_adapter(tmp_path / "inv" / "adapters" / "inverted").format == "peft"
    assert load_image(str(tmp_path / "mask.png"), 16, mask=True).shape == (1, 16, 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, output = run("invert", str(report), str(tmp_path / "bad.png"), "--out", str(tmp_path / "x"), "-q")
    assert code != 0 and "cannot read image" in output


def test_delta_rows_refactor_with_energy_reported(report, tmp_path):
    ws = Workspace.open(report)
    adapter = ws.store.to_adapter(0)
    dense = {n: m.direction_delta() for n, m in adapter.modules.items()}
    from wsa.adapter import Adapter, ModuleWeights

    full = Adapter(
        "x", "test", {n: ModuleWeights("full", {"diff": d}, tuple(d.shape), 0, None, 1.0) for n, d in dense.items()}
    )
    lora, energy = refactor_dense(full, 1)
    for name, d in dense.items():
        torch.testing.assert_close(lora.delta(name), d, atol=1e-5, rtol=1e-4)  # rank-1 ΔW: exact at rank 1
        assert energy[name] == pytest.approx(1.0)
    noisy = Adapter(
        "x",
        "test",
        {
            n: ModuleWeights("full", {"diff": d + 0.01 * torch.randn_like(d)}, tuple(d.shape), 0, None, 1.0)
            for n, d in dense.items()
        },
    )
    _, energy = refactor_dense(noisy, 1)
    assert all(0.0 < e < 1.0 for e in energy.values())


def test_export_refuses_dense_rows_without_rank(tmp_path):
    from wsa.store.layout import build_layout
    from wsa.store.representations import decode

    layout = build_layout("delta", [("a.to_q", "full", (4, 3), 0, 1.0, [("diff", (4, 3))], None)])
    rows = np.random.default_rng(0).standard_normal((1, 12)).astype(np.float32)
    adapters = [decode(rows[0], layout, path="p")]
    with pytest.raises(ConfigError, match="--rank"):
        export_adapters(adapters, tmp_path, format="peft")
    paths, report = export_adapters(adapters, tmp_path, format="peft", rank=2)
    assert report["exact"] is False and 0 < report["energy_kept_mean"] < 1
    assert wsa.load_adapter(paths[0]).modules["a.to_q"].rank == 2


@pytest.mark.parametrize(("text", "seeds"), [("0-3", [0, 1, 2, 3]), ("0,5,9", [0, 5, 9]), ("0-1,7", [0, 1, 7])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


def test_space_without_decoding_info_is_a_clear_error(report, tmp_path):
    import shutil

    copy = tmp_path / "space"
    shutil.copytree(report / "space", copy)
    (copy / "decoding.json").unlink()
    code, output = run("sample", str(copy), "--out", str(tmp_path / "o"), "-q")
    assert code != 0 and "decoding.json" in output
