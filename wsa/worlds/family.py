"""What a concept family is: identity attributes, nuisance factors, a sampler, a renderer, prompts.

A family plays the role CelebA-style faces play in weights2weights (arXiv 2406.09413): each identity
is a row of known attributes (the analogue of w2w's ``identity_df``), each image of it adds nuisance
factors that vary between images (position, expression, lighting, background), and a deterministic
renderer turns both into pixels. Because the attributes are known exactly, every analysis downstream
(probes, edit directions, inversion) can be scored against ground truth.

Subclasses declare :attr:`Family.attributes`, :attr:`Family.nuisances`, :attr:`Family.noun` and
:attr:`Family.prompt_template`, and implement :meth:`Family._draw`; sampling, table validation, prompts
and the vocabulary are shared here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from wsa.errors import ConfigError

if TYPE_CHECKING:
    import torch

KINDS = ("binary", "continuous", "categorical")
IDENTITY_TOKEN = "sks"  # the rare token DreamBooth / w2w fine-tuning binds an identity to
_IDENTITY_STREAM, _NUISANCE_STREAM = 0, 1  # see Family._uniforms
_PIXELS_PER_BLOCK = 1 << 17  # images rendered together: see Family.render


@dataclass(frozen=True)
class AttributeSpec:
    """An identity attribute: fixed for an identity, the same in all its images.

    ``values``: the class names (categorical), ``(0, 1)`` (binary) or ``(low, high)`` (continuous).
    """

    name: str
    kind: str
    values: tuple = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attribute {self.name!r}: kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class NuisanceSpec:
    """A factor that varies between images of one identity; ``in_prompt`` ones are named in the prompt.

    ``values``: the options (categorical) or ``(low, high)`` (continuous).
    """

    name: str
    values: tuple
    kind: str
    in_prompt: bool

    def __post_init__(self) -> None:
        if self.kind not in ("categorical", "continuous"):
            raise ValueError(f"nuisance {self.name!r}: kind {self.kind!r} is not 'categorical' or 'continuous'")


def _sample_column(spec: AttributeSpec | NuisanceSpec, u: np.ndarray) -> np.ndarray:
    """Map uniforms in [0, 1) to values of one column: 0/1 ints, floats in [low, high], class names."""
    if spec.kind == "binary":
        return (u < 0.5).astype(np.int64)
    if spec.kind == "continuous":
        low, high = spec.values
        # 4 decimals: readable CSVs that round-trip exactly (the table is the ground truth).
        return np.round(low + u * (high - low), 4)
    index = np.minimum((u * len(spec.values)).astype(np.int64), len(spec.values) - 1)
    return np.asarray(spec.values, dtype=object)[index]


def _encode_column(spec: AttributeSpec | NuisanceSpec, column: pd.Series, table: str) -> np.ndarray:
    """One table column as numbers for the renderer: floats (binary, continuous) or class indices."""
    if column.isna().any():
        raise ConfigError(f"{table} column {spec.name!r} has missing values; every row needs a value")
    if spec.kind == "categorical":
        index = {str(v): i for i, v in enumerate(spec.values)}
        unknown = sorted({str(v) for v in column} - set(index))
        if unknown:
            raise ConfigError(
                f"{table} column {spec.name!r} has unknown value(s) {unknown[:5]!r}; expected one of {spec.values!r}"
            )
        return np.array([index[str(v)] for v in column], dtype=np.int64)
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise ConfigError(f"{table} column {spec.name!r} must be numeric")
    if spec.kind == "binary" and not np.isin(values, (0.0, 1.0)).all():
        raise ConfigError(f"{table} column {spec.name!r} is binary; values must be 0 or 1")
    return values


class Family:
    """Base class of concept families (register subclasses with ``@register_family("name")``).

    Attributes
    ----------
    name, title : str
        Registry name and a human title.
    attributes : tuple of AttributeSpec
        Identity attributes (at least 8, mixing binary, continuous and categorical).
    nuisances : tuple of NuisanceSpec
        Per-image factors (at least 4).
    noun : str
        The word for the object in prompts ("face", "dog").
    prompt_template : str
        ``str.format`` template over ``noun`` and the in-prompt nuisances, e.g.
        ``"a {noun}, {expression}, on {background}"``; the identity prompt puts the token before the noun.
    neutral_values : dict of str to float
        Continuous nuisances whose neutral value (:meth:`neutral_nuisance`) is not the range midpoint.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    attributes: ClassVar[tuple[AttributeSpec, ...]]
    nuisances: ClassVar[tuple[NuisanceSpec, ...]]
    noun: ClassVar[str]
    prompt_template: ClassVar[str] = "a {noun}, {expression}, on {background}"
    neutral_values: ClassVar[dict[str, float]] = {}  # continuous nuisances whose neutral value is not the midpoint

    # ---------------------------------------------------------------------------------------------
    # Sampling

    @staticmethod
    def _uniforms(n: int, seed: int, stream: int, k: int) -> np.ndarray:
        """``(n, k)`` uniforms, row by row, from ``default_rng([seed, stream])``.

        Why a stream number: identity and nuisance tables drawn with the same seed must not share
        random numbers (otherwise, e.g., beard and smiling would be perfectly correlated). Why row by
        row: the first m rows of ``n`` samples equal ``m`` samples with the same seed, so a table can
        be extended without changing the identities already trained on.
        """
        if n < 0:
            raise ConfigError(f"cannot sample {n} rows; n must be >= 0")
        return np.random.default_rng([int(seed), stream]).random((n, k))

    def sample_identities(self, n: int, seed: int) -> pd.DataFrame:
        """Random identities: ``id`` (``id_00042``) then one column per attribute, deterministic per seed.

        Binary columns are 0/1 ints (probability 1/2), continuous ones uniform floats in ``[low, high]``
        (4 decimals), categorical ones class names with equal probabilities.
        """
        u = self._uniforms(n, seed, _IDENTITY_STREAM, len(self.attributes))
        table = {"id": [f"id_{i:05d}" for i in range(n)]}
        for j, spec in enumerate(self.attributes):
            table[spec.name] = _sample_column(spec, u[:, j])
        return pd.DataFrame(table)

    def sample_nuisance(self, n: int, seed: int) -> pd.DataFrame:
        """Random nuisance settings, one column per nuisance, deterministic per seed."""
        u = self._uniforms(n, seed, _NUISANCE_STREAM, len(self.nuisances))
        return pd.DataFrame({spec.name: _sample_column(spec, u[:, j]) for j, spec in enumerate(self.nuisances)})

    def neutral_nuisance(self, n: int = 1) -> pd.DataFrame:
        """``n`` rows of the default view: centred, upright, even lighting, first option of each category.

        For tests and figures that vary one factor at a time from a fixed baseline.
        """
        row: dict[str, Any] = {}
        for spec in self.nuisances:
            if spec.kind == "categorical":
                row[spec.name] = spec.values[0]
            else:
                low, high = spec.values
                row[spec.name] = self.neutral_values.get(spec.name, (low + high) / 2)
        return pd.DataFrame([row] * n)

    # ---------------------------------------------------------------------------------------------
    # Rendering

    def render(self, identities: pd.DataFrame, nuisance: pd.DataFrame, size: int = 64) -> torch.Tensor:
        """Images of each identity row under the nuisance row with the same position.

        Parameters
        ----------
        identities : DataFrame with one column per attribute (other columns, such as ``id``, ignored)
        nuisance : DataFrame with one column per nuisance, as many rows as ``identities``
        size : int, default=64
            Side of the square images in pixels.

        Returns
        -------
        Tensor of shape (B, 3, size, size), float32 in [0, 1]
            Deterministic: no randomness inside (all of it is in the tables), and row ``b`` depends
            only on row ``b`` of each table, so splitting the batch gives the same pixels.

        Notes
        -----
        Blocks of images are drawn on ``torch.get_num_threads()`` Python threads; while they run,
        torch's intra-op thread count is set to 1 (and restored afterwards), which is process-wide.
        """
        import torch

        if len(identities) != len(nuisance):
            raise ConfigError(f"{len(identities)} identity rows but {len(nuisance)} nuisance rows; they must match")
        if size < 8:
            raise ConfigError(f"image size {size} is too small; use at least 8 pixels")
        attrs = self._encode(identities, self.attributes, "identity")
        nuis = self._encode(nuisance, self.nuisances, "nuisance")
        n = len(identities)
        out = torch.empty(n, 3, size, size)
        # Blocks of ~128k pixels: each intermediate field then stays in cache (about 1.5x faster than
        # one pass over a batch of 256 at 64x64). Blocks run on a pool of torch.get_num_threads()
        # Python threads (torch releases the GIL) rather than through torch's intra-op threads, whose
        # per-op barrier made 2-thread renders 4x slower than 1 thread on a shared 2-core machine.
        # Each block is drawn the same way wherever it runs, so pixels do not depend on the pool.
        step = max(1, _PIXELS_PER_BLOCK // (size * size))

        def draw(start: int) -> None:
            block = slice(start, start + step)
            with torch.no_grad():
                image = self._draw(
                    {k: v[block] for k, v in attrs.items()}, {k: v[block] for k, v in nuis.items()}, size
                )
                out[block] = image.clamp_(0.0, 1.0)

        starts = range(0, n, step)
        threads = torch.get_num_threads()
        workers = min(threads, len(starts))
        if workers <= 1:
            for start in starts:
                draw(start)
        else:
            torch.set_num_threads(1)  # one intra-op thread per block: the pool is the parallelism
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for done in [pool.submit(draw, start) for start in starts]:
                        done.result()
            finally:
                torch.set_num_threads(threads)
        return out

    @staticmethod
    def _encode(frame: pd.DataFrame, specs: tuple, table: str) -> dict[str, np.ndarray]:
        missing = [spec.name for spec in specs if spec.name not in frame.columns]
        if missing:
            raise ConfigError(f"{table} table lacks column(s) {missing}; it needs {[s.name for s in specs]}")
        return {spec.name: _encode_column(spec, frame[spec.name], table) for spec in specs}

    def _draw(self, attrs: dict[str, np.ndarray], nuisance: dict[str, np.ndarray], size: int) -> torch.Tensor:
        """Render encoded columns (floats; categorical as class indices) to (B, 3, size, size)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------
    # Prompts

    def prompt(self, nuisance_row: Mapping, token: str | None = None) -> str:
        """Text for one image, e.g. ``"a face, smiling, on blue"``.

        ``token="sks"`` gives the identity prompt used for fine-tuning (``"a sks face, smiling, on blue"``).
        """
        noun = self.noun if token is None else f"{token} {self.noun}"
        values = {spec.name: str(nuisance_row[spec.name]) for spec in self.nuisances if spec.in_prompt}
        return self.prompt_template.format(noun=noun, **values)

    def prompts(self, nuisance: pd.DataFrame, token: str | None = None) -> list[str]:
        """:meth:`prompt` for every row of a nuisance table."""
        return [self.prompt(row, token) for row in nuisance.to_dict("records")]

    def vocabulary(self) -> list[str]:
        """Every word a prompt of this family can contain, plus the identity token, sorted."""
        words = set(_words(self.prompt_template.format(noun=self.noun, **{s.name: "" for s in self.nuisances})))
        for spec in self.nuisances:
            if spec.in_prompt:
                words.update(str(v) for v in spec.values)
        words.add(IDENTITY_TOKEN)
        return sorted(words)

    def tokenize(self, text: str) -> list[str]:
        """Split a prompt into words (on whitespace and commas); a word outside the vocabulary is an error."""
        vocab = set(self.vocabulary())
        words = _words(text)
        for word in words:
            if word not in vocab:
                raise ConfigError(f"word {word!r} is not in the {self.name} vocabulary ({', '.join(sorted(vocab))})")
        return words

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text) if w]
