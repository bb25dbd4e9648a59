"""Safe, exact reading of one tensor file (``.safetensors``; ``.pt``/``.bin``/``.pth`` only as weights).

Why a class: format sniffers need only the header (keys, metadata) and must not read tensors;
readers then read every tensor once. Pickles are opened with ``torch.load(weights_only=True)``,
never with a fallback, so a file that smuggles code is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from wsa.errors import FormatError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
TENSOR_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class TensorFile:
    """Lazy view of a tensor file: ``keys`` and ``metadata`` from the header, ``tensors`` on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError("no such file", self.path)
        if self.path.suffix not in TENSOR_SUFFIXES:
            raise FormatError(f"not a tensor file (expected one of {', '.join(TENSOR_SUFFIXES)})", self.path)
        if self.path.stat().st_size == 0:
            raise FormatError("file is empty", self.path)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix in SAFETENSORS_SUFFIXES

    @cached_property
    def _header(self) -> tuple[list[str], dict[str, str]]:
        if self.is_safetensors:
            self._check_safetensors_size()
            try:
                with safe_open(self.path, framework="pt") as f:
                    return sorted(f.keys()), dict(f.metadata() or {})
            except Exception as exc:  # safetensors raises its own error types
                raise FormatError(f"not a valid safetensors file ({_one_line(exc)})", self.path) from None
        state = self._pickle_state
        return sorted(state), {}

    def _check_safetensors_size(self) -> None:
        # Checked by hand so a truncated download gets a message that says so.
        size = self.path.stat().st_size
        with self.path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError("truncated safetensors file (no header)", self.path)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise FormatError("truncated or corrupt safetensors file (header larger than file)", self.path)
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                raise FormatError("corrupt safetensors file (header is not JSON)", self.path) from None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        if ends and 8 + n + max(ends) > size:
            raise FormatError(
                f"truncated safetensors file ({size} bytes, header promises {8 + n + max(ends)})", self.path
            )

    @cached_property
    def _pickle_state(self) -> dict[str, Tensor]:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=_is_zip(self.path))
        except Exception as exc:
            raise FormatError(
                f"refused to load pickle with weights_only=True ({_one_line(exc)}); "
                "only plain tensor dicts are read — convert it to .safetensors",
                self.path,
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise FormatError(
                f"pickle holds {type(obj).__name__}, not a dict of tensors; convert it to .safetensors",
                self.path,
            )
        return {str(k): v for k, v in obj.items()}

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
        self.keys  # noqa: B018  (validates the header with safe_open first)
        out: dict[str, Tensor] = {}
        with self.path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = _DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise FormatError(f"tensor {key!r} has unsupported dtype {info.get('dtype')!r}", self.path)
                shape = tuple(int(d) for d in info["shape"])
                count = math.prod(shape)
                start, end = info["data_offsets"]
                if end - start != count * dtype.itemsize:
                    raise FormatError(f"tensor {key!r}: byte range does not match shape {shape}", self.path)
                if 0 < count <= _SMALL:
                    fh.seek(8 + n + start)
                    t = torch.frombuffer(bytearray(fh.read(end - start)), dtype=dtype).reshape(shape)
                    check_finite(t, key, self.path)
                    out[key] = t
                else:
                    out[key] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def _read_safetensors(self) -> dict[str, Tensor]:
        """One read of the whole file, tensors as views into it.

        Why not ``safe_open.get_tensor`` per key: a w2w-shaped LoRA has 128 small tensors, and one read
        plus views is several times faster; the header was already validated by ``safe_open`` in
        ``_header`` (offsets are re-checked here against each tensor's size).
        """
        self.keys  # noqa: B018  (validates the header with safe_open first)
        raw = bytearray(self.path.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        out: dict[str, Tensor] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise FormatError(f"tensor {key!r} has unsupported dtype {info.get('dtype')!r}", self.path)
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            count = 1
            for d in shape:
                count *= d
            itemsize = dtype.itemsize
            if end - start != count * itemsize:
                raise FormatError(f"tensor {key!r}: byte range does not match shape {shape}", self.path)
            if count == 0:
                out[key] = torch.empty(shape, dtype=dtype)
                continue
            out[key] = torch.frombuffer(raw, dtype=dtype, count=count, offset=base + start).reshape(shape)
        return out


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
