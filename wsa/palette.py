"""The one colour palette of every figure and the report: Okabe & Ito (2008), "Color Universal Design".

Why one module: eight colourblind-safe colours were copied into seven files, each in its own order, so
the same series changed colour from one figure to the next.
"""

from __future__ import annotations

OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "purple": "#CC79A7",
    "yellow": "#F0E442",
    "black": "#000000",
    "grey": "#999999",
}
#: Series colours in order (categories, lines of one plot): the strongest contrasts first.
CYCLE = tuple(OKABE_ITO[c] for c in ("blue", "vermillion", "green", "orange", "sky", "purple", "yellow", "black"))
