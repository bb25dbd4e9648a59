"""Safe, exact reading of one tensor file (``.safetensors``; ``.pt``/``.bin``/``.pth`` only as weights).

Why a class: format sniffers need only the header (keys, metadata) and must not read tensors;
readers then read every tensor once. Pickles are opened with ``torch.load(weights_only=True)``,
never with a fallback, so a file that smuggles code is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import math
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from wsa.errors import FormatError
from wsa.text import first_line

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
TENSOR_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class TensorFile:
    """Lazy view of a tensor file: ``keys`` and ``metadata`` from the header, ``tensors`` on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        st = regular_file(self.path)
        if self.path.suffix not in TENSOR_SUFFIXES:
            raise FormatError(f"not a tensor file (expected one of {', '.join(TENSOR_SUFFIXES)})", self.path)
        if st.st_size == 0:
            raise FormatError("file is empty", self.path)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix in SAFETENSORS_SUFFIXES

    @cached_property
    def _header(self) -> tuple[list[str], dict[str, str]]:
        if self.is_safetensors:
            entries, metadata, _ = self._safetensors_header
            try:  # the reference parser sees every file wsa reads: what it refuses, wsa refuses
                with safe_open(self.path, framework="pt") as f:
                    f.keys()
            except Exception as exc:  # safetensors raises its own error types
                raise FormatError(f"not a valid safetensors file ({first_line(exc)})", self.path) from None
            return sorted(entries), metadata
        state = self._pickle_state
        return sorted(state), {}

    @cached_property
    def _safetensors_header(self) -> tuple[dict[str, _Entry], dict[str, str], int]:
        """``({key: (dtype, shape, start, end)}, metadata, data start)``, every field checked.

        Why by hand before ``safe_open``: a truncated download, a header that is a list, a tensor
        without ``data_offsets`` or overlapping byte ranges each get a message that says so, and
        JSON nested 10⁵ deep is refused (``RecursionError``) instead of escaping as a traceback.
        """
        size = self.path.stat().st_size
        with self.path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError("truncated safetensors file (no header)", self.path)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError("truncated or corrupt safetensors file (header larger than file)", self.path)
            raw = fh.read(n)
        return (*parse_safetensors_header(raw, size - 8 - n, self.path), 8 + n)

    @cached_property
    def _pickle_state(self) -> dict[str, Tensor]:
        try:
            with warnings.catch_warnings():  # a hostile pickle's deprecation warnings are not the user's business
                warnings.simplefilter("ignore")
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except Exception as exc:
            raise FormatError(
                f"refused to load pickle with weights_only=True ({first_line(exc)}); "
                "only plain tensor dicts are read — convert it to .safetensors",
                self.path,
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise FormatError(
                f"pickle holds {type(obj).__name__}, not a dict of tensors; convert it to .safetensors",
                self.path,
            )
        out: dict[str, Tensor] = {}
        for k, v in obj.items():
            key = str(k)
            if key in out:
                raise FormatError(f"pickle has two tensors named {key[:200]!r} (keys {k!r} and another)", self.path)
            if v.dtype not in _DTYPES.values() or v.is_sparse or v.is_quantized or v.is_complex():
                raise FormatError(f"tensor {key[:200]!r} has unsupported type {v.dtype} ({v.layout})", self.path)
            out[key] = v.detach()  # a saved nn.Parameter is a tensor that requires grad
        return out

    @property
    def keys(self) -> list[str]:
        return self._header[0]

    @property
    def metadata(self) -> dict[str, str]:
        return self._header[1]

    def tensors(self) -> dict[str, Tensor]:
        """All tensors, as stored (dtype kept), each checked to be finite.

        Under :func:`header_only` a safetensors file gives ``meta`` tensors (shape and dtype, no values)
        except scalars and other tiny tensors (alphas), which are read: every reader then runs as usual,
        so a folder's families, module names and ranks come from headers alone.
        """
        if self.is_safetensors and _HEADER_ONLY.get():
            return self._read_header_tensors()
        out = self._read_safetensors() if self.is_safetensors else self._pickle_state
        _check_all_finite(out, self.path)
        return out

    def _read_header_tensors(self) -> dict[str, Tensor]:
        self.keys  # noqa: B018  (validates the header, also with safe_open)
        entries, _, base = self._safetensors_header
        out: dict[str, Tensor] = {}
        with self.path.open("rb") as fh:
            for key, (dtype, shape, start, end) in entries.items():
                count = math.prod(shape)
                if 0 < count <= _SMALL:
                    fh.seek(base + start)
                    data = fh.read(end - start)
                    if len(data) != end - start:
                        raise FormatError("file shrank while being read", self.path)
                    t = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
                    check_finite(t, key, self.path)
                    out[key] = t
                else:
                    out[key] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def _read_safetensors(self) -> dict[str, Tensor]:
        """One read of the whole file, tensors as views into it.

        Why not ``safe_open.get_tensor`` per key: a w2w-shaped LoRA has 128 small tensors, and one read
        plus views is several times faster; the header was already validated (byte ranges in bounds,
        contiguous, matching each shape) by :attr:`_safetensors_header` and ``safe_open``.
        """
        self.keys  # noqa: B018  (validates the header, also with safe_open)
        entries, _, base = self._safetensors_header
        raw = bytearray(self.path.read_bytes())
        if len(raw) < base + max((e[3] for e in entries.values()), default=0):
            raise FormatError("file shrank while being read", self.path)
        out: dict[str, Tensor] = {}
        for key, (dtype, shape, start, _end) in entries.items():
            count = math.prod(shape)
            if count == 0:
                out[key] = torch.empty(shape, dtype=dtype)
                continue
            out[key] = torch.frombuffer(raw, dtype=dtype, count=count, offset=base + start).reshape(shape)
        return out


#: One tensor's header entry: dtype, shape, byte range within the data section.
_Entry = tuple[torch.dtype, tuple[int, ...], int, int]
#: safetensors' own limit on the header's size.
MAX_HEADER_BYTES = 100_000_000


def parse_safetensors_header(raw: bytes, data_size: int, path: str | Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Check a safetensors header as the format defines it; every failure is one :class:`FormatError`.

    ``data_size`` is the number of bytes after the header: the tensors' byte ranges must tile it exactly
    (no gap, no overlap, nothing past the end), as the safetensors library requires.
    """
    try:
        header = json.loads(raw)
    except RecursionError:
        raise FormatError("corrupt safetensors file (header JSON nested too deeply)", path) from None
    except ValueError:  # UnicodeDecodeError included
        raise FormatError("corrupt safetensors file (header is not JSON)", path) from None
    if not isinstance(header, dict):
        raise FormatError(f"corrupt safetensors file (header is a JSON {type(header).__name__}, not an object)", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("corrupt safetensors file (__metadata__ must map strings to strings)", path)
    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(f"corrupt safetensors file (entry {key[:200]!r} is not an object)", path)
        name = info.get("dtype")
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise FormatError(f"tensor {key[:200]!r} has unsupported dtype {str(name)[:40]!r}", path)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
            raise FormatError(f"corrupt safetensors file (tensor {key[:200]!r}: shape must be a list of sizes)", path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise FormatError(
                f"corrupt safetensors file (tensor {key[:200]!r}: data_offsets must be [start, end])", path
            )
        start, end = offsets
        if end < start or end - start != math.prod(shape) * dtype.itemsize:
            raise FormatError(f"tensor {key[:200]!r}: byte range does not match shape {tuple(shape)}", path)
        entries[key] = (dtype, tuple(shape), start, end)
    at = 0
    for key, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != at:
            what = "overlap" if start < at else "leave a gap"
            raise FormatError(f"corrupt safetensors file (tensor {key[:200]!r}: byte ranges {what})", path)
        at = end
    if at > data_size:
        raise FormatError(f"truncated safetensors file ({data_size} data bytes, header promises {at})", path)
    if at < data_size:
        raise FormatError(f"corrupt safetensors file ({data_size - at} bytes after the last tensor)", path)
    return entries, metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def regular_file(path: Path) -> os.stat_result:
    """``stat`` of a plain file, or a :class:`FormatError` saying what the path is instead.

    Why: a FIFO would block the first read forever; a symlink loop, a dangling link or an unreadable
    folder would surface as a bare ``OSError``. Each gets its own one-line reason.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        reason = "broken symlink (points to a missing file)" if path.is_symlink() else "no such file"
        raise FormatError(reason, path) from None
    except OSError as exc:
        reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot read ({exc.strerror or exc})"
        raise FormatError(reason, path) from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        )
        raise FormatError(kind, path)
    return st


#: Tensors with at most this many values are read even under :func:`header_only` (alphas, scalars).
_SMALL = 16
_HEADER_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("wsa_header_only", default=False)


@contextlib.contextmanager
def header_only() -> Iterator[None]:
    """Inside this block (in this thread), safetensors files are read from their headers alone."""
    token = _HEADER_ONLY.set(True)
    try:
        yield
    finally:
        _HEADER_ONLY.reset(token)


def reading_headers_only() -> bool:
    """Is this thread inside :func:`header_only`?"""
    return _HEADER_ONLY.get()


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


#: Exponent bits of each float format: a value is NaN or ±Inf exactly when all of them are set.
_EXPONENT = {
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80),
    torch.float16: (torch.int16, np.uint16, 0x7C00),
    torch.float32: (torch.int32, np.uint32, 0x7F800000),
    torch.float64: (torch.int64, np.uint64, 0x7FF0000000000000),
}
_CHUNK = 1 << 22


def _has_nonfinite(t: Tensor) -> bool:
    """Any NaN/Inf in ``t``, from the exponent bits (exact, no float conversion: bf16 files are read as is)."""
    spec = _EXPONENT.get(t.dtype)
    if spec is None:
        return not math.isfinite(_np_sum(t))
    as_int, as_uint, mask = spec
    bits = t.detach().contiguous().reshape(-1).view(as_int).numpy().view(as_uint)
    mask = as_uint(mask)
    return any(np.any((bits[i : i + _CHUNK] & mask) == mask) for i in range(0, bits.size, _CHUNK))


def _check_all_finite(tensors: dict[str, Tensor], path: str | Path) -> None:
    """Every float tensor checked by its exponent bits (a few ms per 10 M values); a failure names the tensor."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and _has_nonfinite(t):
            check_finite(t, key, path)


def check_finite(t: Tensor, key: str, path: str | Path) -> None:
    if not t.is_floating_point() or not t.numel() or not _has_nonfinite(t):
        return
    values = t.detach().to(torch.float64).numpy()
    if not np.isfinite(values).all():
        bad = "NaN" if np.isnan(values).any() else "Inf"
        raise FormatError(f"tensor {key!r} contains {bad} values", path)


def _np_sum(t: Tensor) -> float:
    # numpy, single-threaded: torch's CPU reductions stall for milliseconds when the cores are busy.
    values = t.detach().numpy() if t.dtype in (torch.float32, torch.float64, torch.float16) else t.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        return float(values.sum(dtype=np.float64))


def _is_zip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"PK\x03\x04"
