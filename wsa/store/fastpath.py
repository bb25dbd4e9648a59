"""Ingest fast path: PEFT files whose headers repeat a known one are copied into rows without parsing.

Why: a zoo (w2w's 65k folders, ``wsa world zoo``) writes every adapter with the same
``adapter_config.json`` and the same safetensors header — same keys, dtypes, shapes and byte offsets;
only the numbers differ. The general reader builds an :class:`~wsa.adapter.Adapter` per file (name
canonicalisation, module objects, torch tensors), which made ingest CPU-bound at ~0.2× the disk's
rate. Here the first file with a given (config, header) pair goes through the general reader, and
its row is used to *verify* a byte-range → row-column map derived from the header; every later file
with byte-identical config and header is one read, a few ``numpy`` copies and a vectorised finiteness
check. Anything else (another header, another format or representation, a failed verification) takes
the general path, so the store is the same either way (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsa.store.layout import Layout

_DTYPES = {"F32": np.float32, "F16": np.float16}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
_lock = threading.Lock()
_DISABLED = os.environ.get("WSA_INGEST_FASTPATH", "1") == "0"  # for benchmarks and bug hunts
_templates: dict[tuple, _Template | None] = {}
_layouts: dict[int, tuple[Layout, bool, int]] = {}  # id → (the layout itself, so an id is never reused, facts)


@dataclass(frozen=True)
class _Template:
    copies: tuple[tuple[int, int, np.dtype, int, int], ...]  # (file begin, file end, dtype, row begin, row end)
    header_size: int
    gather: np.ndarray | None  # all-F32 files: row = data-as-float32[gather], one vectorised copy
    segment_starts: np.ndarray  # row offsets of every part, ascending (the parts tile the row)
    rank1: tuple[tuple[int, int, float], ...]  # rank-1 modules in layout order: (up segment, down segment, scale)
    general: tuple[tuple[int, int, int, int, int, float], ...]  # else: (up off, up size, down off, down size, r, scale)
    data_end: int  # bytes a file must have
    family: str = ""  # from the verifying file: one (config, header) pair has one family and metadata
    training: tuple[tuple[str, object], ...] = ()


def _read(path: Path) -> tuple[bytes, int] | None:
    data = path.read_bytes()
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        return None
    return data, n


def _plain_lora_layout(layout: Layout) -> bool:
    return layout.repr == "raw" and all(
        m.kind == "lora" and {p.name for p in m.parts} == {"down", "up"} and m.dora_axis is None for m in layout.modules
    )


def _build_template(header: dict, layout: Layout, header_size: int, norm_names: list[str]) -> _Template | None:
    columns = {(m.name, p.name): p for m in layout.modules for p in m.parts}
    copies = []
    seen = set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        match = _KEY.match(key)
        dtype = _DTYPES.get(info.get("dtype"))
        if match is None or dtype is None:
            return None
        part = columns.get((match["module"], "down" if match["part"] == "A" else "up"))
        if part is None or int(np.prod(info["shape"])) != part.size:
            return None
        begin, end = info["data_offsets"]
        copies.append(
            (8 + header_size + begin, 8 + header_size + end, np.dtype(dtype), part.offset, part.offset + part.size)
        )
        seen.add((match["module"], match["part"]))
    if len(seen) != len(columns):
        return None
    by_name = {m.name: m for m in layout.modules}
    if sorted(norm_names) != sorted(by_name):
        return None
    starts = sorted(p.offset for m in layout.modules for p in m.parts)
    segment = {offset: i for i, offset in enumerate(starts)}
    parts = [(by_name[name], {p.name: p for p in by_name[name].parts}) for name in norm_names]
    if all(m.rank == 1 for m, _ in parts):
        rank1 = [(segment[p["up"].offset], segment[p["down"].offset], float(m.scale)) for m, p in parts]
        general = []
    else:
        rank1 = []
        general = [
            (p["up"].offset, p["up"].size, p["down"].offset, p["down"].size, m.rank, float(m.scale)) for m, p in parts
        ]
    gather = None
    data_start = 8 + header_size
    if all(dtype == np.float32 for _, _, dtype, _, _ in copies) and data_start % 4 == 0:
        n_features = sum(r1 - r0 for _, _, _, r0, r1 in copies)
        gather = np.empty(n_features, dtype=np.intp)
        for begin, _end, _, r0, r1 in copies:
            first = (begin - data_start) // 4
            gather[r0:r1] = np.arange(first, first + (r1 - r0))
    return _Template(
        copies=tuple(copies),
        header_size=header_size,
        gather=gather,
        segment_starts=np.asarray(starts, dtype=np.intp),
        rank1=tuple(rank1),
        general=tuple(general),
        data_end=max((end for _, end, _, _, _ in copies), default=data_start),
    )


def _norm(row: np.ndarray, template: _Template) -> float:
    """``representations.delta_norm`` of the row's adapter, with bit-identical float64 arithmetic.

    Rank-1 modules (every w2w-style zoo): all sums of squares in one ``reduceat`` over the row, then
    ``s²·(‖b‖²·‖a‖²)`` accumulated in layout order exactly as the general reader does per module.
    """
    total = 0.0
    if template.rank1:
        sums = np.add.reduceat(np.square(row.astype(np.float64)), template.segment_starts).tolist()
        for up, down, scale in template.rank1:
            total += scale**2 * (sums[up] * sums[down])
    for up_off, up_size, down_off, down_size, r, scale in template.general:
        b = row[up_off : up_off + up_size].astype(np.float64).reshape(-1, r)
        a = row[down_off : down_off + down_size].astype(np.float64).reshape(r, -1)
        total += scale**2 * float(np.sum((b.T @ b) * (a @ a.T)))
    return float(np.sqrt(max(total, 0.0)))


def _apply(data: bytes, template: _Template, n_features: int) -> np.ndarray:
    if template.gather is not None:
        start = 8 + template.header_size
        values = np.frombuffer(data, dtype=np.float32, count=(template.data_end - start) // 4, offset=start)
        return values[template.gather]
    row = np.empty(n_features, dtype=np.float32)
    for begin, end, dtype, r0, r1 in template.copies:
        row[r0:r1] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
    return row


def _layout_facts(layout: Layout) -> tuple[bool, int]:
    """(plain raw LoRA?, hash of what a template depends on), computed once per layout object."""
    with _lock:
        cached = _layouts.get(id(layout))
    if cached is not None and cached[0] is layout:
        return cached[1], cached[2]
    plain = _plain_lora_layout(layout)
    key = hash(tuple((m.name, m.scale, tuple((p.name, p.offset, p.shape) for p in m.parts)) for m in layout.modules))
    with _lock:
        if len(_layouts) > 64:
            _layouts.clear()
        _layouts[id(layout)] = (layout, plain, key)
    return plain, key


def _fast(src, config: bytes, data: bytes, template: _Template, layout: Layout) -> tuple[dict, np.ndarray] | None:
    if len(data) < template.data_end:
        return None  # truncated: the general reader says so
    row = _apply(data, template, layout.n_features)
    if not np.isfinite(row).all():
        return None  # the general reader names the tensor and the problem
    # The bytes already read, in the files' order: the digest ``builder._hash_files`` gives, without re-reading.
    digest = hashlib.sha256(config)
    digest.update(data)
    facts = {
        "id": src.id,
        "source": str(src.path),
        "files": src.fingerprint(),
        "row": None,
        "sha256": digest.hexdigest(),
        "format": "peft",
        "family": template.family,
        "training": dict(template.training),
        "kinds": ["lora"],
        "n_params": int(layout.n_features),
        "delta_norm": round(_norm(row, template), 9),
    }
    return facts, row


def encode_fast(src, layout: Layout, slow) -> tuple[dict, np.ndarray | None] | None:
    """``(facts, row)`` by the fast path, or None when it does not apply (the caller then reads normally).

    ``slow(src)`` is the general path; it is called (and its result returned) for the first file of each
    new (config, header) pair, and the template is kept only if it reproduces that file's row and facts
    exactly.
    """
    if _DISABLED or src.row is not None or len(src.files) != 2:
        return None
    plain, layout_key = _layout_facts(layout)
    if not plain:
        return None
    config_path, weights_path = src.files
    if config_path.name != "adapter_config.json" or weights_path.suffix != ".safetensors":
        return None
    try:
        config_bytes = config_path.read_bytes()
        got = _read(weights_path)
    except OSError:
        return None
    if got is None:
        return None
    data, header_size = got
    key = (layout_key, config_bytes, data[8 : 8 + header_size])
    with _lock:
        known = key in _templates
        template = _templates.get(key)
    if known:
        return None if template is None else _fast(src, config_bytes, data, template, layout)
    facts, row = slow(src)
    candidate = None
    if row is not None:
        try:
            header = json.loads(data[8 : 8 + header_size])
            candidate = _build_template(header, layout, header_size, [m.name for m in layout.modules])
        except (ValueError, KeyError, TypeError):
            candidate = None
        if candidate is not None:
            training = tuple(sorted(facts.get("training", {}).items()))
            candidate = dataclasses.replace(candidate, family=facts.get("family", ""), training=training)
            check = _fast(src, config_bytes, data, candidate, layout)
            if check is None or check[0] != facts or not np.array_equal(check[1], np.asarray(row, np.float32)):
                candidate = None
    with _lock:
        if len(_templates) > 64:  # a long-lived worker: forget old collections
            _templates.clear()
        _templates[key] = candidate
    return facts, row
