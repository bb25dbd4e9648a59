"""The layer check (``tools/check_layers.py``, run by ``make lint``): passes on the tree, fails on an upward import."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_has_no_upward_import(checker) -> None:
    assert checker.check() == []


def test_an_upward_import_fails(checker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in checker.SOURCES:
        (tmp_path / folder).mkdir()
    (tmp_path / "wsa" / "errors.py").write_text("def f():\n    from wsa.cli import main\n")  # lazy is still upward
    (tmp_path / "wsa" / "store").mkdir()
    (tmp_path / "wsa" / "store" / "__init__.py").write_text("from ..formats import load_adapter\n")  # downward: fine
    (tmp_path / "wsa" / "store" / "x.py").write_text("from wsa import space\n")  # the geometry is above the store
    (tmp_path / "analyses" / "pca.py").write_text("from wsa.reports import html\n")
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    monkeypatch.setattr(checker, "KNOWN", {})
    problems = checker.check()
    assert any("wsa.errors imports wsa.cli" in p for p in problems), problems
    assert any("wsa.store.x imports wsa.space" in p for p in problems), problems
    assert any("wsa.analyses.pca imports wsa.reports" in p for p in problems), problems
    assert not any("wsa.store imports" in p for p in problems), problems
    assert len(problems) == 3, problems


def test_a_stale_known_entry_fails(checker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker, "KNOWN", {**checker.KNOWN, ("wsa.errors", "wsa.cli"): "gone"})
    assert any("which is gone" in p for p in checker.check())
