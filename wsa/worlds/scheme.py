"""The embedded world's base scheme for decoding: ``builtin:<family>`` and folders with ``model.json``.

Registered with ``wsa.decoding`` through the ``wsa.base_schemes`` entry point, so the decoder finds the
world's bases, oracles and neutral prompts without importing the world (which sits above it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsa.decoding.schemes import BaseScheme


def _claims(reference: str) -> bool:
    return reference.startswith("builtin:") or (Path(reference) / "model.json").is_file()


def _load(reference: str, config: Any) -> Any:
    from wsa.worlds import builtin_base
    from wsa.worlds.model import BaseModel

    if reference.startswith("builtin:"):
        return BaseModel.load(builtin_base(reference.split(":", 1)[1]))
    return BaseModel.load(Path(reference))


def _oracle(family: str) -> Any:
    from wsa.worlds.oracle import builtin_oracle

    return builtin_oracle(family)


def _prompt(family: str) -> str:
    from wsa.worlds import get_family
    from wsa.worlds.family import IDENTITY_TOKEN

    fam = get_family(family)
    return fam.prompt(fam.neutral_nuisance().iloc[0], token=IDENTITY_TOKEN)


SCHEME = BaseScheme("world", _claims, _load, _oracle, _prompt)
