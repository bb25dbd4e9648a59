"""Base schemes (``wsa.decoding.schemes``): the world's bases come through the entry point, others can register."""

from __future__ import annotations

import pytest

from wsa.decoding.decoder import resolve_base
from wsa.decoding.schemes import SCHEMES, BaseScheme, register_scheme, scheme_for, schemes
from wsa.errors import ConfigError


def test_the_world_and_stable_diffusion_are_registered() -> None:
    names = [s.name for s in schemes()]
    assert "world" in names and "stable_diffusion" in names
    assert scheme_for("builtin:faces").name == "world"
    assert scheme_for("/no/such/base") is None


def test_a_registered_scheme_loads_its_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SCHEMES, "_entries", dict(SCHEMES._entries))  # leave the registry as it was
    register_scheme(BaseScheme("toy", lambda ref: ref.startswith("toy:"), lambda ref, cfg: ("model", ref, cfg)))
    assert resolve_base("toy:a", config="c") == (("model", "toy:a", "c"), "toy:a")
    with pytest.raises(ConfigError, match="cannot decode on base"):
        resolve_base("nothing:here")


def test_a_broken_scheme_plugin_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsa.decoding.schemes as schemes_module

    class Broken:
        name, value = "broken", "nowhere:SCHEME"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(schemes_module, "_loaded", False)
    monkeypatch.setattr(schemes_module.importlib.metadata, "entry_points", lambda group: [Broken()])
    with pytest.raises(ConfigError, match="base scheme 'broken'") as info:
        schemes()
    assert "\n" not in str(info.value)
