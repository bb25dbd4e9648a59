"""Base schemes: who can load a base model from a reference, and what else they know about it.

A decoder needs a base model. ``resolve_base`` asks each registered :class:`BaseScheme` whether it
claims a reference (``builtin:faces``, a folder with ``model.json``, a diffusers folder …) and lets the
first that does load it; the scheme also supplies the attribute oracle and the neutral prompt of a base's
family, when it has them.

Why a registry: the embedded world's bases live in ``wsa.worlds``, above ``wsa.decoding`` in the layers;
the decoder must not import them. The world registers its scheme through the ``wsa.base_schemes`` entry
point (``pyproject.toml``), which is also how another package would add its own bases; schemes are
loaded the first time one is asked for.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsa.errors import ConfigError
from wsa.registry import Registry

ENTRY_POINT_GROUP = "wsa.base_schemes"


def _nothing(family: str) -> None:
    return None


@dataclass(frozen=True)
class BaseScheme:
    """``claims(reference)``: is this reference ours; ``load(reference, config)``: the model.

    ``oracle(family)`` and ``prompt(family)``: the family's attribute oracle and neutral identity prompt,
    or None (a user's own Stable Diffusion base has neither).
    """

    name: str
    claims: Callable[[str], bool]
    load: Callable[[str, Any], Any]
    oracle: Callable[[str], Any] = _nothing
    prompt: Callable[[str], str | None] = _nothing


SCHEMES: Registry[BaseScheme] = Registry("base scheme")
_loaded = False


def register_scheme(scheme: BaseScheme) -> BaseScheme:
    if scheme.name not in SCHEMES:
        SCHEMES.register(scheme.name)(scheme)
    return scheme


def schemes() -> list[BaseScheme]:
    """Every scheme, the entry points' first (loaded once), then those registered in code."""
    global _loaded
    if not _loaded:
        _loaded = True
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                scheme = entry.load()
            except Exception as exc:  # a broken plug-in must not break decoding on the others
                raise ConfigError(f"base scheme {entry.name!r} ({entry.value}) cannot be loaded: {exc}") from None
            if isinstance(scheme, BaseScheme):
                register_scheme(scheme)
    return [scheme for _, scheme in SCHEMES.items()]


def scheme_for(reference: str) -> BaseScheme | None:
    """The first scheme that claims ``reference``, or None."""
    return next((s for s in schemes() if s.claims(reference)), None)


def scheme_named(name: str | None) -> BaseScheme | None:
    schemes()
    return SCHEMES.get(name) if name and name in SCHEMES else None


def _claims_sd(reference: str) -> bool:
    path = Path(reference)
    return (path / "model_index.json").is_file() or (path.is_file() and path.suffix in (".safetensors", ".ckpt"))


def _load_sd(reference: str, config: Any) -> Any:
    from wsa.decoding.sd import SDBase

    return SDBase.load(Path(reference), config)


#: A user's own Stable Diffusion 1.x/2.x/XL base: a diffusers folder, or one checkpoint file with its config.
register_scheme(BaseScheme("stable_diffusion", _claims_sd, _load_sd))
