"""Decoded galleries: collection members, sampled models and interpolation paths turned into pictures.

Why: a point of weight space means nothing until a base model draws with it. With ``--decode`` this
analyzer runs last and renders (i) a few collection members under several seeds beside their
reference image when the folder has one (does each adapter hold one identity?), (ii) models drawn by
the sampling analyzer (are new points plausible models?), and (iii) straight weight-space paths
between the interpolation analyzer's pairs (does the picture change smoothly?). When the base belongs
to an embedded world the family's attribute oracle reads every decoded image, so identity fidelity and
sample plausibility are numbers, measured against the base model alone (the chance level).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, Table, positive_int
from wsa.errors import ConfigError
from wsa.images import tile_images
from wsa.points import points_for


def _seeds_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, int) and s >= 0 for s in v)


@register_analyzer
class Gallery(Analyzer):
    """Decode members, samples and interpolation paths; score them with the family's oracle when there is one.

    Parameters
    ----------
    n_members : int, default=8
        Collection members shown (the first ones of the store).
    seeds : list of int, default=[0, 1, 2, 3]
        Seeds each member is drawn with (identity should persist across them).
    n_samples : int, default=16
        Sampled models decoded (from the sampling analyzer's first sampler).
    n_paths : int, default=3
        Interpolation pairs decoded (from the interpolation analyzer), one seed per strip.
    n_edit_attributes : int, default=4
        Attributes whose edit strips are drawn (binary and continuous ones first, from the probes).
    n_edit_members : int, default=2
        Members each edit strip is drawn on.
    edit_strengths : list of float, default=[-6, -3, 0, 3, 6]
        Strengths (standard deviations of the attribute's score) of a strip. Wider than ±2σ because in
        the embedded world discrete attributes flip for most identities only at +4σ to +6σ
        (docs/applications.md).
    """

    name = "gallery"
    title = "Decoded models"
    reference = "w2w §4 (sampling, identity persistence) and §5 (interpolation)"
    requires_decoder: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = (
        "sampling",
        "interpolation",
        "probes",
    )  # reads their ctx.artifacts when they ran
    _parameter_constraints: ClassVar[dict] = {
        "n_members": (positive_int, "a positive int"),
        "seeds": (_seeds_ok, "a non-empty list of non-negative ints"),
        "n_samples": (positive_int, "a positive int"),
        "n_paths": (positive_int, "a positive int"),
        "n_edit_attributes": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "n_edit_members": (positive_int, "a positive int"),
        "edit_strengths": (
            lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, (int, float)) for x in v),
            "a non-empty list of numbers",
        ),
    }

    def __init__(
        self,
        *,
        n_members: int = 8,
        seeds: list[int] | None = None,
        n_samples: int = 16,
        n_paths: int = 3,
        n_edit_attributes: int = 4,
        n_edit_members: int = 2,
        edit_strengths: list[float] | None = None,
    ) -> None:
        self.n_members = n_members
        self.seeds = seeds if seeds is not None else [0, 1, 2, 3]
        self.n_samples = n_samples
        self.n_paths = n_paths
        self.n_edit_attributes = n_edit_attributes
        self.n_edit_members = n_edit_members
        self.edit_strengths = edit_strengths if edit_strengths is not None else [-6.0, -3.0, 0.0, 3.0, 6.0]

    def fit(self, ctx: AnalysisContext) -> Gallery:
        self._validate_params()
        decoder = ctx.decoder
        if decoder is None:
            raise ConfigError("gallery needs a decoder: run `wsa analyze --decode` (and --base if it cannot be found)")
        store, space = ctx.store, ctx.space
        points = points_for(space, store.layout, store)  # rows (explicit) or member weights (ΔW): one path
        ids = [str(i) for i in space.ids][: self.n_members]
        member_points = np.vstack([points.member(i)[0] for i in ids])
        seeds = list(self.seeds)
        members = decoder.grid(points.stacks(member_points), len(ids), seeds)
        oracle = decoder.oracle()
        self.decoder_ = decoder.describe()
        self.members_ = (ids, members, seeds, [_reference(store, i) for i in ids])
        self.fidelity_ = None
        if oracle is not None and ctx.labels is not None:
            names = [a.name for a in oracle.family.attributes]
            if all(n in ctx.labels.columns for n in names):
                truth = ctx.labels.iloc[: len(ids)][names].iloc[np.repeat(np.arange(len(ids)), len(seeds))]
                base_images = decoder.images(
                    points.stacks(member_points[:1]), [-1] * len(members), list(np.tile(seeds, len(ids)))
                )
                self.fidelity_ = _fidelity(oracle, members, base_images, truth)
        self.samples_ = None
        sampling = ctx.artifacts.get("sampling")
        if sampling:
            kind = next(iter(sampling["samples"]))
            z = np.asarray(sampling["samples"][kind][: self.n_samples], dtype=np.float64)
            images = decoder.images(
                points.stacks(points.from_coefficients(z)), list(range(len(z))), [seeds[0]] * len(z)
            )
            confidence = None
            if oracle is not None:
                confidence = {
                    "samples": float(oracle.confidence(images).mean()),
                    "members": float(oracle.confidence(members).mean()),
                }
                self.sample_reads_ = oracle.predict(images)
            self.samples_ = (kind, images, confidence)
        self.paths_ = None
        interpolation = ctx.artifacts.get("interpolation")
        if interpolation and interpolation.get("pairs"):
            pairs = list(interpolation["pairs"])[: self.n_paths]
            t = np.asarray(interpolation["t"], dtype=np.float64)
            line = []
            for a, b in pairs:  # the exact straight line between the two members' weights
                pa, pb = points.member(a)[0], points.member(b)[0]
                line.append(pa + t[:, None] * (pb - pa))
            flat = np.vstack(line)
            images = decoder.images(points.stacks(flat), list(range(len(flat))), [seeds[0]] * len(flat))
            self.paths_ = (pairs, t, images)
        self.edits_ = self._edits(ctx, decoder, points, ids, member_points, seeds[0])
        return self

    def _edits(
        self, ctx: AnalysisContext, decoder: Any, points: Any, ids: list[str], member_points: np.ndarray, seed: int
    ) -> Any:
        """Strips (members × strengths) per attribute along the probes' directions, one seed."""
        probes = ctx.artifacts.get("probes")
        if not probes or self.n_edit_attributes == 0:
            return None
        kinds = probes["kinds"]
        names = [d for d in probes["directions_pc"] if kinds.get(probes["direction_attribute"][d]) != "categorical"]
        names += [d for d in probes["directions_pc"] if d not in names]
        names = names[: self.n_edit_attributes]
        members = member_points[: self.n_edit_members]
        strengths = np.asarray(self.edit_strengths, dtype=np.float64)
        strips, all_points = [], []
        for name in names:
            vector = np.asarray(probes["directions_pc"][name], dtype=np.float64)
            steps = strengths[:, None] * (vector * float(probes["score_std"][name]))[None]
            for i in range(len(members)):
                strips.append((name, ids[i]))
                all_points.append(points.step(np.repeat(members[i][None], len(steps), axis=0), steps))
        flat = np.vstack(all_points)
        images = decoder.images(points.stacks(flat), list(range(len(flat))), [seed] * len(flat))
        return strips, strengths.tolist(), images

    def result(self) -> Result:
        self._check_is_fitted()
        ids, members, seeds, references = self.members_
        figures = [_members_figure(ids, members, seeds, references)]
        metrics, tables, notes = [], [], []
        data: dict[str, Any] = {"decoder": self.decoder_, "members": ids, "seeds": seeds}
        if self.fidelity_ is not None:
            frame, lora, chance = self.fidelity_
            metrics.append(Metric("oracle agreement, members (mean accuracy)", lora, True, chance=chance))
            tables.append(
                Table.from_frame(
                    "fidelity",
                    "The attribute oracle's reading of each member's decoded images against the member's labels "
                    "('lora'), and of the base model's images under the same prompts and seeds ('base_model': the "
                    "chance level). Accuracy for binary/categorical attributes, R² for continuous ones.",
                    frame,
                )
            )
            data["fidelity"] = frame.to_dict(orient="records")
        if self.samples_ is not None:
            kind, images, confidence = self.samples_
            figures.append(
                Figure.from_matplotlib(
                    "samples",
                    f"Models drawn by the {kind} Gaussian sampler, one image each (seed {seeds[0]}). "
                    "Look for plausible members of the family, varied among themselves — "
                    "not copies of one another or smudges.",
                    _tile_figure(tile_images(images, min(8, len(images))), None, None),
                )
            )
            if confidence is not None:
                metrics.append(Metric("oracle confidence, sampled models", confidence["samples"], True, chance=None))
                metrics.append(Metric("oracle confidence, members", confidence["members"], True))
                data["confidence"] = confidence
                tables.append(
                    Table.from_frame(
                        "sample_attributes",
                        "Attributes the oracle reads from each sampled model's image.",
                        self.sample_reads_.assign(sample=np.arange(len(self.sample_reads_)))[
                            ["sample", *self.sample_reads_.columns]
                        ],
                    )
                )
        if self.paths_ is not None:
            pairs, t, images = self.paths_
            labels = [f"{a} → {b}" for a, b in pairs]
            figures.append(
                Figure.from_matplotlib(
                    "paths",
                    "Straight lines in weight space between pairs of members (left: first, right: second), one seed. "
                    "Look for a gradual change of attributes; abrupt jumps or broken images in the middle mean the "
                    "space between models is not populated by valid models.",
                    _tile_figure(tile_images(images, len(t)), labels, [f"{x:.2f}" for x in t]),
                )
            )
            data["paths"] = [list(p) for p in pairs]
        if getattr(self, "edits_", None) is not None:
            strips, strengths, images = self.edits_
            figures.append(
                Figure.from_matplotlib(
                    "edits",
                    "Each row: one member edited along one attribute's direction (the probes' least-squares "
                    "direction, as w2w) by the strengths on top, in standard deviations of the attribute's score "
                    "across the collection; the middle column is the member itself. Look for the attribute "
                    "alone changing, and the identity staying.",
                    _tile_figure(
                        tile_images(images, len(strengths)),
                        [f"{name}: {member}" for name, member in strips],
                        [f"{x:+g}σ" for x in strengths],
                    ),
                )
            )
            data["edits"] = {"strips": [list(s) for s in strips], "strengths": strengths}
        notes.append(
            f"Decoded on {self.decoder_['base']} with prompt {self.decoder_['prompt']!r}, "
            f"{self.decoder_['steps']} DDIM steps, guidance {self.decoder_['guidance']:g}, "
            f"on {self.decoder_['device']}."
        )
        summary = f"{len(ids)} members × {len(seeds)} seeds decoded"
        if self.fidelity_ is not None:
            summary += (
                f"; the oracle agrees with members' labels {self.fidelity_[1]:.0%} (base model alone: "
                f"{self.fidelity_[2]:.0%})"
            )
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary + ".",
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(notes),
            data=data,
            params=self.get_params(),
        )


def _reference(store: Any, identity: str) -> torch.Tensor | None:
    """The member's ``reference.png`` (as written by ``wsa world zoo``), if its folder has one."""
    from PIL import Image

    try:
        source = Path(store.rows[store.index(identity)].get("source", ""))
    except Exception:
        return None
    for path in (source / "reference.png", source.with_suffix(".png")):
        if path.is_file():
            array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1)
    return None


def _fidelity(
    oracle: Any, lora: torch.Tensor, base: torch.Tensor, truth: pd.DataFrame
) -> tuple[pd.DataFrame, float, float]:
    from wsa.worlds.oracle import agreement

    family = oracle.family
    ours = agreement(oracle.predict(lora), truth.reset_index(drop=True), family)
    chance = agreement(oracle.predict(base), truth.reset_index(drop=True), family)
    rows = []
    for spec in family.attributes:
        key = "r2" if spec.kind == "continuous" else "accuracy"
        rows.append(
            {
                "attribute": spec.name,
                "kind": spec.kind,
                "measure": key,
                "lora": ours[spec.name][key],
                "base_model": chance[spec.name][key],
            }
        )
    frame = pd.DataFrame(rows)
    acc = frame[frame.measure == "accuracy"]
    return frame, float(acc.lora.mean()), float(acc.base_model.mean())


def _members_figure(ids, members, seeds, references) -> Figure:
    import torch.nn.functional as F

    size = members.shape[-1]
    columns = len(seeds)
    has_ref = any(r is not None for r in references)
    tiles = []
    for i in range(len(ids)):
        if has_ref:
            ref = references[i]
            tiles.append(
                torch.ones(3, size, size)
                if ref is None
                else F.interpolate(ref[None], size=(size, size), mode="area")[0]
            )
        tiles.extend(members[i * columns : (i + 1) * columns])
    grid = tile_images(torch.stack(tiles), columns + int(has_ref))
    xlabels = (["reference"] if has_ref else []) + [f"seed {s}" for s in seeds]
    caption = (
        "Each row is one adapter of the collection drawn under several seeds"
        + (" beside its reference image" if has_ref else "")
        + ". Look for one identity per row: the same attributes in every column, only pose/lighting varying."
    )
    return Figure.from_matplotlib("members", caption, _tile_figure(grid, ids, xlabels))


def _tile_figure(grid: np.ndarray, ylabels, xlabels) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid.shape[:2]
    scale = 2.2 / 32
    fig, ax = plt.subplots(figsize=(max(3.0, w * scale / 1.0 * 0.5), max(2.0, h * scale * 0.5)))
    ax.imshow(grid, interpolation="nearest")
    rows = len(ylabels) if ylabels else 0
    cols = len(xlabels) if xlabels else 0
    if rows:
        tile_h = h / rows
        ax.set_yticks([tile_h * (i + 0.5) for i in range(rows)], [str(v) for v in ylabels], fontsize=7)
    else:
        ax.set_yticks([])
    if cols:
        tile_w = w / cols
        ax.set_xticks([tile_w * (i + 0.5) for i in range(cols)], [str(v) for v in xlabels], fontsize=7)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig
