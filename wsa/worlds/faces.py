"""``faces``: cartoon heads and shoulders, the embedded analogue of weights2weights' CelebA identities.

Identity attributes mirror the kinds w2w probes (binary like beard/glasses/bald, continuous like
skin tone, categorical like hair colour), each drawn large enough to be read back from a 32×32
image. Nuisances (position, scale, head roll, expression, lighting, background) change between images
of one identity; expression and background are named in the prompt, as w2w's prompts name context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from wsa.worlds import register_family
from wsa.worlds.family import AttributeSpec, Family, NuisanceSpec

if TYPE_CHECKING:
    import torch

HAIR_COLOURS = {
    "black": (0.10, 0.08, 0.07),
    "brown": (0.42, 0.24, 0.10),
    "blond": (0.94, 0.80, 0.40),
    "red": (0.80, 0.28, 0.08),
    "grey": (0.70, 0.70, 0.72),
}
EYE_COLOURS = {"brown": (0.45, 0.24, 0.06), "blue": (0.15, 0.45, 0.95), "green": (0.12, 0.68, 0.22)}
BACKGROUNDS = {
    "blue": (0.42, 0.60, 0.92),
    "green": (0.45, 0.78, 0.45),
    "red": (0.90, 0.42, 0.40),
    "yellow": (0.96, 0.86, 0.42),
    "grey": (0.62, 0.62, 0.62),
}
EXPRESSIONS = ("neutral", "smiling", "frowning", "surprised")
# Skin ramp: light to dark, linear between knots at tone 0, 0.5, 1.
SKIN_KNOTS = np.array([[0.98, 0.85, 0.74], [0.80, 0.57, 0.40], [0.40, 0.25, 0.15]])
SHIRT = (0.22, 0.26, 0.34)
GOLD = (1.00, 0.80, 0.05)
FRAME = (0.06, 0.06, 0.08)
LENS = (0.85, 0.93, 1.00)
LIPS = (0.55, 0.10, 0.14)
SCLERA = (0.98, 0.98, 0.98)
PUPIL = (0.02, 0.02, 0.02)

# Per-expression shapes, indexed like EXPRESSIONS:
# mouth half-length, stroke radius, curvature (y = y0 - c x²; c > 0 corners up), eye half-height,
# brow inner / outer vertical shift (negative: raised).
MOUTH_HALF = np.array([0.11, 0.13, 0.12, 0.0])
MOUTH_R = np.array([0.028, 0.032, 0.03, 0.065])
MOUTH_CURVE = np.array([0.0, 3.6, -3.6, 0.0])
EYE_RY = np.array([0.07, 0.055, 0.062, 0.088])
BROW_INNER = np.array([0.0, -0.01, 0.05, -0.06])
BROW_OUTER = np.array([0.0, -0.02, -0.02, -0.06])


def skin_colour(tone: np.ndarray) -> np.ndarray:
    """RGB of skin tones in [0, 1] (shape (B,) -> (B, 3)): the ramp light -> mid -> dark."""
    tone = np.clip(np.asarray(tone, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(tone, [0.0, 0.5, 1.0], SKIN_KNOTS[:, c]) for c in range(3)], axis=1)


def _table(options: dict[str, tuple[float, float, float]], index: np.ndarray) -> np.ndarray:
    return np.asarray(list(options.values()), dtype=np.float64)[index]


@register_family("faces")
class Faces(Family):
    """Heads with hair, ears, eyes, brows, nose, mouth and optional beard, glasses and earrings."""

    title = "Faces"
    noun = "face"
    prompt_template = "a {noun}, {expression}, on {background}"
    attributes = (
        AttributeSpec("beard", "binary", (0, 1), "full beard around the jaw, in the hair colour"),
        AttributeSpec("glasses", "binary", (0, 1), "round dark frames with tinted lenses"),
        AttributeSpec("bald", "binary", (0, 1), "no hair on top (tufts above the ears stay)"),
        AttributeSpec("earrings", "binary", (0, 1), "gold studs on both ear lobes"),
        AttributeSpec("skin_tone", "continuous", (0.0, 1.0), "0 light to 1 dark along a skin ramp"),
        AttributeSpec("face_width", "continuous", (0.8, 1.2), "face half-width relative to the average"),
        AttributeSpec("eye_spacing", "continuous", (0.75, 1.25), "distance between the eyes, relative"),
        AttributeSpec("nose_length", "continuous", (0.5, 1.5), "nose length, relative"),
        AttributeSpec("hair_colour", "categorical", tuple(HAIR_COLOURS), "hair, tufts, brows and beard"),
        AttributeSpec("eye_colour", "categorical", tuple(EYE_COLOURS), "iris colour"),
    )
    nuisances = (
        NuisanceSpec("x_offset", (-0.12, 0.12), "continuous", False),
        NuisanceSpec("y_offset", (-0.08, 0.08), "continuous", False),
        NuisanceSpec("scale", (0.85, 1.0), "continuous", False),
        NuisanceSpec("rotation", (-12.0, 12.0), "continuous", False),  # head roll, degrees
        NuisanceSpec("expression", EXPRESSIONS, "categorical", True),
        NuisanceSpec("background", tuple(BACKGROUNDS), "categorical", True),
        NuisanceSpec("brightness", (0.85, 1.1), "continuous", False),
        NuisanceSpec("light_direction", (-1.0, 1.0), "continuous", False),  # -1 lit from the left, +1 right
    )
    neutral_values: ClassVar[dict[str, float]] = {"scale": 1.0, "brightness": 1.0}

    def _draw(self, attrs: dict[str, np.ndarray], nuisance: dict[str, np.ndarray], size: int) -> torch.Tensor:
        import torch

        from wsa.worlds import sdf

        p = sdf.param
        gx, gy = sdf.grid(size)
        expr = nuisance["expression"]
        angle = np.deg2rad(nuisance["rotation"])
        scale = p(nuisance["scale"])
        # Head placed slightly above centre so the shoulders fit below it.
        x, y = sdf.to_local(
            gx,
            gy,
            p(nuisance["x_offset"]),
            p(nuisance["y_offset"] - 0.1),
            p(np.cos(angle)),
            p(np.sin(angle)),
            scale,
        )
        ax = torch.abs(x)  # the face is left-right symmetric: pairs of parts cost one distance field
        pix = sdf.pixel_width(size) / scale

        def cover(d: torch.Tensor, flag: np.ndarray | None = None) -> torch.Tensor:
            a = sdf.coverage(d, pix)
            return a if flag is None else a.mul_(p(flag))

        skin = skin_colour(attrs["skin_tone"])
        hair = _table(HAIR_COLOURS, attrs["hair_colour"].astype(int))
        c = sdf.colours
        rx_np = 0.46 * attrs["face_width"]
        rx, ry = p(rx_np), 0.56
        bald = attrs["bald"]
        image = sdf.canvas(c(_table(BACKGROUNDS, nuisance["background"].astype(int))), size)

        # Shoulders and neck.
        sdf.paint(image, c(SHIRT), cover(sdf.box(x, y, 0.0, 1.08, 0.66, 0.46, 0.3)))
        sdf.paint(image, c(skin * 0.82), cover(sdf.box(x, y, 0.0, 0.55, 0.15, 0.2, 0.05)))

        # Hair behind the head (not when bald): a cap down to ear level.
        cap = sdf.intersect(sdf.ellipse(x, y, 0.0, -0.1, rx * 1.1 + 0.02, 0.62), y)
        sdf.paint(image, c(hair), cover(cap, 1.0 - bald))

        # Ears, face, earrings (in front of the face edge, so they show whole).
        ear_x = rx * 0.98
        sdf.paint(image, c(skin * 0.9), cover(sdf.circle(ax, y, ear_x, 0.02, 0.1)))
        face = sdf.ellipse(x, y, 0.0, 0.0, rx, ry)
        sdf.paint(image, c(skin), cover(face))
        sdf.paint(image, c(GOLD), cover(sdf.circle(ax, y, ear_x + 0.02, 0.17, 0.08), attrs["earrings"]))

        # Beard: the jaw band left when the cheeks and upper lip are cut out of a slightly grown face.
        beard = sdf.subtract(sdf.ellipse(x, y, 0.0, 0.02, rx * 1.04, 0.6), sdf.ellipse(x, y, 0.0, -0.02, rx * 0.8, 0.3))
        sdf.paint(image, c(hair * 0.85), cover(sdf.intersect(beard, -0.02 - y), attrs["beard"]))

        # Nose.
        nose_end = p(-0.05 + 0.23 * attrs["nose_length"])
        sdf.paint(image, c(np.clip(skin - 0.25, 0.0, 1.0)), cover(sdf.capsule(x, y, 0.0, -0.05, 0.0, nose_end, 0.055)))

        # Mouth: a horizontal capsule in coordinates bent by the expression's curvature.
        bent = y - 0.39 + p(MOUTH_CURVE[expr]) * x * x
        half = p(MOUTH_HALF[expr])
        mouth = sdf.capsule(x, bent, -half, 0.0, half, 0.0, p(MOUTH_R[expr]))
        sdf.paint(image, c(LIPS), cover(mouth))

        # Eyes: sclera, iris (clipped to the sclera), pupil.
        ex, ey = p(0.19 * attrs["eye_spacing"]), -0.06
        sclera = sdf.ellipse(ax, y, ex, ey, 0.095, p(EYE_RY[expr]))
        sdf.paint(image, c(SCLERA), cover(sclera))
        iris = sdf.circle(ax, y, ex, ey, 0.066)
        sdf.paint(image, c(_table(EYE_COLOURS, attrs["eye_colour"].astype(int))), cover(sdf.intersect(iris, sclera)))
        sdf.paint(image, c(PUPIL), cover(sdf.circle(ax, y, ex, ey, 0.025)))

        # Glasses: tinted lenses, round rims, bridge and temples.
        glasses = attrs["glasses"]
        lens = sdf.circle(ax, y, ex, ey, 0.125)
        sdf.paint(image, c(LENS), cover(lens, 0.3 * glasses))
        frame = sdf.union(
            sdf.outline(lens, 0.022),
            sdf.capsule(ax, y, 0.0, ey - 0.01, ex - 0.125, ey - 0.01, 0.018),
            sdf.capsule(ax, y, ex + 0.125, ey, rx, ey - 0.03, 0.018),
        )
        sdf.paint(image, c(FRAME), cover(frame, glasses))

        # Brows (in the hair colour, also when bald), tilted by the expression.
        brow_y = ey - 0.14
        brow = sdf.capsule(
            ax, y, ex - 0.08, p(brow_y + BROW_INNER[expr]), ex + 0.08, p(brow_y + BROW_OUTER[expr]), 0.026
        )
        sdf.paint(image, c(hair * 0.9), cover(brow))

        # Hair in front: the cap above a hairline ellipse (down to the temples); when bald, only
        # tufts above the ears.
        front = sdf.intersect(sdf.subtract(cap, sdf.ellipse(x, y, 0.0, 0.05, rx * 0.92, 0.38)), y + 0.05)
        tufts = sdf.ellipse(ax, y, rx * 0.95, -0.1, 0.075, 0.13)
        front = torch.where(p(bald) > 0.5, tufts, front)
        sdf.paint(image, c(hair), cover(front))

        # Lighting: overall brightness times a horizontal gradient across the image.
        light = p(nuisance["brightness"]) * (1.0 + 0.2 * p(nuisance["light_direction"]) * gx)
        return image.mul_(light.unsqueeze(1))
