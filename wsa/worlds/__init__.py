"""Embedded worlds: concept families with known attributes, rendered to images (a miniature of w2w).

A family (``faces``, ``dogs``) samples identities (a table of exact attributes, like w2w's
``identity_df``) and nuisance settings, and renders them to images deterministically; fine-tuning one
adapter per identity then gives a weight space whose ground truth is known. A new family is one
module: subclass :class:`~wsa.worlds.family.Family`, decorate it with ``@register_family("name")``,
and import the module below.

Example
-------
>>> from wsa.worlds import get_family
>>> faces = get_family("faces")
>>> ids, views = faces.sample_identities(4, seed=0), faces.sample_nuisance(4, seed=0)
>>> faces.render(ids, views, size=32).shape
torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsa.registry import Registry
from wsa.worlds.family import IDENTITY_TOKEN, AttributeSpec, Family, NuisanceSpec

if TYPE_CHECKING:
    import torch

FAMILIES: Registry[type[Family]] = Registry("concept family")


def register_family(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: register a :class:`Family` subclass under ``name`` (sets ``cls.name``)."""
    add = FAMILIES.register(name)

    def decorate(cls: type[Family]) -> type[Family]:
        if not (isinstance(cls, type) and issubclass(cls, Family)):
            raise TypeError(f"{cls!r} is not a Family subclass")
        cls.name = name
        return add(cls)

    return decorate


def get_family(name: str) -> Family:
    """An instance of the family registered as ``name`` (unknown names list the choices)."""
    return FAMILIES.get(name)()


def available_families(pattern: str = "*") -> list[str]:
    """Registered family names, sorted (``pattern`` is a shell wildcard)."""
    return FAMILIES.names(pattern)


ASSETS = Path(__file__).parent / "assets"


def builtin_base(family: str) -> Path:
    """Folder of the base model shipped for ``family`` (``wsa/worlds/assets/<family>/base``)."""
    from wsa.errors import ConfigError

    folder = ASSETS / family / "base"
    if not (folder / "model.json").is_file():
        shipped = sorted(p.parent.name for p in ASSETS.glob("*/base/model.json"))
        raise ConfigError(f"no shipped base model for family {family!r}; shipped: {shipped}; pass --base FOLDER")
    return folder


from wsa.worlds import dogs, faces  # noqa: E402  (built-in families register themselves)

__all__ = [
    "ASSETS",
    "FAMILIES",
    "IDENTITY_TOKEN",
    "AttributeSpec",
    "Family",
    "NuisanceSpec",
    "available_families",
    "builtin_base",
    "dogs",
    "faces",
    "get_family",
    "register_family",
]
