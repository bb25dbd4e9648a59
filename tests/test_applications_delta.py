"""The applications on the ΔW space (``wsa analyze --space delta``), against the same geometry computed explicitly.

Why this comparison: the ΔW space from factor Grams never forms ΔW; the explicit PCA of dense ΔW rows
(``--space explicit --repr delta``) is the same geometry computed the direct way. So every application —
sample, edit, interpolate, invert, decode, export — must give the same ΔW (and the same images) on both,
up to each component's sign (PCA fixes signs by different rules in the two forms; the signs are aligned
here from the members' coefficients). The raw-factor space is *not* this geometry (PCA of B and A is not
linear in ΔW = B·A), so it is not the comparison. A mixed-rank collection, which only the ΔW space can
analyse, then goes through every command end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import wsa
from wsa.adapter import Adapter, ModuleWeights
from wsa.cli import main
from wsa.editing import edit_direction, edited_points
from wsa.workspace import Workspace

K = 12


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _analyze(zoo: Path, out: Path, *extra: str) -> Path:
    code, output = run(
        "analyze",
        str(zoo),
        "--labels",
        str(zoo / "attributes.csv"),
        "--analyzers",
        "pca,probes",
        "--n-components",
        str(K),
        "--out",
        str(out),
        "-q",
        *extra,
    )
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    from wsa.worlds.shipped import unpack_zoo

    root = tmp_path_factory.mktemp("delta-apps")
    zoo = unpack_zoo("faces", root / "zoo", n=30, progress=False)
    return {
        "zoo": zoo,
        "delta": _analyze(zoo, root / "delta", "--space", "delta"),
        "dense": _analyze(zoo, root / "dense", "--space", "explicit", "--repr", "delta"),
    }


@pytest.fixture(scope="module")
def spaces(reports) -> tuple[Workspace, Workspace, np.ndarray]:
    """(ΔW-space workspace, explicit dense-ΔW workspace, per-component signs aligning the second to the first)."""
    delta, dense = Workspace.open(reports["delta"]), Workspace.open(reports["dense"])
    assert delta.space.geometry == "delta" and dense.space.geometry == "explicit"
    assert list(delta.space.ids) == list(dense.space.ids)
    signs = np.sign(np.sum(np.asarray(delta.space.coefficients) * np.asarray(dense.space.coefficients), axis=0))
    assert np.all(signs != 0)
    return delta, dense, signs


def _deltas(adapters: list[Adapter]) -> list[dict[str, torch.Tensor]]:
    return [{name: a.delta(name).double() for name in a.modules} for a in adapters]


def _assert_same_delta(got: list[Adapter], want: list[Adapter], rtol: float = 2e-3) -> None:
    for g, w in zip(_deltas(got), _deltas(want), strict=True):
        assert g.keys() == w.keys()
        total = sum(float((w[n] ** 2).sum()) for n in w) ** 0.5
        error = sum(float(((g[n] - w[n]) ** 2).sum()) for n in w) ** 0.5
        assert error <= rtol * total, (error, total)


def test_the_two_computations_are_one_geometry(spaces) -> None:
    delta, dense, signs = spaces
    np.testing.assert_allclose(delta.space.explained_variance, dense.space.explained_variance, rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(delta.space.coefficients), np.asarray(dense.space.coefficients) * signs, rtol=1e-2, atol=1e-3
    )


def test_sample_points_have_the_same_delta(spaces) -> None:
    delta, dense, signs = spaces
    z = np.random.default_rng(0).standard_normal((3, K)) * np.sqrt(delta.space.explained_variance)
    got = delta.points.adapters(delta.points.from_coefficients(z), ["a", "b", "c"])
    want = dense.points.adapters(dense.points.from_coefficients(z * signs), ["a", "b", "c"])
    _assert_same_delta(got, want)
    # the point's coefficients come back
    np.testing.assert_allclose(delta.points.coefficients(delta.points.from_coefficients(z)), z, rtol=1e-4, atol=1e-6)


def test_members_edits_and_lines_have_the_same_delta(spaces) -> None:
    delta, dense, _ = spaces
    for ws in (delta, dense):
        assert ws.directions is not None and "beard" in ws.directions["pc"]
    pd_, pe = delta.member("id_00003")[0], dense.member("id_00003")[0]
    _assert_same_delta(delta.points.adapters(pd_, ["m"]), [delta.store.to_adapter(delta.store.index("id_00003"))])
    strengths = [0.0, 2.0, -1.5]
    got = edited_points(delta, pd_, edit_direction(delta, "beard", ["bald"]), strengths)
    want = edited_points(dense, pe, edit_direction(dense, "beard", ["bald"]), strengths)
    names = [f"e{i}" for i in range(len(strengths))]
    _assert_same_delta(delta.points.adapters(got, names), dense.points.adapters(want, names))
    # one σ of the collection's beard score per unit of strength, in the ΔW space too
    direction = edit_direction(delta, "beard")
    moved = delta.points.coefficients(edited_points(delta, pd_, direction, [0.0, 1.0]))[:, :K] @ direction.vector
    assert moved[1] - moved[0] == pytest.approx(direction.sigma, rel=1e-3)
    b_d, b_e = delta.member("id_00007")[0], dense.member("id_00007")[0]
    _assert_same_delta(delta.points.adapters((pd_ + b_d) / 2, ["mid"]), dense.points.adapters((pe + b_e) / 2, ["mid"]))


def test_an_outside_adapter_is_placed_at_the_same_coefficients(spaces, reports, tmp_path) -> None:
    delta, dense, signs = spaces
    a, b = delta.store.to_adapter(0), delta.store.to_adapter(1)
    outside = Adapter(
        "outside",
        "test",
        {
            n: ModuleWeights(
                "lora",
                {
                    "down": torch.cat([m.tensors["down"], b.modules[n].tensors["down"]]),
                    "up": torch.cat(
                        [m.tensors["up"] * m.scale, -0.5 * b.modules[n].tensors["up"] * b.modules[n].scale], 1
                    ),
                },
                m.shape,
                2,
                2.0,
                1.0,
            )
            for n, m in a.modules.items()
        },
    )
    path = wsa.export.write_adapter(outside, tmp_path / "outside", "peft")
    zd = delta.points.coefficients(delta.member(str(path))[0])
    ze = dense.points.coefficients(dense.member(str(path))[0])
    np.testing.assert_allclose(zd, ze * signs, rtol=1e-3, atol=1e-4 * float(np.abs(ze).max()))


def test_decoded_images_and_inversion_agree(spaces) -> None:
    from wsa.inversion import invert
    from wsa.worlds import get_family

    delta, dense, signs = spaces
    z = np.random.default_rng(1).standard_normal((2, K)) * np.sqrt(delta.space.explained_variance)
    dec_d, dec_e = delta.decoder(device="cpu", steps=3), dense.decoder(device="cpu", steps=3)
    img_d = dec_d.images(delta.points.stacks(delta.points.from_coefficients(z)), [0, 1], [0, 0])
    img_e = dec_e.images(dense.points.stacks(dense.points.from_coefficients(z * signs)), [0, 1], [0, 0])
    assert float((img_d - img_e).abs().max()) < 2e-3
    faces = get_family("faces")
    image = faces.render(faces.sample_identities(2, seed=3).iloc[1:2], faces.neutral_nuisance(1), size=32)[0]
    got = invert(delta, dec_d, image, k=6, steps=6, lr=0.1, batch=2, progress=False)
    want = invert(dense, dec_e, image, k=6, steps=6, lr=0.1, batch=2, progress=False)
    np.testing.assert_allclose(got.losses, want.losses, rtol=2e-3)
    np.testing.assert_allclose(got.coefficients, want.coefficients * signs[:6], rtol=1e-2, atol=1e-3)


def test_export_refactors_to_rank_with_energy(spaces, tmp_path) -> None:
    from wsa.points import export_adapters

    delta, _, _ = spaces
    z = np.sqrt(delta.space.explained_variance)[None] * 1.5
    point = delta.points.from_coefficients(z)
    exact = delta.points.adapters(point, ["p"])
    paths, report = export_adapters(exact, tmp_path / "r2", rank=2)
    assert report["rank"] == 2 and 0 < report["energy_kept_mean"] < 1 and not report["exact"]
    loaded = wsa.load_adapter(paths[0])
    assert max(m.rank for m in loaded.modules.values()) == 2
    for name, m in exact[0].modules.items():
        s = torch.linalg.svdvals(m.tensors["up"].double() @ m.tensors["down"].double())
        best = float((s[:2] ** 2).sum() / (s**2).sum())
        assert float(torch.linalg.matrix_norm(loaded.delta(name).double())) ** 2 == pytest.approx(
            best * float((s**2).sum()), rel=1e-3
        )
    paths, report = export_adapters(exact, tmp_path / "full", rank=10_000)
    assert report["exact"]
    _assert_same_delta([wsa.load_adapter(paths[0])], exact, rtol=1e-5)


def test_every_command_runs_on_a_delta_report(reports, tmp_path) -> None:
    report = str(reports["delta"])
    common = ["--seeds", "0", "--sample-steps", "2", "-q"]
    code, out = run("sample", report, "--n", "2", "--out", str(tmp_path / "s"), *common)
    assert code == 0, out
    code, out = run(
        "edit", report, "--model", "id_00002", "--attr", "beard", "--inject-after", "1", "--rank", "4",
        "--out", str(tmp_path / "e"), *common,
    )  # fmt: skip
    assert code == 0, out
    record = json.loads((tmp_path / "e" / "wsa_edit.json").read_text())
    assert record["export"]["rank"] == 4 and 0 < record["export"]["energy_kept_mean"] <= 1
    code, out = run(
        "interpolate", report, "--from", "id_00001", "--to", str(tmp_path / "s" / "adapters" / "sample_000"),
        "--steps", "3", "--out", str(tmp_path / "i"), *common,
    )  # fmt: skip
    assert code == 0, out
    code, out = run(
        "decode", report, "--models", f"id_00001,{tmp_path / 'e' / 'adapters' / 'id_00002_beard_+2'}",
        "--out", str(tmp_path / "d"), *common,
    )  # fmt: skip
    assert code == 0, out
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    code, out = run(
        "invert", report, str(tmp_path / "grey.png"), "--opt-steps", "2", "--out", str(tmp_path / "v"), *common
    )
    assert code == 0, out
    for sub in ("s", "e", "i", "d", "v"):
        assert (tmp_path / sub / "grid.png").is_file()


def _mixed_rank_zoo(zoo: Path, out: Path, n: int = 16) -> Path:
    """Faces members re-written as rank 1, 2 and 3 LoRAs (each = a member plus fractions of others): mixed ranks."""
    import shutil

    members = sorted(p for p in zoo.iterdir() if p.is_dir())[:n]
    loaded = [wsa.load_adapter(p) for p in members]
    out.mkdir()
    for i, (path, adapter) in enumerate(zip(members, loaded, strict=True)):
        rank = 1 + i % 3
        others = [loaded[(i + j) % n] for j in range(1, rank)]
        modules = {}
        for name, m in adapter.modules.items():
            ups = [m.tensors["up"] * m.scale] + [
                0.3 * o.modules[name].tensors["up"] * o.modules[name].scale for o in others
            ]
            downs = [m.tensors["down"]] + [o.modules[name].tensors["down"] for o in others]
            modules[name] = ModuleWeights(
                "lora", {"up": torch.cat(ups, 1), "down": torch.cat(downs)}, m.shape, rank, float(rank), 1.0
            )
        wsa.export.write_adapter(Adapter(path.name, "test", modules), out / path.name, "peft")
    shutil.copy(zoo / "attributes.csv", out / "attributes.csv")
    return out


def test_a_mixed_rank_collection_end_to_end(reports, tmp_path) -> None:
    mixed = _mixed_rank_zoo(reports["zoo"], tmp_path / "mixed")
    code, out = run(
        "analyze", str(mixed), "--space", "delta", "--base", "builtin:faces", "--labels", str(mixed / "attributes.csv"),
        "--analyzers", "pca,probes", "--n-components", "8", "--out", str(tmp_path / "r"), "-q",
    )  # fmt: skip
    assert code == 0, out
    ws = Workspace.open(tmp_path / "r")
    assert ws.store.repr == "canonical" and {m.rank for m in ws.store.layout.modules} == {3}  # padded to the largest
    # a member's point is exactly that member's ΔW, whatever its rank
    for rid in ("id_00000", "id_00001", "id_00002"):
        want = wsa.load_adapter(mixed / rid)
        _assert_same_delta(ws.points.adapters(ws.member(rid)[0], [rid]), [want], rtol=1e-4)
    common = ["--seeds", "0", "--sample-steps", "2", "-q"]
    for args in (
        ["sample", "--n", "2"],
        ["edit", "--model", "id_00004", "--attr", "beard"],
        ["interpolate", "--from", "id_00000", "--to", "id_00005", "--steps", "3"],
        ["decode", "--models", "id_00000,id_00001"],
    ):
        target = tmp_path / args[0]
        code, out = run(args[0], str(tmp_path / "r"), *args[1:], "--out", str(target), *common)
        assert code == 0, out
        assert (target / "grid.png").is_file()


def test_gallery_decodes_on_the_delta_space(reports, tmp_path) -> None:
    code, out = run(
        "analyze", str(reports["zoo"]), "--space", "delta", "--labels", str(reports["zoo"] / "attributes.csv"),
        "--analyzers", "pca,sampling,interpolation,probes,gallery", "--n-components", "8", "--decode",
        "--decode-steps", "2", "--out", str(tmp_path / "g"), "-q",
    )  # fmt: skip
    assert code == 0, out
    html = (tmp_path / "g" / "index.html").read_text()
    assert "Decoded models" in html and "skipped" not in html.split("Decoded models", 1)[1][:400]


def test_canonical_factors_are_refused_as_a_geometry(reports, tmp_path) -> None:
    """Gauge-fixed factors are storage: PCA of them is not linear in ΔW, so --space explicit on them is refused."""
    for extra in (["--repr", "canonical"], ["--space", "explicit", "--repr", "canonical"]):
        code, out = run("analyze", str(reports["zoo"]), *extra, "--out", str(tmp_path / "x"), "-q")
        assert code != 0 and "not a geometry" in out and "--space delta" in out and "Traceback" not in out
    store = reports["delta"] / "store"  # canonical storage, analysed again as the explicit space
    code, out = run("analyze", str(store), "--space", "explicit", "--out", str(tmp_path / "y"), "-q")
    assert code != 0 and "not a geometry" in out
    code, out = run("analyze", str(store), "--space", "delta", "--standardize", "--out", str(tmp_path / "z"), "-q")
    assert code != 0 and "--standardize" in out


def test_a_broken_delta_space_is_one_line(reports, tmp_path) -> None:
    import shutil

    copy = tmp_path / "space"
    shutil.copytree(reports["delta"] / "space", copy)
    blob = bytearray((copy / "delta_space.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "delta_space.safetensors").write_bytes(bytes(blob))
    code, out = run("sample", str(copy), "--out", str(tmp_path / "o"), "-q")
    assert code != 0 and "sha256" in out and "Traceback" not in out
    (copy / "space.json").write_text('{"kind": "delta-gram", "ids": 3}')
    code, out = run("sample", str(copy), "--out", str(tmp_path / "o"), "-q")
    assert code != 0 and "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_an_outside_adapter_that_does_not_fit_is_one_line(reports, tmp_path) -> None:
    """A file handed to a ΔW-space command is input: a foreign module, a wrong shape or garbage is one line."""
    member = wsa.load_adapter(reports["zoo"] / "id_00001")
    name, m = next(iter(member.modules.items()))
    foreign = Adapter("f", "test", {"text_model.encoder.layers.0.self_attn.q_proj": m})
    wide = ModuleWeights("lora", {"down": torch.zeros(1, m.shape[1] + 1), "up": torch.zeros(m.shape[0], 1)},
                         (m.shape[0], m.shape[1] + 1), 1, 1.0, 1.0)  # fmt: skip
    bad_shape = Adapter("w", "test", {name: wide})
    cases = {
        "foreign": wsa.export.write_adapter(foreign, tmp_path / "foreign", "peft"),
        "shape": wsa.export.write_adapter(bad_shape, tmp_path / "shape", "peft"),
    }
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    cases["junk"] = tmp_path / "junk.safetensors"
    for label, path in cases.items():
        code, out = run("decode", str(reports["delta"]), "--models", str(path), "--out", str(tmp_path / label), "-q")
        assert code != 0 and "Traceback" not in out and len(out.strip().splitlines()) == 1, (label, out)
        assert str(path) in out, (label, out)
