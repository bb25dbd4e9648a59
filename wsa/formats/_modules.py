"""Shared by every reader: split keys into (module, part) by an explicit suffix table, and build
:class:`~wsa.adapter.ModuleWeights` from the parts. Every key must be consumed or the load fails.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping

from torch import Tensor

try:  # the regex parser behind ``re`` (Python 3.11+ names; sre_parse before)
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants  # type: ignore[no-redef]
    import sre_parse as _sre_parser  # type: ignore[no-redef]

from wsa.adapter import Adapter, ModuleWeights, lora_scale
from wsa.errors import FormatError
from wsa.families.names import natural_key


def split_keys(keys: list[str], suffixes: Mapping[str, str], path: object) -> dict[str, dict[str, str]]:
    """Group file keys by module: ``{module: {part: key}}``, using the longest matching suffix.

    Raises a :class:`FormatError` naming the first keys no suffix matches.
    """
    ordered = sorted(suffixes, key=len, reverse=True)
    modules: dict[str, dict[str, str]] = {}
    leftovers: list[str] = []
    for key in keys:
        for suffix in ordered:
            if key.endswith(suffix) and len(key) > len(suffix):
                module, part = key[: -len(suffix)], suffixes[suffix]
                if part in modules.setdefault(module, {}):
                    raise FormatError(f"module {module!r} has two {part!r} tensors", path)
                modules[module][part] = key
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise FormatError(f"unexpected keys {_show(leftovers)}: not part of any adapter algorithm wsa reads", path)
    if not modules:
        raise FormatError("file holds no adapter tensors", path)
    if len(modules) > MAX_MODULES:
        raise FormatError(f"{len(modules)} modules: more than any model has (at most {MAX_MODULES})", path)
    return modules


#: Modules one file may hold: a full Flux.1 LoRA with both text encoders has ~1,100; naming a family for each
#: module costs ~1 ms, so this also bounds the time one file can take.
MAX_MODULES = 10_000


def _show(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in sorted(keys)[:n]) + more


_CONV3_LEAVES = {"conv1", "conv2", "conv", "conv_in", "conv_out"}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out")
_CONV1_LEAVES = {"conv_shortcut"}


def infer_shape(
    name: str, out_features: int, cols: int, base_shapes: Mapping[str, tuple[int, ...]] | None
) -> tuple[int, ...]:
    """Base weight shape of a module whose factors flatten a conv kernel into ``cols = in·kh·kw``.

    With ``base_shapes`` (from a base model) this is exact; otherwise the SD/SDXL convention
    applies: resnet/sampler/in/out convs are 3×3, resnet ``conv_shortcut`` is 1×1, everything else
    is taken as Linear. ``proj_in``/``proj_out`` are 1×1 convs in SD 1.x but Linear in SDXL, so
    without ``base_shapes`` their LoHa/LoKr ΔW comes back 2-D (same values, ``out × in``).
    """
    if base_shapes and name in base_shapes:
        return tuple(base_shapes[name])
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _CONV3_LEAVES and cols % 9 == 0:
        return (out_features, cols // 9, 3, 3)
    if leaf in _CONV1_LEAVES:
        return (out_features, cols, 1, 1)
    return (out_features, cols)


def build_module(
    name: str,
    parts: Mapping[str, Tensor],
    *,
    alpha: float | None,
    path: object,
    rslora: bool = False,
    lokr_full_means_scale_one: bool = True,
    dora_axis: str | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ModuleWeights:
    """Recognise the algorithm from the parts present, check shapes, apply the scale rule.

    LoHa and LoKr parts arrive as ``hada_<part>`` / ``lokr_<part>`` because both algorithms have
    ``w1_a, w1_b, w2_a, w2_b`` (a LoKr with ``decompose_both`` has exactly LoHa's part set); the
    prefix is what tells them apart, and is dropped in the returned :class:`ModuleWeights`.
    """
    _check_parts(name, parts, alpha, path)
    keys = set(parts) - {"bias", "magnitude"}
    hada = {k.removeprefix("hada_") for k in keys if k.startswith("hada_")}
    lokr = {k.removeprefix("lokr_") for k in keys if k.startswith("lokr_")}
    tensors = {k.removeprefix("hada_").removeprefix("lokr_"): v for k, v in parts.items()}
    try:
        if keys <= {"down", "up", "mid"} and {"down", "up"} <= keys:
            mod = _lora(name, tensors, alpha, rslora)
        elif hada and len(hada) == len(keys) and _complete_loha(hada):
            mod = _loha(name, tensors, alpha, base_shapes)
        elif lokr and len(lokr) == len(keys) and _complete_lokr(lokr):
            mod = _lokr(name, tensors, alpha, lokr_full_means_scale_one, base_shapes)
        elif keys == {"diff"}:
            diff = tensors["diff"]
            mod = ModuleWeights("full", tensors, tuple(diff.shape), 0, None, 1.0)
        else:
            raise FormatError(f"module {name!r} has an incomplete or mixed set of parts {sorted(parts)}", path)
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        raise FormatError(f"module {name!r}: inconsistent factor shapes ({exc})", path) from None
    if math.prod(mod.shape) > MAX_MODULE_VALUES:
        raise FormatError(
            f"module {name!r}: its ΔW would be {'×'.join(map(str, mod.shape))} values, larger than any model's layer",
            path,
        )
    if "magnitude" in tensors:
        axis = dora_axis or ("out" if tensors["magnitude"].shape[0] == mod.shape[0] else "in")
        mod = ModuleWeights(mod.kind, tensors, mod.shape, mod.rank, mod.alpha, mod.scale, axis)  # type: ignore[arg-type]
    _check_product(name, mod, path)
    return mod


#: |alpha| accepted (0 aside): real ones are 0.1 … 10⁴. Outside, the scale is a poison, not a setting: an alpha of
#: 1e-45 as a collection's reference scale would make every other file's rescaled factors overflow.
ALPHA_RANGE = (1e-6, 1e6)
#: Largest ΔW (values) one module may describe: 2²⁷ is ~2× the largest layer of any 2026 DiT (Wan 2.x's 5120×13824).
#: Why a cap: LoHa/LoKr factors of a few kB can claim a ΔW of terabytes (checking it forms it, in float64).
MAX_MODULE_VALUES = 1 << 27

#: Dimensions each factor may have: 2 (Linear), 4 (Conv2d), 5 (Conv3d, e.g. Wan's patch embedding), 1 (biases, DoRA).
_FACTOR_DIMS = {"bias": (1,), "magnitude": (1, 2, 4, 5)}


def _check_parts(name: str, parts: Mapping[str, Tensor], alpha: float | None, path: object) -> None:
    """Refuse what no trainer writes and no loader applies: integer or bool factors, 0-D/1-D/3-D factor
    matrices, rank 0, a non-finite alpha. Why here: every reader builds its modules through this function."""
    if alpha is not None and not math.isfinite(alpha):
        raise FormatError(f"module {name!r}: alpha {alpha} is not finite", path)
    if alpha is not None and alpha != 0 and not ALPHA_RANGE[0] <= abs(alpha) <= ALPHA_RANGE[1]:
        raise FormatError(
            f"module {name!r}: alpha {alpha:.4g} is outside any trainer's range "
            f"({ALPHA_RANGE[0]:g} to {ALPHA_RANGE[1]:g} in magnitude)",
            path,
        )
    for part, t in parts.items():
        if not t.is_floating_point():
            raise FormatError(
                f"module {name!r}: {part} tensor is {str(t.dtype).removeprefix('torch.')}, not float", path
            )
        dims = _FACTOR_DIMS.get(part, (2, 4, 5))
        if part != "diff" and t.dim() not in dims:
            raise FormatError(f"module {name!r}: {part} tensor has shape {tuple(t.shape)} ({t.dim()}-D)", path)
        if part in {"down", "up", "w1_a", "w1_b", "w2_a", "w2_b"} and 0 in t.shape:
            raise FormatError(f"module {name!r}: {part} tensor has shape {tuple(t.shape)} (rank 0 or empty)", path)
        if part == "diff" and (t.dim() == 0 or t.numel() == 0):
            raise FormatError(f"module {name!r}: diff tensor has shape {tuple(t.shape)}", path)


def _complete_loha(parts: set[str]) -> bool:
    return parts in ({"w1_a", "w1_b", "w2_a", "w2_b"}, {"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"})


def _complete_lokr(parts: set[str]) -> bool:
    w1 = parts & {"w1", "w1_a", "w1_b"}
    w2 = parts & {"w2", "w2_a", "w2_b", "t2"}
    return (
        w1 in ({"w1"}, {"w1_a", "w1_b"})
        and w2 in ({"w2"}, {"w2_a", "w2_b"}, {"w2_a", "w2_b", "t2"})
        and parts == w1 | w2
    )


def _lora(name: str, t: dict[str, Tensor], alpha: float | None, rslora: bool) -> ModuleWeights:
    down, up = t["down"], t["up"]
    unet_conv = name.startswith(_UNET_ROOTS) and name.rsplit(".", 1)[-1] in _CONV3_LEAVES
    if unet_conv and down.dim() == 2 and up.dim() == 2 and "mid" not in t and down.shape[1] % 9 == 0:
        # ComfyUI's trainer stores a UNet 3×3 conv's LoRA Linear-shaped (down r × in·9) and reshapes it to the
        # kernel when applying; kohya's LoCon stores the same kernel 4-D: one module shape for both.
        t = {**t, "down": down.reshape(down.shape[0], down.shape[1] // 9, 3, 3), "up": up[:, :, None, None]}
        down, up = t["down"], t["up"]
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"up {tuple(up.shape)} does not match down {tuple(down.shape)}")
    if any(d != 1 for d in up.shape[2:]):
        raise ValueError(f"up {tuple(up.shape)} must be out × rank (× 1 × 1 for a conv)")
    if up.dim() > 2 and up.dim() != down.dim():
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} have different numbers of dimensions")
    if "mid" in t:
        mid = t["mid"]
        if down.dim() != 4 or mid.dim() != 4 or mid.shape[:2] != (rank, rank) or any(d != 1 for d in down.shape[2:]):
            raise ValueError(f"mid {tuple(mid.shape)} must be rank × rank × kh × kw with down rank × in × 1 × 1")
    if "mid" in t:
        shape: tuple[int, ...] = (up.shape[0], down.shape[1], *t["mid"].shape[2:])
    elif down.dim() > 2:  # Conv2d / Conv3d (Wan's patch embedding)
        shape = (up.shape[0], *down.shape[1:])
    else:
        shape = (up.shape[0], down.shape[1])
    return ModuleWeights("lora", t, shape, rank, alpha, lora_scale(alpha, rank, rslora))


def _loha(name: str, t: dict[str, Tensor], alpha: float | None, base_shapes) -> ModuleWeights:
    rank = t["w1_b"].shape[0]
    if "t1" in t:  # Tucker: w1_a is r × out, w1_b is r × in
        shape: tuple[int, ...] = (t["w1_a"].shape[1], t["w1_b"].shape[1], *t["t1"].shape[2:])
    else:
        shape = infer_shape(name, t["w1_a"].shape[0], t["w1_b"].shape[1], base_shapes)
    return ModuleWeights("loha", t, shape, rank, alpha, lora_scale(alpha, rank))


def _lokr(name: str, t: dict[str, Tensor], alpha: float | None, full_means_one: bool, base_shapes) -> ModuleWeights:
    def dims(which: str) -> tuple[int, ...]:
        if which in t:
            return tuple(t[which].shape)
        a, b = t[f"{which}_a"], t[f"{which}_b"]
        if which == "w2" and "t2" in t:
            return (a.shape[1], b.shape[1], *t["t2"].shape[2:])
        return (a.shape[0], b.shape[1])

    d1, d2 = dims("w1"), dims("w2")
    decomposed = [t[k].shape[0] for k in ("w1_b", "w2_b") if k in t]
    rank = decomposed[0] if decomposed else 0
    if len(d2) == 4:
        shape: tuple[int, ...] = (d1[0] * d2[0], d1[1] * d2[1], *d2[2:])
    else:
        shape = infer_shape(name, d1[0] * d2[0], d1[1] * d2[1], base_shapes)
    # LyCORIS and ComfyUI: with both Kronecker factors full, alpha is ignored (scale 1); PEFT always alpha/r.
    scale = 1.0 if (not decomposed and full_means_one) else lora_scale(alpha, rank or 1)
    return ModuleWeights("lokr", t, shape, rank, alpha, scale)


def _check_product(name: str, mod: ModuleWeights, path: object) -> None:
    if mod.kind == "lora":
        return
    if any(t.device.type == "meta" for t in mod.tensors.values()):
        return  # a header-only read: shapes were checked when the parts were built
    if mod.kind != "full" and "bias" not in mod.tensors:
        try:
            mod.direction_delta()
        except (RuntimeError, ValueError) as exc:
            raise FormatError(f"module {name!r}: factors do not form a {mod.shape} delta ({exc})", path) from None


def unscaled_bias(mod: ModuleWeights) -> ModuleWeights:
    """A ``.diff_b`` beside LoRA factors is the bias change itself (ComfyUI adds it as its own patch, unscaled).

    :meth:`~wsa.adapter.Adapter.bias_delta` scales a factor module's bias like PEFT's ``lora_B.bias``
    (by ``scale``), so the stored bias is divided by the scale here (in float64): the bias change
    comes out as the file's ``diff_b``.
    """
    if "bias" not in mod.tensors or mod.kind == "full" or mod.scale in (0.0, 1.0):
        return mod
    tensors = dict(mod.tensors)
    bias = tensors["bias"]
    tensors["bias"] = bias if bias.device.type == "meta" else (bias.double() / mod.scale).float()
    return ModuleWeights(mod.kind, tensors, mod.shape, mod.rank, mod.alpha, mod.scale, mod.dora_axis)


def read_alpha(t: Tensor, key: str, path: object) -> float:
    """A stored ``.alpha`` scalar as a Python float (formats.md pitfall 4: ``.item()`` before dividing)."""
    if t.numel() != 1:
        raise FormatError(f"alpha tensor {key!r} has {t.numel()} values, expected 1", path)
    value = float(t.float().item())
    if not math.isfinite(value):
        raise FormatError(f"alpha tensor {key!r} is not finite", path)
    return value


def make_adapter(
    path: object,
    fmt: str,
    modules: Mapping[str, ModuleWeights],
    metadata: Mapping[str, str],
) -> Adapter:
    """An adapter whose module names are canonical already (datasets; see :func:`assemble` for files)."""
    ordered = {k: modules[k] for k in sorted(modules, key=natural_key)}
    return Adapter(str(path), fmt, ordered, dict(metadata))


#: kohya-style text-encoder prefixes when the family names none (SD's convention).
DEFAULT_TEXT_ENCODERS = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}


def assemble(
    path: object,
    fmt: str,
    *,
    denoiser: Mapping[tuple[str, bool], ModuleWeights],
    metadata: Mapping[str, str],
    text_encoders: Mapping[str, ModuleWeights] | None = None,
    tagged_text_encoders: Mapping[tuple[str, str], ModuleWeights] | None = None,
) -> Adapter:
    """The adapter of one file: the family decided and denoiser modules renamed (:func:`wsa.families.resolve`).

    ``denoiser`` holds the denoiser's modules as spelled (``(path, underscored)``); ``text_encoders`` are
    already canonical (``text_encoder.<path>``); ``tagged_text_encoders`` are ``(kohya prefix, dotted
    path)`` pairs whose component the family decides (sd-scripts' ``lora_te3_`` is T5: ``text_encoder_2``
    for Flux, ``text_encoder_3`` for SD3).
    """
    from wsa.families import FAMILIES, resolve
    from wsa.families.names import canonical_text_encoder_path

    res = resolve(denoiser, metadata=metadata, path=path)
    modules: dict[str, ModuleWeights] = dict(res.modules)
    table = dict(DEFAULT_TEXT_ENCODERS)
    if res.family:
        table.update(FAMILIES.get(res.family).text_encoders)
    extra = dict(text_encoders or {})
    for (prefix, dotted), mod in (tagged_text_encoders or {}).items():
        component = table.get(prefix)
        if component is None:
            raise FormatError(f"text-encoder prefix {prefix!r} means nothing for family {res.family or '?'}", path)
        name = f"{component}.{canonical_text_encoder_path(dotted)}"
        if name in extra:
            raise FormatError(f"module {name!r} appears twice under different spellings", path)
        extra[name] = mod
    for name, mod in extra.items():
        if name in modules:
            raise FormatError(f"module {name!r} appears twice under different spellings", path)
        modules[name] = mod
    ordered = {k: modules[k] for k in sorted(modules, key=natural_key)}
    source = res.source + (
        f" (also fit: {', '.join(res.candidates)})" if res.candidates and "also" not in res.source else ""
    )
    return Adapter(str(path), fmt, ordered, dict(metadata), res.family, source, res.notes, res.candidates)


def checked_lora_config(config: Mapping[str, object], path: object) -> dict:
    """A PEFT ``LoraConfig``/``LoKrConfig`` dict (``adapter_config.json``, diffusers' ``lora_adapter_metadata``)
    with the fields that set the scale checked and typed: ``r``, ``lora_alpha``/``alpha`` (peft's default 8
    where absent), ``rank_pattern``/``alpha_pattern`` (keys checked by :func:`check_pattern`), ``use_rslora``.

    Why: the scale comes from these, so they are input like the weights; a NaN, a string or a hostile regex
    is one :class:`FormatError` naming the field, never a NaN row or a traceback.
    """
    out = dict(config)
    out["r"] = _rank(config.get("r", 8), "r", path)
    for key in ("lora_alpha", "alpha"):
        out[key] = _alpha(config.get(key, 8), key, path)
    for key, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise FormatError(f"{key} must be an object of module pattern -> value", path)
        out[key] = {str(k): check(v, f"{key}[{str(k)[:60]!r}]", path) for k, v in patterns.items()}
        for pattern in out[key]:
            check_pattern(pattern, path, key)
    rslora = config.get("use_rslora", False)
    if rslora is not None and not isinstance(rslora, bool):
        raise FormatError(f"use_rslora must be true or false, not {str(rslora)[:40]!r}", path)
    out["use_rslora"] = bool(rslora)
    return out


def _rank(value: object, field: str, path: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
        raise FormatError(f"{field} must be a positive integer rank, not {str(value)[:40]!r}", path)
    return value


def _alpha(value: object, field: str, path: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{field} must be a finite number, not {str(value)[:40]!r}", path)
    if value != 0 and not ALPHA_RANGE[0] <= abs(value) <= ALPHA_RANGE[1]:
        raise FormatError(f"{field} {value:.4g} is outside any trainer's range ({ALPHA_RANGE[1]:g} at most)", path)
    return float(value)


def pattern_value(patterns: Mapping[str, object], module: str, path: object, field: str) -> object | None:
    r"""PEFT ``rank_pattern``/``alpha_pattern`` lookup, with peft's rule, in bounded time.

    peft matches ``re.match(rf"(.*\.)?({key})$", module)``: the key must match the whole name or a dotted
    suffix of it. Both the keys and the names come from the same (possibly hostile) file, so the key is
    checked by :func:`check_pattern` (no nested or alternating repetition, which backtracks exponentially)
    and matched with ``fullmatch`` against each dotted suffix: the same answer without the backtracking
    prefix ``(.*\.)?``.
    """
    if patterns and len(module) > MAX_MATCHED_NAME:
        raise FormatError(f"module name {module[:60]!r}... is too long to match against {field}", path)
    starts = [0] + [i + 1 for i, c in enumerate(module) if c == "."]
    for key, value in patterns.items():
        compiled = check_pattern(key, path, field)
        if any(compiled.fullmatch(module, start) for start in starts if "\n" not in module[:start]):
            return value
    return None


#: The longest ``rank_pattern``/``alpha_pattern`` key accepted (real ones are module names, < 200 characters).
MAX_PATTERN = 1000
#: The longest module name matched against patterns (real ones are < 200): with at most
#: :data:`MAX_REPEATS` repetitions, one lookup then stays well under a second.
MAX_MATCHED_NAME = 512
#: Repetitions (``*``, ``+``, ``{m,n}``) allowed in one key: each one multiplies the backtracking by the name's length.
MAX_REPEATS = 2


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> re.Pattern[str] | str:
    """The compiled key, or why it is refused (cached: every module of every file asks again)."""
    if len(key) > MAX_PATTERN:
        return f"is longer than {MAX_PATTERN} characters"
    try:
        compiled = re.compile(key)
        tree = _sre_parser.parse(key)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regular expression ({exc})"
    risk = _risky(list(tree), False)
    repeats = sum(
        1
        for op, av in _flatten(list(tree))
        if op in (_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT) and av[1] > 1
    )
    if not risk and repeats > MAX_REPEATS:
        risk = f"more than {MAX_REPEATS} repetitions"
    if risk:
        return f"is a regular expression wsa will not run ({risk} can take exponential time); list module names"
    return compiled


def check_pattern(key: str, path: object, field: str) -> re.Pattern[str]:
    """``key`` compiled, or a :class:`FormatError` naming the field and the key."""
    got = _compiled(key)
    if isinstance(got, str):
        raise FormatError(f"{field} key {key[:80]!r} {got}", path)
    return got


def _risky(items: list, repeated: bool) -> str | None:
    """The first construct in a parsed regex that backtracks super-linearly, or None.

    Refused: a repetition inside a repetition (``(a+)+``), alternation inside a repetition (``(a|aa)*``),
    backreferences. Everything else (literals, classes, one level of ``*``/``+``/``{m,n}``) runs in time
    polynomial in the name's length; :func:`_compiled` caps the degree (the number of repetitions) and
    :func:`pattern_value` the length.
    """
    c = _sre_constants
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            _lo, hi, body = av
            many = hi > 1
            if many and repeated:
                return "a repetition inside a repetition"
            if many and any(o == c.BRANCH for o, _ in _flatten(list(body))):
                return "alternation inside a repetition"
            found = _risky(list(body), repeated or many)
        elif op == c.SUBPATTERN:
            found = _risky(list(av[-1]), repeated)
        elif op == c.BRANCH:
            found = next((r for b in av[1] if (r := _risky(list(b), repeated))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _risky(list(av[1]), repeated)
        elif op == getattr(c, "ATOMIC_GROUP", None):
            found = _risky(list(av), repeated)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            found = "a backreference"
        else:
            found = None
        if found:
            return found
    return None


def _flatten(items: list) -> list:
    """Every (op, arg) of a parsed regex, nested groups included."""
    c = _sre_constants
    out = []
    for op, av in items:
        out.append((op, av))
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            out += _flatten(list(av[2]))
        elif op == c.SUBPATTERN:
            out += _flatten(list(av[-1]))
        elif op == c.BRANCH:
            for b in av[1]:
                out += _flatten(list(b))
        elif op in (c.ASSERT, c.ASSERT_NOT):
            out += _flatten(list(av[1]))
    return out


RenameFn = Callable[[str], str]
