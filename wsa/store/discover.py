"""Find the adapters under a set of paths and give each a stable id.

One adapter is one PEFT folder (or pipeline folder of PEFT components, as w2w's ``models/<i>/unet``),
or one tensor file outside such folders. Ids are paths relative to the root given, without the
suffix; ``pytorch_lora_weights.safetensors`` and component folders are named by their parent.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wsa.adapter import Adapter
from wsa.errors import CollectionError
from wsa.formats import TENSOR_SUFFIXES, load_adapter
from wsa.formats.peft import CONFIG, component_folders

_PARENT_NAMED_FILES = {"pytorch_lora_weights", "adapter_model"}


@dataclass(frozen=True)
class Source:
    """One future row: where it comes from and how to read it."""

    id: str
    path: Path
    files: tuple[Path, ...]
    row: int | None = None  # row index inside a dataset matrix
    loader: Callable[[], Adapter] | None = field(default=None, compare=False, repr=False)

    def load(self) -> Adapter:
        return self.loader() if self.loader is not None else load_adapter(self.path)

    def fingerprint(self) -> list[list[int]]:
        """Cheap change check: (size, mtime_ns) of every file; content hashes are kept beside it.

        A file that cannot be stat-ed (a broken symlink, a loop, deleted since discovery) gets ``[-1, -1]``:
        it then matches nothing cached, and reading it says what is wrong, as that file's problem.
        """
        out = []
        for f in self.files:
            try:
                st = f.stat()
            except OSError:
                out.append([-1, -1])
                continue
            out.append([st.st_size, st.st_mtime_ns])
        return out


def _peft_files(folder: Path) -> tuple[Path, ...]:
    files: list[Path] = []
    for _, comp in component_folders(folder):
        files.append(comp / CONFIG)
        files.extend(p for p in (comp / "adapter_model.safetensors", comp / "adapter_model.bin") if p.is_file())
    return tuple(files)


def _source_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    if rel.suffix in TENSOR_SUFFIXES:
        rel = rel.with_suffix("")
    if rel.name in _PARENT_NAMED_FILES and rel.parent != Path("."):
        rel = rel.parent
    return rel.as_posix() if str(rel) != "." else path.name


def discover(paths: Iterable[str | Path]) -> list[Source]:
    """All adapters under ``paths`` (recursive), sorted by id; an empty result is an error."""
    sources: dict[str, Source] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            try:
                root.stat()
                reason = "no such file or folder"
            except OSError as exc:
                reason = "symlink loop" if exc.errno == errno.ELOOP else (exc.strerror or "no such file or folder")
                if isinstance(exc, FileNotFoundError) and root.is_symlink():
                    reason = "broken symlink (points to a missing file or folder)"
            raise CollectionError(f"{root}: {reason}")
        for adapter_path in _walk(root):
            base = root if root.is_dir() and adapter_path != root else root.parent
            sid = _source_id(adapter_path, base)
            files = _peft_files(adapter_path) if adapter_path.is_dir() else (adapter_path,)
            if sid in sources and sources[sid].path != adapter_path and adapter_path.is_file():
                # `a.safetensors` beside `a.pt` (a conversion kept next to its original): the file name is the id
                sid = (adapter_path.relative_to(base) if adapter_path != base else Path(adapter_path.name)).as_posix()
            if sid in sources and sources[sid].path != adapter_path:
                raise CollectionError(f"{adapter_path}: id {sid!r} also used by {sources[sid].path}; rename one")
            sources[sid] = Source(sid, adapter_path, files)
    if not sources:
        raise CollectionError(
            f"{', '.join(str(p) for p in paths)}: no adapter files found "
            f"(looked for PEFT folders and {', '.join(TENSOR_SUFFIXES)} files)"
        )
    return [sources[k] for k in sorted(sources)]


def _walk(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    if component_folders(root):
        yield root
        return

    def unreadable(exc: OSError) -> None:
        raise CollectionError(
            f"{exc.filename}: cannot list this folder ({exc.strerror}); fix its permissions or pass the readable "
            "folders instead"
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        descend = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if component_folders(here / d):
                yield here / d  # a PEFT folder or a pipeline folder of PEFT components: one adapter
            else:
                descend.append(d)
        dirnames[:] = descend
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(TENSOR_SUFFIXES):
                yield here / name
