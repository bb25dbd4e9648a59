"""Hostile adapter files, generated: shared by the reader tests and ``benchmarks/fuzz_readers.py``.

Each strategy draws the bytes of one file (or one PEFT folder's config) from a valid starting point and
a mutation: a safetensors header replaced or altered field by field, nested deep, cut short; a PEFT
``adapter_config.json`` with any JSON in any field (regexes included); kohya factors of any dtype and
shape. :func:`outcome` runs the reader on one and says what happened, so the test can assert and the
benchmark can count.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save

import wsa
from wsa.formats._tensorfile import header_only

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PEFT_NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def good_kohya() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{KEY}.lora_down.weight": torch.randn(4, 8, generator=g),
        f"{KEY}.lora_up.weight": torch.randn(8, 4, generator=g),
        f"{KEY}.alpha": torch.tensor(2.0),
    }


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_safetensors(header: object, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD_BLOB = save(good_kohya(), metadata={"ss_network_dim": "4"})
GOOD_HEADER, GOOD_DATA = split_safetensors(GOOD_BLOB)

#: Any JSON value, including the awkward ones (huge and negative integers, NaN, nesting).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ("dtype", "shape", "data_offsets")


def _deep(depth: int, opener: str) -> bytes:
    inner = '{"a":' * depth + "1" + "}" * depth if opener == "{" else "[" * depth + "]" * depth
    return ('{"x":' + inner + "}").encode()


@st.composite
def safetensors_files(draw) -> bytes:
    """The bytes of one ``.safetensors`` file: the good kohya file with one hostile change."""
    header = json.loads(json.dumps(GOOD_HEADER))
    data = GOOD_DATA
    tensors = [k for k in header if k != "__metadata__"]
    kind = draw(
        st.sampled_from(
            ["replace", "field", "drop", "add", "metadata", "deep", "bytes", "cut", "length", "offsets", "dtype"]
        )
    )
    if kind == "replace":
        return join_safetensors(draw(json_values), data)
    if kind == "field":
        header[draw(st.sampled_from(tensors))][draw(st.sampled_from(FIELDS))] = draw(json_values)
    elif kind == "drop":
        del header[draw(st.sampled_from(tensors))][draw(st.sampled_from(FIELDS))]
    elif kind == "add":
        header[draw(st.text(max_size=30))] = draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "deep":
        return join_safetensors(_deep(draw(st.integers(1, 100_000)), draw(st.sampled_from("[{"))), data)
    elif kind == "bytes":
        return join_safetensors(draw(st.binary(max_size=200)), data)
    elif kind == "cut":
        return GOOD_BLOB[: draw(st.integers(0, len(GOOD_BLOB) - 1))]
    elif kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + GOOD_BLOB[8:]
    elif kind == "offsets":
        key = draw(st.sampled_from(tensors))
        header[key]["data_offsets"] = [draw(st.integers(-5, len(data) + 5)), draw(st.integers(-5, len(data) + 5))]
    elif kind == "dtype":
        key = draw(st.sampled_from(tensors))
        header[key]["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I32", "I8", "U8", "BOOL", "F8_E4M3"]))
    return join_safetensors(header, data)


#: Regex-ish text: what a hostile rank_pattern key is made of.
pattern_text = st.text(alphabet="a._()|*+?[]{}\\^$0123456789tqk,-=!<>:P", max_size=24)


@st.composite
def peft_configs(draw) -> bytes:
    """The bytes of one ``adapter_config.json`` for a valid rank-4 weights file."""
    kind = draw(st.sampled_from(["fields", "any", "text", "patterns"]))
    if kind == "any":
        return json.dumps(draw(json_values)).encode()
    if kind == "text":
        return draw(st.binary(max_size=100))
    config: dict[str, object] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    if kind == "fields":
        for field in draw(
            st.lists(st.sampled_from(["peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"]))
        ):
            config[field] = draw(json_values)
    else:
        for field in ("rank_pattern", "alpha_pattern"):
            keys = pattern_text | st.sampled_from(["to_q", "attn1.to_q", "(a|aa)*b", "(a+)+$"])
            config[field] = draw(st.dictionaries(keys, st.integers(1, 8) | json_values, max_size=4))
    return json.dumps(config).encode()


def write_peft(folder: Path, config: bytes, weights_name: str = PEFT_NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = good_kohya()
    (folder / "adapter_model.safetensors").write_bytes(
        save(
            {
                f"base_model.model.{weights_name}.lora_A.weight": t[f"{KEY}.lora_down.weight"],
                f"base_model.model.{weights_name}.lora_B.weight": t[f"{KEY}.lora_up.weight"],
            }
        )
    )
    (folder / "adapter_config.json").write_bytes(config)
    return folder


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]


@st.composite
def kohya_tensors(draw) -> dict[str, torch.Tensor]:
    """kohya factors of any dtype and shape (0-D, 3-D, rank 0), alphas of any value."""

    def tensor(default: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=5))) if draw(st.booleans()) else default
        dtype = draw(st.sampled_from(_DTYPES))
        return (torch.randn(shape) * 3).to(dtype)

    out = {f"{KEY}.lora_down.weight": tensor((4, 8)), f"{KEY}.lora_up.weight": tensor((8, 4))}
    if draw(st.booleans()):
        value = draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10))
        out[f"{KEY}.alpha"] = torch.tensor(value)
    return out


def outcome(path: Path) -> tuple[str, float, str]:
    """``(what happened, seconds, message)`` for both reads wsa does (header-only scan, then full).

    What happened is ``ok`` or ``FormatError``, or the name of any other exception (a bug).
    """
    start = time.perf_counter()
    try:
        with header_only():
            wsa.load_adapter(path)
        wsa.load_adapter(path)
        result, message = "ok", ""
    except wsa.FormatError as exc:
        result, message = "FormatError", str(exc)
    except Exception as exc:  # the point: anything else is counted as a bug
        result, message = type(exc).__name__, f"{type(exc).__name__}: {exc}"[:300]
    return result, time.perf_counter() - start, message
