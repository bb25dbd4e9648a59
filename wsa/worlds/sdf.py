"""Signed-distance shapes and layer compositing, batched over images with per-image parameters.

Why signed distances: a shape is a function ``d(x, y)`` (negative inside, positive outside, in the
same units as the coordinates), so anti-aliasing is one expression (:func:`coverage`: the fraction of
a pixel the shape covers, approximated by a linear ramp one pixel wide), shapes combine with
``min``/``max``, and moving, rotating or scaling a part is a change of coordinates. Everything is
elementwise torch, so one call draws a part on all B images at once.

Conventions
-----------
* Coordinates: ``x`` to the right and ``y`` **down** (image rows), both in ``[-1, 1]`` across the
  image (:func:`grid`); one pixel is ``2 / size`` wide (:func:`pixel_width`).
* Grids have shape ``(1, H, W)``; per-image parameters have shape ``(B, 1, 1)`` (:func:`param`) or are
  Python floats, so every result broadcasts to ``(B, H, W)``.
* Pixel tensors only see exactly rounded operations (``+ - * / sqrt min max abs clamp``) and the
  ``lerp_`` of :func:`paint`, so a pixel does not depend on how the batch is split or vectorised and
  renders are bit-identical across batch sizes. Trigonometry happens once per image, on the
  parameters, in NumPy float64.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

Scalar = float | torch.Tensor  # a Python float or a (B, 1, 1) tensor of per-image values


def pixel_width(size: int) -> float:
    """Width of one pixel in grid units (the grid spans 2 units)."""
    return 2.0 / size


def grid(size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(x, y)``, each of shape (1, size, size), in ``[-1, 1]``.

    Pixel centres (not edges) so that a shape centred at 0 is symmetric in the image.
    """
    centres = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * (2.0 / size) - 1.0
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return x[None], y[None]


def param(values: npt.ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-image values (length B) as a float32 tensor of shape (B, 1, 1), ready to broadcast."""
    array = np.asarray(values, dtype=np.float64).astype(np.float32)
    return torch.from_numpy(array.reshape(-1, 1, 1).copy()).to(device)


def colours(values: npt.ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """RGB colours in ``[0, 1]``, shape (B, 3) or one colour (3,), as float32 of shape (B or 1, 3, 1, 1)."""
    array = np.asarray(values, dtype=np.float64).astype(np.float32).reshape(-1, 3, 1, 1)
    return torch.from_numpy(array.copy()).to(device)


# --------------------------------------------------------------------------------------------------
# Coordinates


def to_local(
    x: torch.Tensor, y: torch.Tensor, cx: Scalar, cy: Scalar, cos: Scalar, sin: Scalar, scale: Scalar = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of an object placed at ``(cx, cy)``, rotated by the angle with ``(cos, sin)``, scaled.

    The inverse of the object's placement: a point at local ``(u, v)`` lands at
    ``(cx, cy) + scale * R(angle) (u, v)``. Distances measured in local units must be multiplied by
    ``scale`` to be in image units (or the pixel width divided by it, see :func:`coverage`).
    """
    dx, dy = x - cx, y - cy
    u = (dx * cos + dy * sin) / scale
    v = (dy * cos - dx * sin) / scale
    return u, v


# --------------------------------------------------------------------------------------------------
# Primitives (each returns a signed distance of shape broadcast(x, params))


def length(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean norm without ``hypot`` (whose vectorised and scalar paths may differ in the last bit)."""
    return torch.sqrt(x * x + y * y)


def circle(x: torch.Tensor, y: torch.Tensor, cx: Scalar, cy: Scalar, r: Scalar) -> torch.Tensor:
    """Disc of radius ``r`` (exact distance)."""
    return length(x - cx, y - cy) - r


def ellipse(x: torch.Tensor, y: torch.Tensor, cx: Scalar, cy: Scalar, rx: Scalar, ry: Scalar) -> torch.Tensor:
    """Axis-aligned ellipse, distance approximated as ``k0 (k0 - 1) / k1`` (Quilez).

    Exact on the boundary with the right gradient there, which is all anti-aliasing needs; the exact
    distance needs a quartic solve per pixel.
    """
    px, py = (x - cx) / rx, (y - cy) / ry
    k0 = length(px, py)
    k1 = length(px / rx, py / ry)
    return k0 * (k0 - 1.0) / torch.clamp(k1, min=1e-6)


def box(
    x: torch.Tensor,
    y: torch.Tensor,
    cx: Scalar,
    cy: Scalar,
    half_w: Scalar,
    half_h: Scalar,
    radius: Scalar = 0.0,
) -> torch.Tensor:
    """Axis-aligned box with rounded corners (``radius`` eats into the half sizes); exact distance."""
    qx = torch.abs(x - cx) - half_w + radius
    qy = torch.abs(y - cy) - half_h + radius
    outside = length(torch.clamp(qx, min=0.0), torch.clamp(qy, min=0.0))
    inside = torch.clamp(torch.maximum(qx, qy), max=0.0)
    return outside + inside - radius


def segment(x: torch.Tensor, y: torch.Tensor, ax: Scalar, ay: Scalar, bx: Scalar, by: Scalar) -> torch.Tensor:
    """Unsigned distance to the segment from ``a`` to ``b`` (a degenerate segment is a point)."""
    pax, pay = x - ax, y - ay
    bax, bay = bx - ax, by - ay
    denom = bax * bax + bay * bay
    if isinstance(denom, torch.Tensor):
        denom = torch.clamp(denom, min=1e-12)
    else:
        denom = max(denom, 1e-12)
    h = torch.clamp((pax * bax + pay * bay) / denom, 0.0, 1.0)
    return length(pax - bax * h, pay - bay * h)


def capsule(
    x: torch.Tensor, y: torch.Tensor, ax: Scalar, ay: Scalar, bx: Scalar, by: Scalar, r: Scalar
) -> torch.Tensor:
    """Stroke of radius ``r`` from ``a`` to ``b`` with round ends: limbs, tails, eyebrows, mouths."""
    return segment(x, y, ax, ay, bx, by) - r


def triangle(
    x: torch.Tensor,
    y: torch.Tensor,
    p0: tuple[Scalar, Scalar],
    p1: tuple[Scalar, Scalar],
    p2: tuple[Scalar, Scalar],
) -> torch.Tensor:
    """Triangle with corners ``p0, p1, p2`` in either winding; exact distance (Quilez).

    Unsigned distance to the nearest edge, negative where the point is on the inner side of all three
    edges (the winding's sign decides which side is inner).
    """
    corners = (p0, p1, p2)
    winding = (p1[0] - p0[0]) * (p2[1] - p0[1]) - (p1[1] - p0[1]) * (p2[0] - p0[0])
    dist = None
    inside = None
    for i in range(3):
        (ax, ay), (bx, by) = corners[i], corners[(i + 1) % 3]
        d = segment(x, y, ax, ay, bx, by)
        dist = d if dist is None else torch.minimum(dist, d)
        side = ((bx - ax) * (y - ay) - (by - ay) * (x - ax)) * winding >= 0
        inside = side if inside is None else inside & side
    return torch.where(inside, -dist, dist)


# --------------------------------------------------------------------------------------------------
# Combinations


def union(*distances: torch.Tensor) -> torch.Tensor:
    """Shape covered by any of the inputs."""
    out = distances[0]
    for d in distances[1:]:
        out = torch.minimum(out, d)
    return out


def intersect(*distances: torch.Tensor) -> torch.Tensor:
    """Shape covered by all inputs (a bound, exact enough at the boundary)."""
    out = distances[0]
    for d in distances[1:]:
        out = torch.maximum(out, d)
    return out


def subtract(d: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """``d`` with ``cut`` removed."""
    return torch.maximum(d, -cut)


def smooth_union(d1: torch.Tensor, d2: torch.Tensor, k: float) -> torch.Tensor:
    """Union with a fillet of size ``k`` where the shapes meet (polynomial smooth-min, Quilez).

    Why: a neck that flows into a head reads as one body; ``min`` leaves a crease at the joint.
    """
    h = torch.clamp(0.5 + 0.5 * (d2 - d1) / k, 0.0, 1.0)
    return d2 * (1.0 - h) + d1 * h - k * h * (1.0 - h)


def outline(d: torch.Tensor, half_thickness: Scalar) -> torch.Tensor:
    """Band of the given half-thickness around the boundary of ``d``: frames, rings, collars."""
    return torch.abs(d) - half_thickness


# --------------------------------------------------------------------------------------------------
# Rendering


def coverage(d: torch.Tensor, pixel: Scalar) -> torch.Tensor:
    """Fraction of each pixel inside the shape: ``clamp(0.5 - d / pixel, 0, 1)``.

    A linear ramp one pixel wide centred on the boundary (box-filter anti-aliasing for straight
    edges). ``pixel`` is the pixel width in the units of ``d``: ``pixel_width(size) / scale`` for
    distances measured in local coordinates of an object drawn at ``scale``.
    """
    return (d / pixel).neg_().add_(0.5).clamp_(0.0, 1.0)


def canvas(colour: torch.Tensor, size: int) -> torch.Tensor:
    """Images of shape (B, 3, size, size) filled with per-image ``colour`` (shape (B, 3, 1, 1))."""
    return colour.expand(-1, 3, size, size).contiguous()


def paint(image: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Draw a layer over ``image`` in place: ``image = image + alpha (colour - image)``.

    Parameters
    ----------
    image : Tensor of shape (B, 3, H, W)
    colour : Tensor of shape (B, 3, 1, 1) or (1, 3, 1, 1)
    alpha : Tensor of shape (B, H, W)
        Coverage times opacity, in ``[0, 1]``.

    One fused ``lerp_`` pass instead of three: compositing is most of the cost of a render (3
    channels per layer). A fused op could in principle round differently in its vectorised and
    scalar paths; renders are nevertheless bit-identical across batch splits, even and odd sizes
    (``tests/test_worlds.py`` checks it).
    """
    return image.lerp_(colour.expand_as(image), alpha.unsqueeze(1))
