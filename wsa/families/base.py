"""What a base-model family is: its diffusers module names, its native spellings, and how they map.

Why a table and not code per trainer: every trainer spells a module either the way the original
checkpoint does (BFL ``double_blocks.0.img_attn.qkv``, Wan ``blocks.0.self_attn.q``) or the way the
diffusers model does (``transformer_blocks.0.attn.to_q``), with ``.`` or ``_`` between the words. One
list of templates per family, written once from diffusers' own converters
(``diffusers/loaders/lora_conversion_utils.py``) and its ``convert_*_to_diffusers.py`` scripts, reads
them all; the canonical name of a module is always diffusers' module path in that family's model.

A native module may be *fused*: one native Linear that diffusers splits into several (Flux's ``qkv``
into ``to_q``/``to_k``/``to_v``). A LoRA ``ΔW = B·A`` on the fused layer is exactly the split LoRAs
``B[rows_i]·A`` (same ``A``), so the split is exact on ΔW and costs nothing; :class:`Native` says which
output rows go to which diffusers module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

#: Output-row ranges ``[(start, stop), ...]`` for each target, from the fused layer's weight shape.
RowSplit = Callable[[tuple[int, ...]], list[list[tuple[int, int]]]]

_INDEX = re.compile(r"\{(\w+)\}")


def equal(n: int, of_input: bool = False) -> RowSplit:
    """Split the output rows into ``n`` equal parts (fused q/k/v: ``n = 3``).

    ``of_input``: each part must be the input width (multi-head q/k/v of a square attention); a
    grouped-query qkv (k, v narrower than q) then does not fit, which tells such families apart.
    """

    def split(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
        out = shape[0]
        if of_input and len(shape) > 1 and out != n * shape[1]:
            raise ValueError(f"{out} output rows are not {n} × the input width {shape[1]}")
        if out % n:
            raise ValueError(f"{out} output rows do not split into {n} equal parts")
        d = out // n
        return [[(i * d, (i + 1) * d)] for i in range(n)]

    split.__doc__ = f"{n} equal row blocks"
    return split


def heads_then_rest(n: int, width: Callable[[tuple[int, ...]], int] | None = None) -> RowSplit:
    """``n`` blocks of ``width(shape)`` rows (default: the input width), then the remaining rows.

    Flux single blocks fuse q, k, v (each ``hidden`` wide, ``hidden`` = input width) and the MLP's
    first layer (the rest) into ``linear1``.
    """

    def split(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
        d = width(shape) if width else shape[1]
        if shape[0] <= n * d:
            raise ValueError(f"{shape[0]} output rows leave nothing after {n} blocks of {d}")
        return [[(i * d, (i + 1) * d)] for i in range(n)] + [[(n * d, shape[0])]]

    split.__doc__ = f"{n} blocks of the input width, then the rest"
    return split


def swap_halves(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """One target whose rows are the source's two halves swapped (``(shift, scale)`` -> ``(scale, shift)``).

    diffusers' Flux/SD3 ``norm_out.linear`` orders AdaLN's output as scale then shift; the original
    ``final_layer.adaLN_modulation.1`` as shift then scale (``swap_scale_shift`` in the converters).
    """
    out = shape[0]
    if out % 2:
        raise ValueError(f"{out} output rows do not split into two halves")
    h = out // 2
    return [[(h, out), (0, h)]]


def _compile(template: str, sep: str) -> re.Pattern[str]:
    """``double_blocks.{i}.img_attn.qkv`` -> a full-match regex over ``.``- or ``_``-joined words."""
    pieces = []
    pos = 0
    for m in _INDEX.finditer(template):
        pieces.append(re.escape(template[pos : m.start()].replace(".", sep)))
        pieces.append(rf"(?P<{m[1]}>\d+)")
        pos = m.end()
    pieces.append(re.escape(template[pos:].replace(".", sep)))
    return re.compile("".join(pieces))


@dataclass(frozen=True)
class Native:
    """One native (original-checkpoint) module template and the diffusers module(s) it becomes."""

    native: str
    targets: tuple[str, ...]
    split: RowSplit | None = None  # None: one target, all rows

    def __post_init__(self) -> None:
        if len(self.targets) > 1 and self.split is None:
            raise ValueError(f"{self.native}: several targets need a row split")


def native(template: str, *targets: str, split: RowSplit | None = None) -> Native:
    return Native(template, tuple(targets), split)


@dataclass(frozen=True)
class Mapped:
    """Where one module as spelled in a file goes: ``[(diffusers name, row ranges or None)]``."""

    targets: tuple[tuple[str, list[tuple[int, int]] | None], ...]
    fused_from: str | None = None  # the native name, when rows were split or reordered


@dataclass(frozen=True)
class Family:
    """One base-model family.

    Attributes
    ----------
    name : the stable id (``flux1``, ``sdxl``, ``wan21``, …), used for ``--family`` and ``OUT/<family>/``.
    title : what a person calls it.
    denoiser : the diffusers pipeline component the denoiser's modules belong to (``transformer``/``unet``).
    modules : diffusers module templates of the denoiser (``{i}`` = a block index): every module a LoRA
        may target that no :class:`Native` rule already names.
    natives : native spellings and the diffusers modules each maps to.
    metadata_names : lower-case values of ``ss_base_model_version`` / ``modelspec.architecture`` (their
        prefix up to ``/`` or ``:``) that name this family.
    text_encoders : kohya-style text-encoder prefix (``lora_te1_``) -> diffusers component (``text_encoder``).
    hidden_sizes : the full model's widths of its attention projections, a tie-breaker between families
        whose module names coincide (tiny test models have other widths and rely on names).
    variants : metadata names of models with this family's keys (Pony, Illustrious for SDXL).
    """

    name: str
    title: str
    denoiser: str
    modules: tuple[str, ...] = ()
    natives: tuple[Native, ...] = ()
    metadata_names: tuple[str, ...] = ()
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    hidden_sizes: tuple[int, ...] = ()
    variants: tuple[str, ...] = ()
    #: For families whose names need arithmetic (SD's LDM block numbers): (path, separator) -> diffusers path or None.
    rename: Callable[[str, str], str | None] | None = None
    #: A regex that, found in one of this family's canonical names of the file, proves it among others that fit.
    evidence: str = ""
    #: The same, on the file's names as spelled (``.``-joined): for families whose *diffusers* spelling is their
    #: own while their native names map onto the same canonical names as another's (Lumina 2 vs Z-Image).
    spelled_evidence: str = ""
    #: A regex on the normalised metadata value for names that carry the family inside (SimpleTuner's
    #: ``wan-i2v-14b-2.2-high/lora``); a match counts as more specific than any name prefix.
    metadata_regex: str = ""
    #: Chosen only when the metadata names it, never from keys alone (the embedded world's SD-named UNets).
    metadata_only: bool = False
    #: Shapes as a tie-breaker: ``{module as spelled: ΔW shape}`` -> True (this family's widths), False (not
    #: this family), None (cannot tell). For families whose names coincide and widths do not decide.
    fits: Callable[[Mapping[str, tuple[int, ...]]], bool | None] | None = None

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern[str], re.Pattern[str], Native | None, str]]:
        out: list[tuple[re.Pattern[str], re.Pattern[str], Native | None, str]] = []
        for rule in self.natives:
            out.append((_compile(rule.native, "."), _compile(rule.native, "_"), rule, rule.native))
        diffusers = list(self.modules) + [t for r in self.natives for t in r.targets]
        for t in dict.fromkeys(diffusers):
            out.append((_compile(t, "."), _compile(t, "_"), None, t))
        return out

    def map(self, path: str, shape: tuple[int, ...], underscored: bool) -> Mapped | None:
        """The diffusers module(s) for ``path`` (a denoiser module as spelled), or ``None`` if not this family's.

        ``shape`` is the module's ΔW shape; it gives fused layers their row split.
        """
        if self.rename is not None:
            name = self.rename(path, "_" if underscored else ".")
            if name is not None:
                return Mapped(((name, None),))
        for dotted, under, rule, template in self._patterns:
            m = (under if underscored else dotted).fullmatch(path)
            if m is None:
                continue
            fill = m.groupdict()
            if rule is None:
                return Mapped(((_fill(template, fill), None),))
            if rule.split is None:
                return Mapped(((_fill(rule.targets[0], fill), None),))
            rows = rule.split(shape)
            if len(rows) == 1 and rows[0] == [(0, shape[0])]:  # a split that changes nothing (SD3's inner blocks)
                return Mapped(((_fill(rule.targets[0], fill), None),))
            if len(rows) != len(rule.targets):
                raise ValueError(f"{rule.native}: split gives {len(rows)} parts for {len(rule.targets)} targets")
            return Mapped(
                tuple((_fill(t, fill), r) for t, r in zip(rule.targets, rows, strict=True)),
                fused_from=_fill(rule.native, fill),
            )
        return None

    def target_names(self, path: str, underscored: bool) -> tuple[str, ...]:
        """The diffusers names ``path`` becomes (names only: no shapes, no row split)."""
        if self.rename is not None:
            name = self.rename(path, "_" if underscored else ".")
            if name is not None:
                return (name,)
        for dotted, under, rule, template in self._patterns:
            m = (under if underscored else dotted).fullmatch(path)
            if m is not None:
                targets = (template,) if rule is None else rule.targets
                return tuple(_fill(t, m.groupdict()) for t in targets)
        return ()

    def knows(self, path: str, underscored: bool) -> bool:
        """Does any template match ``path`` (names only, no shapes)?"""
        if self.rename is not None and self.rename(path, "_" if underscored else ".") is not None:
            return True
        return any((u if underscored else d).fullmatch(path) for d, u, _, _ in self._patterns)

    def names_metadata(self, value: str) -> bool:
        return self.metadata_match(value) > 0

    def metadata_match(self, value: str) -> int:
        """Length of the longest of this family's metadata names that ``value`` starts with (0: none)."""
        v = normalise_arch(value)
        if self.metadata_regex and re.search(self.metadata_regex, v):
            return 1000
        return max((len(n) for n in self.metadata_names + self.variants if v == n or v.startswith(n)), default=0)


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _INDEX.sub(lambda m: values[m[1]], template)


def normalise_arch(value: str) -> str:
    """``stable-diffusion-xl-v1-base/lora`` -> ``stable-diffusion-xl-v1-base``, lower case, ``_`` as ``-``."""
    return re.split(r"[/:]", value.strip().lower(), maxsplit=1)[0].replace("_", "-").replace(" ", "-")


def block_templates(prefix: str, leaves: Sequence[str]) -> tuple[str, ...]:
    """``prefix.{i}.<leaf>`` for each leaf: the usual shape of a DiT's per-block modules."""
    return tuple(f"{prefix}.{{i}}.{leaf}" for leaf in leaves)
