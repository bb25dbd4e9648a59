"""`wsa analyze` end to end on a planted collection: the report's numbers checked against independent recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.decomposition import PCA as SkPCA

import wsa
from wsa.analyses import available_analyzers, get_analyzer
from wsa.cli import main
from wsa.errors import ConfigError
from wsa.pipeline import AnalyzeConfig, run_analysis
from wsa.synthetic import synth_collection

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 12, 16),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 24, 24),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", 24, 24),
]
FAST = {"manifold": {"methods": ["pca"]}, "probes": {"n_shuffles": 5, "n_bootstrap": 50}}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("analyze")
    synth_collection(
        root / "loras", 120, seed=4, modules=MODULES, n_factors=6, noise=0.01, a_jitter=0.001, progress=False
    )
    config = AnalyzeConfig(n_components=40, labels=str(root / "loras" / "attributes.csv"), analyzer_params=FAST)
    run_analysis([root / "loras"], root / "report", config, progress=False)
    return root, root / "report"


def test_report_files(analysed: tuple[Path, Path]) -> None:
    _, report = analysed
    for name in ("index.html", "results.json", "space/space.json", "space/space.safetensors", "space/directions.json"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    # Without --decode every analyzer runs except those that decode images (gallery).
    # The collection section (family, formats, left-out files) comes first.
    expected = ["collection"] + [n for n in available_analyzers() if not get_analyzer(n).requires_decoder]
    assert [r["analyzer"] for r in results["results"]] == expected and "gallery" not in expected
    run = results["run"]
    assert run["headline"]["adapters"] == 120
    assert run["store"]["fingerprint"]
    assert set(run["versions"]) >= {"wsa", "torch", "numpy", "scikit-learn"}


def test_pca_numbers_match_sklearn(analysed: tuple[Path, Path]) -> None:
    _, report = analysed
    results = {r["analyzer"]: r for r in json.loads((report / "results.json").read_text())["results"]}
    store = wsa.open_store(report / "store")
    reference = SkPCA(n_components=40, svd_solver="full").fit(np.asarray(store.matrix, dtype=np.float64))
    np.testing.assert_allclose(
        results["pca"]["data"]["explained_variance_ratio"], reference.explained_variance_ratio_, rtol=1e-3, atol=1e-7
    )
    cumulative = np.cumsum(reference.explained_variance_ratio_)
    for frac in (0.9, 0.95, 0.99):
        expected = int(np.searchsorted(cumulative, frac) + 1) if cumulative[-1] >= frac else None
        assert results["pca"]["data"]["pcs_needed"][f"{int(frac * 100)}%"] == expected


def test_heldout_errors_recomputed_independently(analysed: tuple[Path, Path]) -> None:
    _, report = analysed
    pca = next(r for r in json.loads((report / "results.json").read_text())["results"] if r["analyzer"] == "pca")
    held = pca["data"]["heldout"]
    store = wsa.open_store(report / "store")
    x = np.asarray(store.matrix, dtype=np.float64)
    test = np.array([store.ids.index(i) for i in held["heldout_ids"]])
    train = np.setdiff1d(np.arange(len(store)), test)
    for k, reported in zip(held["k"], held["heldout_error"], strict=True):
        model = SkPCA(n_components=k, svd_solver="full").fit(x[train])
        centered = x[test] - model.mean_
        resid = centered - model.inverse_transform(model.transform(x[test])) + model.mean_
        expected = np.mean(np.sum(resid**2, axis=1) / np.sum(centered**2, axis=1))
        assert reported == pytest.approx(expected, rel=1e-3, abs=1e-5)
    # planted: 6 factors + unstructured noise -> held-out error falls until k ~ 6, then noise PCs do not help
    errors = dict(zip(held["k"], held["heldout_error"], strict=True))
    after = [v for k, v in errors.items() if k >= 6]
    assert after[0] < 0.5 * errors[1]
    assert max(after) - min(after) < 0.05


def test_probes_find_planted_attributes_and_baseline_is_chance(analysed: tuple[Path, Path]) -> None:
    _, report = analysed
    probes = next(r for r in json.loads((report / "results.json").read_text())["results"] if r["analyzer"] == "probes")
    by_name = {m["name"]: m for m in probes["metrics"]}
    for attr in ("attr_0", "attr_1", "attr_2"):
        metric = next(m for name, m in by_name.items() if name.startswith(attr))
        assert metric["value"] > 0.85
        assert abs(metric["chance"] - 0.5) < 0.12
    for attr in ("score_3", "score_4", "score_5"):
        metric = next(m for name, m in by_name.items() if name.startswith(attr))
        assert metric["value"] > 0.7


def test_html_escapes_hostile_ids(tmp_path: Path) -> None:
    synth_collection(tmp_path / "loras", 8, modules=MODULES[:2], n_factors=2, progress=False)
    (tmp_path / "loras" / "id_0").rename(tmp_path / "loras" / "<script>alert(1)<")
    config = AnalyzeConfig(n_components=4, analyzers=["pca", "outliers"])
    index = run_analysis([tmp_path / "loras"], tmp_path / "report", config, progress=False)
    html = index.read_text()
    assert "<script>alert(1)<" not in html
    assert "&lt;script&gt;alert(1)&lt;" in html


def test_config_errors_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown analyzer 'pcaa'; did you mean 'pca'"):
        run_analysis([tmp_path], tmp_path / "r", AnalyzeConfig(analyzers=["pcaa"]), progress=False)
    with pytest.raises(ConfigError, match="has no parameter 'cvv'"):
        run_analysis([tmp_path], tmp_path / "r", AnalyzeConfig(analyzer_params={"probes": {"cvv": 3}}), progress=False)
    bad = tmp_path / "a.toml"
    bad.write_text("[analyze]\nn_componentz = 3\n")
    code = CliRunner().invoke(main, ["analyze", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "r")])
    assert code.exit_code == 1
    assert "n_componentz" in code.stderr


def test_cli_with_toml_config(tmp_path: Path) -> None:
    synth_collection(tmp_path / "loras", 12, modules=MODULES[:2], n_factors=2, progress=False)
    (tmp_path / "a.toml").write_text(
        '[analyze]\nn_components = 5\nanalyzers = ["pca", "layers"]\n[pca]\nheldout_fraction = 0.25\n'
    )
    result = CliRunner().invoke(
        main,
        ["analyze", str(tmp_path / "loras"), "--config", str(tmp_path / "a.toml"), "--out", str(tmp_path / "r"), "-q"],
    )
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["analyzer"] for r in run["results"]] == ["collection", "pca", "layers"]
    assert run["run"]["config"]["analyzer_params"]["pca"]["heldout_fraction"] == 0.25
    assert run["run"]["command"][:2] == ["wsa", "analyze"]


def test_every_analyzer_follows_the_contract() -> None:
    for name in available_analyzers():
        cls = get_analyzer(name)
        analyzer = cls()
        assert cls.name == name
        assert cls.title
        params = analyzer.get_params()
        assert cls().set_params(**params).get_params() == params  # params stored unchanged
        with pytest.raises(wsa.WsaError, match="not fitted"):
            analyzer.result()


def test_space_delta_fits_delta_pca_from_factors_without_forming_delta(tmp_path: Path) -> None:
    """`--space delta` never materialises ΔW: the store holds canonical factors, and the spectrum, per-model
    errors and held-out test equal those of PCA on the materialised ΔW (a `--repr delta` store)."""
    from wsa.space import fit_space, heldout_reconstruction

    synth_collection(tmp_path / "loras", 40, seed=2, modules=MODULES, n_factors=4, a_jitter=0.3, progress=False)
    # A gauge twin of one adapter: B·2 and A/2 give other factors but the same ΔW.
    import shutil

    from safetensors.torch import load_file, save_file

    original = sorted(p for p in (tmp_path / "loras").iterdir() if p.is_dir())[3]
    twin = tmp_path / "loras" / f"{original.name}_twin"
    shutil.copytree(original, twin)
    weights = twin / "unet" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * (2.0 if "lora_B" in k else 0.5) for k, v in tensors.items()}, str(weights))
    labels = str(tmp_path / "loras" / "attributes.csv")
    config = AnalyzeConfig(n_components=10, space="delta", labels=labels, analyzer_params=FAST)
    run_analysis([tmp_path / "loras"], tmp_path / "report", config, progress=False)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    store = wsa.open_store(tmp_path / "report" / "store")
    raw = wsa.ingest([tmp_path / "loras"], tmp_path / "raw", progress=False)
    assert store.repr == "canonical" and store.n_features == raw.n_features  # factors, not ΔW
    delta = wsa.ingest([tmp_path / "loras"], tmp_path / "delta", repr="delta", progress=False)
    ref = fit_space(delta, 10, solver="exact", progress=False)
    pca = next(r for r in results["results"] if r["analyzer"] == "pca")["data"]
    np.testing.assert_allclose(pca["explained_variance_ratio"], ref.explained_variance_ratio, rtol=1e-4, atol=1e-7)
    ks = pca["heldout"]["k"]
    held = heldout_reconstruction(delta, ks, test_fraction=0.2, random_state=0, solver="exact", progress=False)
    np.testing.assert_allclose(pca["heldout"]["heldout_error"], held["heldout_error"], atol=1e-4)
    ran = {r["analyzer"] for r in results["results"]}
    assert {"pca", "probes", "manifold", "sampling", "outliers", "interpolation", "layers"} <= ran
    # Residuals along the straight ΔW line between two members, against the materialised ΔW.
    interp = next(r for r in results["results"] if r["analyzer"] == "interpolation")["data"]
    (a, b), got = interp["pairs"][0], np.asarray(interp["residual_norms"][0])
    rows = {rid: i for i, rid in enumerate(delta.ids)}
    t = np.linspace(0.0, 1.0, len(got))[:, None]
    x = (1 - t) * delta.matrix[rows[a]].astype(np.float64) + t * delta.matrix[rows[b]].astype(np.float64)
    back = ref.inverse_transform(ref.transform(x.astype(np.float32)))
    np.testing.assert_allclose(got, np.linalg.norm(x - back, axis=1), rtol=2e-3, atol=1e-4 * np.abs(x).max())
    outliers = next(r for r in results["results"] if r["analyzer"] == "outliers")
    pairs = {(d["id_a"], d["id_b"]): d["cosine"] for d in outliers["data"]["duplicates"]}
    assert pairs.get((original.name, twin.name), 0) > 0.99999  # gauge twins are duplicates in ΔW space
    # Per-module measures of ΔW from the factors equal those on the materialised ΔW store.
    layers_cfg = AnalyzeConfig(n_components=10, analyzers=["layers"], labels=labels)
    run_analysis([tmp_path / "delta"], tmp_path / "r2", layers_cfg, progress=False)
    explicit = next(
        r for r in json.loads((tmp_path / "r2" / "results.json").read_text())["results"] if r["analyzer"] == "layers"
    )["data"]["modules"]
    dual = next(r for r in results["results"] if r["analyzer"] == "layers")["data"]["modules"]
    assert dual["module"] == explicit["module"]
    for key in ("variance", "mean_norm", "effective_rank"):
        np.testing.assert_allclose(dual[key], explicit[key], rtol=1e-4)
    from wsa.workspace import Workspace

    ws = Workspace.open(tmp_path / "report")  # wsa sample/edit/... open the ΔW space like the explicit one
    assert ws.space.geometry == "delta" and ws.points.n_sources == len(ws.space.ids)
    # --repr names only the storage: a dense-ΔW store is the ΔW space already (explicit components).
    dense = AnalyzeConfig(n_components=10, space="delta", repr="delta", analyzers=["pca"])
    run_analysis([tmp_path / "loras"], tmp_path / "r4", dense, progress=False)
    assert wsa.open_store(tmp_path / "r4" / "store").repr == "delta"
    pca4 = json.loads((tmp_path / "r4" / "results.json").read_text())["results"][1]["data"]
    np.testing.assert_allclose(pca4["explained_variance_ratio"], ref.explained_variance_ratio, rtol=1e-4, atol=1e-7)


def test_run_order_follows_requires_not_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """An analyzer that reads another's artifacts runs after it, wherever it is listed; cycles are refused."""
    from wsa.analyses import Analyzer, run_order

    assert run_order(["gallery", "sampling", "probes", "pca"]) == ["pca", "probes", "sampling", "gallery"]
    assert run_order(["interpolation", "probes"]) == ["probes", "interpolation"]
    assert run_order(["sampling"]) == ["sampling"]  # what it requires is optional: absent, it runs alone

    class A(Analyzer):
        name, requires = "cycle_a", ("cycle_b",)

    class B(Analyzer):
        name, requires = "cycle_b", ("cycle_a",)

    import wsa.analyses as analyses

    monkeypatch.setattr(analyses.ANALYZERS, "_entries", {**analyses.ANALYZERS._entries, "cycle_a": A, "cycle_b": B})
    with pytest.raises(ConfigError, match="cycle"):
        run_order(["cycle_a", "cycle_b"])


def test_space_option_in_a_config_file_is_checked(tmp_path: Path) -> None:
    from wsa.pipeline import load_config

    good = tmp_path / "good.toml"
    good.write_text('[analyze]\nspace = "delta"\n')
    assert load_config(good).space == "delta" and load_config(good).repr == "auto"
    bad = tmp_path / "bad.toml"
    bad.write_text('[analyze]\nspace = "canonical"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value).startswith(str(bad)) and "explicit, delta" in str(info.value), str(info.value)
