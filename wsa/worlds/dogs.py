"""``dogs``: side-view cartoon dogs, a family of a different kind from faces.

Why a second family: an analysis that only works on faces may be exploiting something face-specific
(frontal symmetry, one dominant skin region). Dogs are seen from the side, articulated (legs, tail,
head on a neck), change silhouette with pose (sitting/standing, facing left/right), and their identity
lives as much in proportions (body and leg length) as in colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from wsa.worlds import register_family
from wsa.worlds.family import AttributeSpec, Family, NuisanceSpec

if TYPE_CHECKING:
    import torch

COAT_COLOURS = {
    "black": (0.17, 0.15, 0.14),
    "brown": (0.52, 0.30, 0.14),
    "golden": (0.90, 0.68, 0.30),
    "white": (0.88, 0.87, 0.84),
    "grey": (0.56, 0.57, 0.61),
}
EAR_SHAPES = ("pointy", "floppy", "round")
BACKGROUNDS = {
    "blue": (0.42, 0.60, 0.92),
    "green": (0.45, 0.78, 0.45),
    "purple": (0.66, 0.52, 0.86),
    "red": (0.92, 0.45, 0.42),
    "teal": (0.35, 0.75, 0.75),
}
POSES = ("standing", "sitting")
FACINGS = ("right", "left")
COLLAR = (0.85, 0.08, 0.12)
TAG = (1.00, 0.80, 0.05)
DARK = (0.06, 0.05, 0.05)
EYE_WHITE = (0.97, 0.97, 0.95)
SPOTS_ON_LIGHT, SPOTS_ON_DARK = (0.12, 0.10, 0.08), (0.95, 0.93, 0.88)
# Spots: (position along the body axis from rear to front, offset across it, radius).
SPOTS = ((0.2, -0.05, 0.075), (0.55, 0.05, 0.07), (0.85, -0.07, 0.06))
BODY_R, LEG_R, HEAD_R = 0.15, 0.055, 0.14
SIT_ANGLE = 0.8  # radians the body tilts up when sitting
FRAME_SCALE, FRAME_SHIFT = 1.3, (0.09, -0.1)  # dog frame -> image: fill the image, centred


def coat_colour(index: np.ndarray, tone: np.ndarray) -> np.ndarray:
    """Coat RGB (B, 3): the colour class shifted lighter/darker by ``tone`` in [0, 1] (±0.15)."""
    base = np.asarray(list(COAT_COLOURS.values()), dtype=np.float64)[index]
    return np.clip(base + (np.asarray(tone, dtype=np.float64)[:, None] - 0.5) * 0.3, 0.0, 1.0)


@register_family("dogs")
class Dogs(Family):
    """Dogs with a body, four legs, neck, head, snout, ears, tail and optional spots and collar."""

    title = "Dogs"
    noun = "dog"
    prompt_template = "a {noun}, {pose}, on {background}"
    attributes = (
        AttributeSpec("spots", "binary", (0, 1), "three patches on the body and one on the head, in a contrast colour"),
        AttributeSpec("collar", "binary", (0, 1), "red collar with a gold tag"),
        AttributeSpec("tail_up", "binary", (0, 1), "tail raised (1) or hanging (0)"),
        AttributeSpec("body_length", "continuous", (0.8, 1.2), "body length, relative"),
        AttributeSpec("leg_length", "continuous", (0.7, 1.3), "leg length, relative"),
        AttributeSpec("snout_length", "continuous", (0.6, 1.4), "snout length, relative"),
        AttributeSpec("fur_tone", "continuous", (0.0, 1.0), "0 darker to 1 lighter shade of the coat colour"),
        AttributeSpec("coat_colour", "categorical", tuple(COAT_COLOURS), "base coat colour"),
        AttributeSpec("ear_shape", "categorical", EAR_SHAPES, "pointy (upright), floppy (hanging) or round"),
    )
    nuisances = (
        NuisanceSpec("x_offset", (-0.08, 0.08), "continuous", False),
        NuisanceSpec("y_offset", (-0.05, 0.05), "continuous", False),
        NuisanceSpec("scale", (0.85, 1.0), "continuous", False),
        NuisanceSpec("facing", FACINGS, "categorical", False),
        NuisanceSpec("pose", POSES, "categorical", True),
        NuisanceSpec("background", tuple(BACKGROUNDS), "categorical", True),
        NuisanceSpec("brightness", (0.85, 1.1), "continuous", False),
        NuisanceSpec("light_direction", (-1.0, 1.0), "continuous", False),  # -1 lit from the left, +1 right
    )
    neutral_values: ClassVar[dict[str, float]] = {"scale": 1.0, "brightness": 1.0}

    def _draw(self, attrs: dict[str, np.ndarray], nuisance: dict[str, np.ndarray], size: int) -> torch.Tensor:
        from wsa.worlds import sdf

        p, c = sdf.param, sdf.colours
        gx, gy = sdf.grid(size)
        n = len(attrs["spots"])
        scale = p(nuisance["scale"] * FRAME_SCALE)
        facing = np.where(nuisance["facing"] == 0, 1.0, -1.0)
        x, y = sdf.to_local(gx, gy, p(nuisance["x_offset"]), p(nuisance["y_offset"]), 1.0, 0.0, scale)
        # Mirror (the dog faces +x in its own frame), then centre the figure: its frame spans about
        # x in [-0.6, 0.8] and y in [-0.8, 0.6] at the extremes of the attributes.
        x = x * p(facing) + FRAME_SHIFT[0]
        y = y + FRAME_SHIFT[1]
        pix = sdf.pixel_width(size) / scale

        def cover(d: torch.Tensor, flag: np.ndarray | None = None) -> torch.Tensor:
            a = sdf.coverage(d, pix)
            return a if flag is None else a.mul_(p(flag))

        # Skeleton, per image in NumPy (B,): rear and front centres of the body capsule (A, B),
        # ground line, head centre.
        sit = nuisance["pose"] == 1
        half = 0.36 * attrs["body_length"]
        leg = 0.3 * attrs["leg_length"]
        ground = BODY_R + leg
        span = 2 * (half - BODY_R)
        ax_ = np.where(sit, -half + BODY_R + 0.08, -half + BODY_R)
        ay_ = np.where(sit, ground - BODY_R - 0.03, 0.0)
        bx_ = np.where(sit, ax_ + span * np.cos(SIT_ANGLE), half - BODY_R)
        by_ = np.where(sit, ay_ - span * np.sin(SIT_ANGLE), 0.0)
        hx_, hy_ = bx_ + 0.1, by_ - 0.26
        Ax, Ay, Bx, By, Hx, Hy = (p(v) for v in (ax_, ay_, bx_, by_, hx_, hy_))
        foot = p(ground - LEG_R)

        coat = coat_colour(attrs["coat_colour"].astype(int), attrs["fur_tone"])
        light = 0.299 * coat[:, 0] + 0.587 * coat[:, 1] + 0.114 * coat[:, 2]
        spot_colour = np.where(light[:, None] > 0.4, SPOTS_ON_LIGHT, SPOTS_ON_DARK)
        # Ears in a shade that reads against the head: darker on light coats, lighter on dark ones.
        ear_colour = np.where(light[:, None] > 0.3, coat * 0.72, coat * 0.6 + 0.22)
        image = sdf.canvas(c(np.asarray(list(BACKGROUNDS.values()))[nuisance["background"].astype(int)]), size)

        # Shadow on the ground.
        sdf.paint(image, c(DARK), cover(sdf.ellipse(x, y, 0.0, foot + LEG_R, p(half + 0.15), 0.045), 0.25 * np.ones(n)))

        # Tail (behind the body): from the top of the rump, up or down.
        tail_up = attrs["tail_up"]
        t0x, t0y = ax_ - 0.11, ay_ - 0.07
        t1x = t0x + np.where(tail_up > 0.5, -0.1, -0.2)
        t1y = t0y + np.where(tail_up > 0.5, -0.24, 0.14)
        tail = sdf.capsule(x, y, p(t0x), p(t0y), p(t1x), p(t1y), 0.04)
        sdf.paint(image, c(coat * 0.9), cover(tail))

        # Far legs (darker, behind the body); sitting folds the hind leg into a foot on the ground.
        hind = (
            np.where(sit, ax_ + 0.05, ax_),
            np.where(sit, ground - LEG_R, ay_),
            np.where(sit, ax_ + 0.2, ax_),
        )
        far = sdf.union(
            sdf.capsule(x, y, p(hind[0] - 0.06), p(hind[1]), p(hind[2] - 0.06), foot, LEG_R),
            sdf.capsule(x, y, Bx - 0.05, By, Bx - 0.05, foot, LEG_R),
        )
        sdf.paint(image, c(coat * 0.7), cover(far))

        # Body (with a haunch when sitting), neck and head as one smooth silhouette.
        haunch = p(np.where(sit, 0.18, BODY_R))
        body = sdf.union(sdf.capsule(x, y, Ax, Ay, Bx, By, BODY_R), sdf.circle(x, y, Ax + 0.02, Ay, haunch))
        head = sdf.circle(x, y, Hx, Hy, HEAD_R)
        silhouette = sdf.smooth_union(sdf.smooth_union(body, sdf.capsule(x, y, Bx, By, Hx, Hy, 0.09), 0.05), head, 0.04)
        snout_tip = hx_ + 0.08 + 0.16 * attrs["snout_length"]
        snout = sdf.capsule(x, y, Hx + 0.02, Hy + 0.04, p(snout_tip), Hy + 0.06, 0.07)
        silhouette = sdf.smooth_union(silhouette, snout, 0.03)
        sdf.paint(image, c(coat), cover(silhouette))

        # Near legs.
        near = sdf.union(
            sdf.capsule(x, y, p(hind[0] + 0.02), p(hind[1]), p(hind[2] + 0.02), foot, LEG_R),
            sdf.capsule(x, y, Bx + 0.03, By, Bx + 0.03, foot, LEG_R),
        )
        sdf.paint(image, c(coat * 0.95), cover(near))

        # Spots: patches clipped to the body, plus one on the head.
        dx, dy = bx_ - ax_, by_ - ay_
        norm = np.hypot(dx, dy)
        nx, ny = -dy / norm, dx / norm  # unit normal of the body axis (pointing down when standing)
        spots = sdf.intersect(sdf.circle(x, y, Hx - 0.03, Hy - 0.04, 0.055), head)
        for t, off, r in SPOTS:
            centre_x, centre_y = ax_ + t * dx + off * nx, ay_ + t * dy + off * ny
            spots = sdf.union(spots, sdf.intersect(sdf.circle(x, y, p(centre_x), p(centre_y), r), body))
        sdf.paint(image, c(spot_colour), cover(spots, attrs["spots"]))

        # Ears: one distance field per shape, chosen per image.
        import torch

        ear_shape = p(attrs["ear_shape"])
        pointy = sdf.triangle(x, y, (Hx - 0.11, Hy - 0.07), (Hx + 0.03, Hy - 0.11), (Hx - 0.07, Hy - 0.34)) - 0.01
        floppy = sdf.capsule(x, y, Hx - 0.05, Hy - 0.08, Hx - 0.11, Hy + 0.13, 0.065)
        round_ = sdf.circle(x, y, Hx - 0.05, Hy - 0.13, 0.09)
        ears = torch.where(ear_shape < 0.5, pointy, torch.where(ear_shape < 1.5, floppy, round_))
        sdf.paint(image, c(ear_colour), cover(ears))

        # Eye (white with a dark pupil, so it shows on black coats too), nose.
        sdf.paint(image, c(EYE_WHITE), cover(sdf.circle(x, y, Hx + 0.05, Hy - 0.04, 0.042)))
        sdf.paint(image, c(DARK), cover(sdf.circle(x, y, Hx + 0.06, Hy - 0.04, 0.026)))
        sdf.paint(image, c(DARK), cover(sdf.circle(x, y, p(snout_tip + 0.04), Hy + 0.04, 0.045)))

        # Collar across the neck, with a tag below it.
        collar = attrs["collar"]
        mx, my = bx_ + 0.4 * (hx_ - bx_), by_ + 0.4 * (hy_ - by_)
        ux, uy = hx_ - bx_, hy_ - by_
        ulen = np.hypot(ux, uy)
        px_, py_ = -uy / ulen * 0.12, ux / ulen * 0.12  # across the neck
        band = sdf.capsule(x, y, p(mx - px_), p(my - py_), p(mx + px_), p(my + py_), 0.03)
        sdf.paint(image, c(COLLAR), cover(band, collar))
        lower = np.where(py_ > 0, 1.0, -1.0)  # the end of the band nearer the ground
        tag = sdf.circle(x, y, p(mx + lower * px_ * 0.9), p(my + lower * py_ * 0.9 + 0.035), 0.03)
        sdf.paint(image, c(TAG), cover(tag, collar))

        brightness = p(nuisance["brightness"]) * (1.0 + 0.2 * p(nuisance["light_direction"]) * gx)
        return image.mul_(brightness.unsqueeze(1))
