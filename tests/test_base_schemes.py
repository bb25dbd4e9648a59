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
