"""Which family an adapter's denoiser modules belong to, and their canonical (diffusers) names.

Why here and not in each reader: the family is decided from the module names all together (plus
shapes and the file's metadata), and every trainer convention needs the same decision. Readers hand
over the denoiser's modules *as spelled* (prefix removed, ``.``- or ``_``-joined); this module picks
the family, renames each module, and splits fused modules into diffusers' modules exactly on ΔW.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch

from wsa.adapter import ModuleWeights
from wsa.errors import FormatError
from wsa.families.base import Family, normalise_arch
from wsa.families.registry import FAMILIES, families

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("wsa_forced_family", default=None)


@contextlib.contextmanager
def forced_family(name: str | None) -> Iterator[None]:
    """Inside this block (in this thread), files are read as family ``name`` (``--family``), not the best guess.

    Why: keys that fit several families (a ComfyUI-trained HunyuanVideo LoRA spells its modules the Flux
    way) are decided by metadata or a priority; the user who knows better names the family. A file whose
    modules do not fit it still fails, naming the module.
    """
    token = _FORCED.set(name if name not in (None, "unknown") else None)
    try:
        yield
    finally:
        _FORCED.reset(token)


#: Header fields that name the base model, most specific first (kohya/musubi/ai-toolkit, SAI model spec, CivitAI).
METADATA_FIELDS = ("ss_base_model_version", "modelspec.architecture", "baseModel", "base_model")


@dataclass(frozen=True)
class Resolved:
    """The outcome: ``family``, how it was decided (``source``), other ``candidates``, ``modules``, ``notes``."""

    family: str
    source: str
    candidates: tuple[str, ...]
    modules: dict[str, ModuleWeights]
    notes: tuple[str, ...]


def family_from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(family, metadata value)`` the header names; ``(None, value or None)`` if it names none we know."""
    base = metadata.get("base_model_name_or_path")
    if isinstance(base, str) and base.startswith("builtin:"):  # `wsa world zoo` adapters (PEFT config field)
        return "world", base
    first: str | None = None
    for key in METADATA_FIELDS:  # the first field that names a family (kohya SD3 writes "medium" in the first)
        value = metadata.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        first = first or value
        # The most specific name wins: "hunyuan-video-1.5" is HunyuanVideo 1.5, not 1.0's "hunyuan-video".
        scored = [
            (fam.metadata_match(value) if fam.names_metadata(value) else 0, -i, fam.name)
            for i, fam in enumerate(families())
        ]
        best = max(scored)
        if best[0] > 0:
            return best[2], value
    return None, first


@lru_cache(maxsize=1 << 16)
def _knowing(path: str, underscored: bool) -> frozenset[str]:
    """The families any of whose templates spell ``path`` (cached: module names repeat across a folder)."""
    return frozenset(f.name for f in families() if f.knows(path, underscored))


def resolve(
    denoiser: Mapping[tuple[str, bool], ModuleWeights],
    *,
    metadata: Mapping[str, str],
    path: object,
    family: str | None = None,
) -> Resolved:
    """Decide the family of ``denoiser`` (keys: ``(module as spelled, underscored?)``) and rename its modules.

    ``family`` forces one (``--family``). Raises :class:`FormatError` naming the module no family knows,
    or a fused module whose shape does not split.
    """
    notes: list[str] = []
    family = family or _FORCED.get()
    meta_family, meta_value = family_from_metadata(metadata)
    if not denoiser:
        chosen = family or meta_family
        return Resolved(chosen or "", "metadata" if chosen else "none", (), {}, ())
    if family is not None:
        fam = FAMILIES.get(family)
        unknown = [p for p, u in denoiser if not fam.knows(p, u)]
        if unknown:
            raise FormatError(f"module {unknown[0]!r} is not a {fam.title} module ({_expected(fam)})", path)
        candidates: tuple[str, ...] = (family,)
        source = "forced"
    else:
        sets = [_knowing(p, u) for p, u in denoiser]
        common = frozenset.intersection(*sets)
        candidates = tuple(
            n for n in _order() if n in common and (not FAMILIES.get(n).metadata_only or n == meta_family)
        )
        if not candidates:
            if _best_coverage(sets) * 2 < len(sets):
                return _unknown_family(denoiser, meta_family)
            raise FormatError(_no_family_message(denoiser, sets), path)
        by_width = _by_width(candidates, denoiser)
        if meta_family in candidates and not (len(by_width) == 1 and by_width[0] != meta_family):
            fam, source = FAMILIES.get(meta_family), "keys+metadata"
        elif meta_family in candidates:  # the widths rule out what the header says (SDXL keys, "sd_v1")
            fam, source = FAMILIES.get(by_width[0]), "keys+shapes"
            notes.append(f"metadata says {meta_value!r}, but the module widths are {fam.title}'s")
        else:
            fam, source = _tie_break(candidates, denoiser)
            if meta_value is not None:
                notes.append(f"metadata says {meta_value!r}, keys say {fam.name}")
    modules: dict[str, ModuleWeights] = {}
    origin: dict[str, str] = {}
    for (spelled, underscored), mod in denoiser.items():
        try:
            mapped = fam.map(spelled, mod.shape, underscored)
        except ValueError as exc:
            raise FormatError(f"module {spelled!r}: fused layer does not split ({exc})", path) from None
        assert mapped is not None
        try:
            parts = [mod if rows is None else take_rows(mod, rows) for _, rows in mapped.targets]
        except ValueError as exc:
            raise FormatError(
                f"module {spelled!r} is fused in the file and split in diffusers' model, and {exc}", path
            ) from None
        if len(parts) > 1:
            parts = sparse_split(parts, mod.rank)
        for (name, _), part in zip(mapped.targets, parts, strict=True):
            if name in modules:
                raise FormatError(f"module {name!r} appears twice (as {origin[name]!r} and {spelled!r})", path)
            modules[name] = part
            origin[name] = spelled
        if mapped.fused_from is not None and len(mapped.targets) > 1:
            notes.append(f"split {mapped.fused_from} into {', '.join(n.rsplit('.', 1)[-1] for n, _ in mapped.targets)}")
        elif mapped.fused_from is not None:
            notes.append(f"reordered rows of {mapped.fused_from} for {mapped.targets[0][0]}")
    others = tuple(c for c in candidates if c != fam.name)
    return Resolved(fam.name, source, others, modules, tuple(notes))


def _best_coverage(sets: list[frozenset[str]]) -> int:
    counts: dict[str, int] = {}
    for s in sets:
        for n in s:
            counts[n] = counts.get(n, 0) + 1
    return max(counts.values(), default=0)


def _unknown_family(denoiser: Mapping[tuple[str, bool], ModuleWeights], meta_family: str | None) -> Resolved:
    """Modules of an architecture no family describes (or a toy model): kept as spelled, nothing split.

    Most of the modules must fit no family for this; a file that mostly fits one family and has an odd
    module is an error instead (:func:`_no_family_message`). ``_``-spelled names are undone with SD's word
    list, which is a guess, and the adapter says so.
    """
    from wsa.families.names import canonical_unet_path, kohya_path_to_dotted

    modules: dict[str, ModuleWeights] = {}
    guessed = False
    for (spelled, underscored), mod in denoiser.items():
        name = canonical_unet_path(kohya_path_to_dotted(spelled) if underscored else spelled)
        guessed = guessed or underscored
        modules[name] = mod
    notes = ("module names guessed from their '_' spelling",) if guessed else ()
    if meta_family:
        notes += (f"metadata names {meta_family}, but its modules do not fit it",)
    return Resolved("", "unknown (no family fits the module names)", (), modules, notes)


def _order() -> list[str]:
    return [f.name for f in families()]


def _tie_break(candidates: tuple[str, ...], denoiser: Mapping[tuple[str, bool], ModuleWeights]) -> tuple[Family, str]:
    if len(candidates) == 1:
        return FAMILIES.get(candidates[0]), "keys"
    fitting = tuple(c for c in candidates if _maps_all(FAMILIES.get(c), denoiser))
    if len(fitting) == 1:
        return FAMILIES.get(fitting[0]), "keys+shapes"
    candidates = fitting or candidates
    shapes = {p: mod.shape for (p, _), mod in denoiser.items()}
    verdicts = {c: (FAMILIES.get(c).fits(shapes) if FAMILIES.get(c).fits else None) for c in candidates}
    kept = tuple(c for c in candidates if verdicts[c] is not False)
    if any(verdicts[c] for c in kept):
        kept = tuple(c for c in kept if verdicts[c])
    if kept and kept != candidates:
        if len(kept) == 1:
            return FAMILIES.get(kept[0]), "keys+shapes"
        candidates = kept

    def proves(c: str) -> bool:  # evidence is about a family's own canonical names (LTX renames adaln_single)
        fam = FAMILIES.get(c)
        if fam.spelled_evidence and any(re.search(fam.spelled_evidence, p) for p, u in denoiser if not u):
            return True
        names = (n for p, u in denoiser for n in fam.target_names(p, u))
        return bool(fam.evidence) and any(re.search(fam.evidence, n) for n in names)

    proven = [c for c in candidates if proves(c)]
    if len(proven) == 1:
        return FAMILIES.get(proven[0]), "keys (structure)"
    dims = {d for mod in denoiser.values() for d in mod.shape}
    by_size = [c for c in candidates if set(FAMILIES.get(c).hidden_sizes) & dims]
    if len(by_size) == 1:
        return FAMILIES.get(by_size[0]), "keys+shapes"
    first = (by_size or list(candidates))[0]
    return FAMILIES.get(first), f"keys (also fit: {', '.join(c for c in candidates if c != first)})"


def _by_width(candidates: tuple[str, ...], denoiser: Mapping[tuple[str, bool], ModuleWeights]) -> list[str]:
    """The candidates whose full-model widths appear among the modules' shapes."""
    dims = {d for mod in denoiser.values() for d in mod.shape}
    return [c for c in candidates if set(FAMILIES.get(c).hidden_sizes) & dims]


def _maps_all(fam: Family, denoiser: Mapping[tuple[str, bool], ModuleWeights]) -> bool:
    """Do this family's row splits fit every fused module's shape (a wrong family's split may not)?"""
    try:
        for (p, u), mod in denoiser.items():
            fam.map(p, mod.shape, u)
    except ValueError:
        return False
    return True


def _expected(fam: Family) -> str:
    examples = [r.native for r in fam.natives[:2]] + list(fam.modules[:2])
    return "expected names like " + ", ".join(repr(e) for e in examples if e) if examples else "no templates"


def _no_family_message(denoiser: Mapping[tuple[str, bool], ModuleWeights], sets: list[frozenset[str]]) -> str:
    counts: dict[str, int] = {}
    for s in sets:
        for n in s:
            counts[n] = counts.get(n, 0) + 1
    keys = list(denoiser)
    if not counts:
        return f"module {keys[0][0]!r} belongs to no known model family (see `wsa info --families`)"
    best = max(_order(), key=lambda n: counts.get(n, 0))
    fam = FAMILIES.get(best)
    unknown = [k[0] for k, s in zip(keys, sets, strict=True) if best not in s]
    more = f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""
    return (
        f"module {unknown[0]!r}{more} is not a {fam.title} module, though {counts[best]} of {len(keys)} are "
        f"({_expected(fam)})"
    )


def take_rows(mod: ModuleWeights, rows: list[tuple[int, int]]) -> ModuleWeights:
    """The module restricted to output ``rows`` (concatenated ranges): exact on ΔW.

    LoRA keeps its down factor and takes rows of the up factor (and of a bias or an output-axis DoRA
    magnitude); a LoRA whose up factor is block-diagonal over the split (sd-scripts' ``split_qkv``)
    keeps only its own rank block, as diffusers does. LoHa/LoKr have no row-split factor form, so
    their rows are taken from the dense ΔW (kind ``full``).
    """
    index = _index(rows)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[index[0] : index[1]] if isinstance(index, tuple) else t.index_select(0, index)

    n_out = sum(b - a for a, b in rows)
    tensors = dict(mod.tensors)
    if "bias" in tensors:
        tensors["bias"] = pick(tensors["bias"])
    if mod.is_dora and mod.dora_axis == "out":
        tensors["magnitude"] = pick(tensors["magnitude"])
    elif mod.is_dora:
        raise ValueError(
            "its DoRA magnitude normalises over the input axis (columns of the whole fused layer), "
            "so no split is exact; wsa reads DoRA on fused layers only with per-output-row magnitudes"
        )
    shape = (n_out, *mod.shape[1:])
    if mod.kind == "lora" and "mid" not in tensors:
        tensors["up"] = pick(tensors["up"])
        return ModuleWeights("lora", tensors, shape, mod.rank, mod.alpha, mod.scale, mod.dora_axis)
    if mod.kind == "full":
        tensors["diff"] = pick(tensors["diff"])
        return ModuleWeights("full", tensors, shape, 0, None, 1.0, mod.dora_axis)
    if any(t.device.type == "meta" for t in mod.tensors.values()):
        dense = torch.empty(shape, device="meta")  # a header-only read: shapes, no values
    else:
        dense = pick(mod.direction_delta())
    kept = {k: v for k, v in tensors.items() if k in ("bias", "magnitude")}
    return ModuleWeights("full", {"diff": dense, **kept}, shape, 0, None, 1.0, mod.dora_axis)


def _index(rows: list[tuple[int, int]]) -> tuple[int, int] | torch.Tensor:
    if len(rows) == 1:
        return rows[0]
    return torch.cat([torch.arange(a, b) for a, b in rows])


def sparse_split(parts: list[ModuleWeights], rank: int) -> list[ModuleWeights]:
    """Split modules whose up factors are zero outside their own rank block keep just that block.

    sd-scripts' ``split_qkv`` trains q, k, v as separate rank-``r/n`` LoRAs and saves them fused with a
    block-diagonal up factor; ΔW is the same either way, the rank per module is ``r/n``.
    """
    n = len(parts)
    if n < 2 or rank % n or any(p.kind != "lora" or "mid" in p.tensors or p.is_dora for p in parts):
        return parts
    if any(p.tensors["up"].device.type == "meta" for p in parts):
        return parts
    r = rank // n
    for j, p in enumerate(parts):
        up = p.tensors["up"]
        mask = torch.ones(up.shape[1], dtype=torch.bool)
        mask[j * r : (j + 1) * r] = False
        if bool(up[:, mask].ne(0).any()):
            return parts
    out = []
    for j, p in enumerate(parts):
        t = dict(p.tensors)
        t["up"] = p.tensors["up"][:, j * r : (j + 1) * r]
        t["down"] = p.tensors["down"][j * r : (j + 1) * r]
        alpha = None if p.alpha is None else p.alpha / n  # scale alpha/r unchanged: same ΔW
        out.append(ModuleWeights("lora", t, p.shape, r, alpha, p.scale, p.dora_axis))
    return out


__all__ = ["METADATA_FIELDS", "Resolved", "family_from_metadata", "normalise_arch", "resolve", "take_rows"]
