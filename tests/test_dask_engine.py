"""The Dask engine on a LocalCluster of worker processes: same store, same space (within tolerance).

Why: a cluster run must be interchangeable with a local one — an analysis fitted on a cluster is read
by the same analyzers and applications — so the store must be byte-identical and the PCA must agree
with the exact local solver to within a randomized SVD's error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import wsa
from wsa.space import fit_space, principal_angles
from wsa.synthetic import synth_collection

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dask")
    synth_collection(root / "loras", 40, progress=False)
    return root / "loras"


@pytest.fixture(scope="module")
def client():
    from wsa.dask_engine import dask_client

    with dask_client(n_workers=2) as c:
        yield c


def test_dask_ingest_writes_the_same_store(loras, tmp_path, client):
    from wsa.dask_engine import ChunkedExecutor

    local = wsa.ingest([loras], tmp_path / "local", progress=False)
    remote = wsa.ingest([loras], tmp_path / "dask", progress=False, executor=ChunkedExecutor(client, chunk=7))
    assert remote.ids == local.ids
    np.testing.assert_array_equal(np.asarray(remote.matrix), np.asarray(local.matrix))
    assert [r["sha256"] for r in remote.rows] == [r["sha256"] for r in local.rows]


@pytest.mark.parametrize("standardize", [False, True])
def test_dask_pca_matches_the_exact_local_space(loras, tmp_path, client, standardize):
    from wsa.dask_engine import fit_space_dask

    store = wsa.ingest([loras], tmp_path / "s", progress=False)
    ref = fit_space(store, 6, solver="exact", standardize=standardize, progress=False)
    got = fit_space_dask(store, 6, client=client, standardize=standardize, block_rows=9)
    assert got.config["engine"] == "dask" and got.config["workers"] == 2
    if standardize:
        # z-scoring flattens this collection's spectrum (noise columns get unit variance), so the top-6
        # subspace is ill-defined; the randomized SVD must still capture as much variance as the exact one.
        assert (got.singular_values**2).sum() >= 0.98 * (ref.singular_values**2).sum()
    else:
        assert np.degrees(principal_angles(got.components, ref.components)).max() < 0.5
        np.testing.assert_allclose(got.singular_values, ref.singular_values, rtol=1e-4)
    np.testing.assert_allclose(got.mean, ref.mean, atol=1e-6)
    np.testing.assert_allclose(got.scale, ref.scale, rtol=1e-4)
    np.testing.assert_allclose(got.coefficients, got.transform(np.asarray(store.matrix)), atol=1e-4)
    np.testing.assert_allclose(got.total_variance, ref.total_variance, rtol=1e-5)


def test_analyze_with_the_dask_engine(loras, tmp_path):
    from click.testing import CliRunner

    from wsa.cli import main

    out = tmp_path / "report"
    result = CliRunner().invoke(
        main,
        [
            "analyze",
            str(loras),
            "--analyzers",
            "pca",
            "--engine",
            "dask",
            "--n-components",
            "5",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    space = json.loads((out / "space" / "space.json").read_text())
    assert space["config"]["engine"] == "dask"
    result = CliRunner().invoke(main, ["analyze", str(loras), "--scheduler", "tcp://x:1", "--out", str(out), "-q"])
    assert result.exit_code != 0 and "engine" in result.output
