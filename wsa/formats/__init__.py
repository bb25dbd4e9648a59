"""Adapter formats: detection from the header alone, exact reading into :class:`~wsa.adapter.Adapter`.

Adding a format: one module that builds a :class:`FormatSpec` and calls ``register``, plus its
import below. Every registered format gets the common sniff/read tests.
"""

from __future__ import annotations

from pathlib import Path

from wsa.adapter import Adapter
from wsa.errors import FormatError, WsaError
from wsa.formats import diffusers, kohya, lycoris, native, peft  # registration side effects
from wsa.formats._tensorfile import TENSOR_SUFFIXES, TensorFile, regular_file
from wsa.formats.base import FORMATS, BaseShapes, FormatSpec
from wsa.text import first_line


def detect(path: str | Path) -> tuple[FormatSpec, TensorFile | None]:
    """The one format whose sniffer accepts ``path``; zero or several matches are errors."""
    path = Path(path)
    if not path.exists():
        regular_file(path)  # says why: missing, broken symlink, symlink loop, unreadable
        raise FormatError("no such file or folder", path)
    if path.is_dir():
        file = None
    elif path.name.startswith("adapter_model.") and (path.parent / peft.CONFIG).is_file():
        return FORMATS.get("peft"), None  # a PEFT weights file is read with its folder's config
    else:
        file = TensorFile(path)
    matches = [spec for _, spec in FORMATS.items() if spec.sniff(path, file)]
    if len(matches) == 1:
        return matches[0], file
    if matches:
        raise FormatError(f"ambiguous format: matches {', '.join(m.name for m in matches)}", path)
    if file is None:
        raise FormatError("folder is not a PEFT adapter (no adapter_config.json); pass an adapter file", path)
    prefixes = sorted({k.split(".")[0][:24] for k in file.keys})[:4]
    raise FormatError(f"unknown adapter format (key prefixes seen: {', '.join(prefixes) or 'none'})", path)


def load_adapter(path: str | Path, *, base_shapes: BaseShapes | None = None) -> Adapter:
    """Read one adapter file or folder exactly, whatever its format.

    Parameters
    ----------
    path : a PEFT folder (or pipeline folder of PEFT components), a diffusers
        ``pytorch_lora_weights.safetensors`` (or the folder holding it), a kohya/A1111 or LyCORIS ``.safetensors``;
        ``.pt``/``.bin`` are read only with ``torch.load(weights_only=True)``.
    base_shapes : optional base weight shapes by canonical module name; only needed to give
        LoHa/LoKr conv deltas their exact kernel shape when it is not the SD convention.
    """
    path = Path(path)
    try:
        return _load(path, base_shapes)
    except FormatError:
        raise
    except WsaError as exc:  # e.g. a ConfigError from a family table: still this file's problem
        raise FormatError(first_line(exc), None if exc.path else path) from None
    except OSError as exc:  # unreadable, deleted mid-run, a folder that vanished
        where = exc.filename or path
        raise FormatError(f"cannot read ({exc.strerror or first_line(exc)})", where) from None
    except RecursionError:
        raise FormatError("nested too deeply to read", path) from None
    except Exception as exc:  # the boundary: whatever a hostile file triggers is this file's error, not a traceback
        raise FormatError(
            f"cannot be read ({type(exc).__name__}: {first_line(exc)}); if the file is valid, please report this",
            path,
        ) from exc


def _load(path: Path, base_shapes: BaseShapes | None) -> Adapter:
    if path.is_dir() and not (path / peft.CONFIG).is_file():
        # A folder from diffusers' save_lora_weights holds one pytorch_lora_weights file.
        for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"):
            if (path / name).is_file():
                path = path / name
                break
    spec, file = detect(path)
    if spec.name == "peft" and path.is_file():
        path = path.parent
    return spec.read(path, file, base_shapes)


__all__ = ["FORMATS", "TENSOR_SUFFIXES", "FormatSpec", "detect", "load_adapter"]
