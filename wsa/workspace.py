"""A fitted space as the applications use it: PCA + layout + directions + where the rows and the base are.

``wsa analyze`` writes ``OUT/space/`` (``space.safetensors``/``.json``, ``directions.*`` from the probes,
and ``decoding.json``: the store's path and layout, the base model and the identity prompt). The
commands ``wsa sample / edit / invert / interpolate / decode`` open that folder (or the report folder
above it) as a :class:`Workspace`, so they need nothing else on the command line.

Why keep the store's path: an edit of a collection member starts from the member's *exact* row (its
part off the k-dimensional space included), so strength 0 gives back the original adapter; without
the store (moved, deleted) the member is rebuilt from its k coefficients, and that is said. A ΔW space
(``--space delta``) needs the store: its points are combinations of the members' factors
(:class:`wsa.points.MemberPoints`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wsa.atomic import write_json
from wsa.delta_space import load_space
from wsa.errors import ConfigError, StoreError
from wsa.store.layout import Layout
from wsa.text import first_line

DECODING_JSON = "decoding.json"


def write_decoding_info(folder: str | Path, store: Any, base: str | None, prompt: str | None) -> Path:
    """Record what the applications need beside a saved space (called by ``wsa analyze``)."""
    return write_json(
        Path(folder) / DECODING_JSON,
        {
            "store": str(Path(store.path).resolve()),
            "repr": store.repr,
            "layout": store.layout.to_json(),
            "base": base,
            "prompt": prompt,
        },
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, or one StoreError line naming it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot read ({exc.strerror or exc})", path) from None
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"not valid JSON ({first_line(exc)})", path) from None
    if not isinstance(data, dict):
        raise StoreError(f"is a JSON {type(data).__name__}, expected an object", path)
    return data


@dataclass
class Workspace:
    """A saved space and everything needed to turn its points into adapters and images."""

    folder: Path
    space: Any  # a wsa.space.Space or a wsa.delta_space.DeltaSpace (the FittedSpace protocol)
    layout: Layout
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> Workspace:
        """``path``: a space folder (``space.json``) or a report folder holding ``space/``."""
        path = Path(path)
        folder = path / "space" if (path / "space" / "space.json").is_file() else path
        if not (folder / "space.json").is_file():
            raise StoreError("not a fitted space (no space.json here or in space/); run `wsa analyze` first", path)
        if not (folder / DECODING_JSON).is_file():
            load_space(folder)  # a broken space names its own problem first
            raise StoreError(
                f"space has no {DECODING_JSON} (written by `wsa analyze` since wsa 0.2); re-run wsa analyze", folder
            )
        info = _read_json_object(folder / DECODING_JSON)
        for key, ok, want in (
            ("store", lambda v: isinstance(v, str) and v and "\x00" not in v, "a path"),
            ("base", lambda v: v is None or isinstance(v, str), "a string or null"),
            ("prompt", lambda v: v is None or isinstance(v, str), "a string or null"),
            ("repr", lambda v: v is None or isinstance(v, str), "a string"),
        ):
            if (key in info and not ok(info[key])) or (key == "store" and key not in info):
                raise StoreError(
                    f"{DECODING_JSON} key {key!r} is {info.get(key)!r:.60}, expected {want}; re-run wsa analyze", folder
                )
        layout = Layout.from_json(info.get("layout"), folder / DECODING_JSON)
        space = load_space(folder)
        if space.geometry == "explicit" and layout.n_features != space.n_features:
            raise StoreError(
                f"{DECODING_JSON} layout has {layout.n_features} columns, the space {space.n_features}; "
                "re-run wsa analyze",
                folder,
            )
        return cls(folder, space, layout, info)

    # ---------------------------------------------------------------------------------------------
    @cached_property
    def store(self) -> Any | None:
        """The store the space was fitted on, or None (moved or deleted; members are then rebuilt)."""
        from wsa.store import open_store

        # The recorded path, else the report's own store/ beside space/ (a report folder moved as a whole).
        for candidate in (Path(self.info["store"]), self.folder.parent / "store"):
            try:
                store = open_store(candidate)
            except Exception:
                continue
            if store.n_features == self.layout.n_features:
                return store
        return None

    @cached_property
    def directions(self) -> dict[str, Any] | None:
        """``{"meta": directions.json, "pc": {name: (k,) unit vector}}`` or None (no labels were probed).

        Read by :meth:`wsa.directions.Directions.load` (version, checksum, every part's shape checked), and
        each PC vector must fit this space (at most its ``k`` coordinates).
        """
        from wsa.directions import JSON, TENSORS, Directions

        if not (self.folder / JSON).is_file() and not (self.folder / TENSORS).is_file():
            return None
        found = Directions.load(self.folder)
        k = self.space.n_components
        if found.meta["k"] > k:
            raise StoreError(
                f"directions have {found.meta['k']} PC coordinates, the space {k}; re-run wsa analyze", self.folder
            )
        return {"meta": dict(found.meta), "pc": found.pc}

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in self.space.ids]

    # ---------------------------------------------------------------------------------------------
    @cached_property
    def points(self) -> Any:
        """The space's points as weights (:func:`wsa.points.points_for`): one interface for either geometry."""
        from wsa.points import points_for

        return points_for(self.space, self.layout, self.store, self.notes)

    def member(self, model: str) -> tuple[np.ndarray, str]:
        """The point (1, ·) of ``model`` — a member id, or a path to an adapter file/folder — and how it was found."""
        return self.points.member(model)

    def decoder(
        self,
        base: str | None = None,
        device: str = "auto",
        steps: int = 25,
        prompt: str | None = None,
        base_config: str | None = None,
    ):
        """A :class:`~wsa.decoding.decoder.Decoder` on the base recorded for this space (or ``base``)."""
        from wsa.decoding.decoder import make_decoder, resolve_base

        reference = base or self.info.get("base")
        if reference is None:
            raise ConfigError("this space records no base model; pass --base builtin:<family> or a base folder")
        model, ref = resolve_base(reference, base_config)
        return make_decoder(model, ref, self.layout, prompt or self.info.get("prompt"), device, steps)
