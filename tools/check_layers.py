"""Fail when a module imports upward: data flows files → Adapter → store → space → analyzers → report.

    python tools/check_layers.py        # run by `make lint`; exit 1 listing each upward import

Each unit (a top-level module or sub-package of the ``wsa`` namespace, ``wsa.cli``/``wsa.analyses``/
``wsa.reports`` included) sits in one layer of :data:`LAYERS`, lowest first. A unit may import its own
layer and the ones below, never one above, at module level or inside a function alike (a lazy import
is still a dependency). The package root ``wsa`` (the public facade and ``__version__``) is exempt.
:data:`KNOWN` lists the upward imports that exist today, each with where it is to be removed; a new
one fails, and so does a listed one that no longer exists (so the list only shrinks).

Why a script and not import-linter: the layer table is the architecture, and it reads better as
twenty lines here than as a config contract; it needs nothing installed and runs in 0.2 s.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> its package in the installed ``wsa`` namespace (pyproject's package-dir).
SOURCES = {"wsa": "wsa", "cli": "wsa.cli", "analyses": "wsa.analyses", "reports": "wsa.reports"}

#: Lowest first. Units in one layer may import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: no wsa imports but these
    ("wsa.errors", "wsa.text", "wsa.atomic", "wsa.registry", "wsa.devices", "wsa.palette", "wsa.images", "wsa.results"),
    ("wsa.adapter", "wsa.deltas"),  # one adapter in memory; ΔW from its factors
    ("wsa.families",),  # module names of every base model
    ("wsa.formats",),  # files -> Adapter
    ("wsa.export", "wsa.training_metadata"),  # Adapter -> files; header metadata as columns
    ("wsa.store", "wsa.inspect"),  # folders -> the matrix
    (
        "wsa.space",
        "wsa.gram",
        "wsa.delta_space",
        "wsa.dask_engine",
        "wsa.labels",
        "wsa.synthetic",
        "wsa.directions",
    ),  # geometry
    (
        "wsa.editing",
        "wsa.sampling",
        "wsa.points",
        "wsa.decoding",
        "wsa.workspace",
        "wsa.inversion",
        "wsa.delta_points",
    ),  # uses
    ("wsa.worlds",),  # the embedded world: bases, oracles, zoos built from everything below
    ("wsa.analyses",),  # analyzers
    ("wsa.reports",),  # HTML / JSON / CSV
    ("wsa.pipeline",),  # `wsa analyze`: files -> store -> space -> analyzers -> report, in that order
    ("wsa.cli",),  # the command line
)

#: Upward imports that exist today: (importer module, imported unit) -> where it goes away.
KNOWN: dict[tuple[str, str], str] = {}


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "wsa":
        return None
    return ".".join(parts[:2]) if len(parts) > 1 else "wsa"


def layer_of(unit: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if unit in layer), None)


def modules() -> dict[str, Path]:
    """Every source module by its dotted name in the installed namespace."""
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            out[".".join([package, *rel.parts]).removesuffix(".__init__")] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Absolute names of the ``wsa`` modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from wsa import store`
    return {n for n in found if n == "wsa" or n.startswith("wsa.")}


def check() -> list[str]:
    problems: list[str] = []
    seen_known: set[tuple[str, str]] = set()
    units = {u for layer in LAYERS for u in layer}
    for module, path in modules().items():
        src = unit_of(module)
        if src == "wsa":
            continue
        if src not in units:
            problems.append(f"{path.relative_to(ROOT)}: unit {src} has no layer in tools/check_layers.py LAYERS")
            continue
        reported: set[str] = set()
        for name in sorted(imports(path, module)):
            dst = unit_of(name)
            if dst in reported:
                continue
            if dst in (None, "wsa", src) or dst not in units:
                continue  # `from wsa import x` where x is a unit is caught through its dotted name
            if layer_of(dst) > layer_of(src):  # type: ignore[operator]
                if (module, dst) in KNOWN:
                    seen_known.add((module, dst))
                    continue
                reported.add(dst)
                problems.append(f"{path.relative_to(ROOT)}: {module} imports {name}, a layer above it ({dst})")
    for pair in sorted(set(KNOWN) - seen_known):
        problems.append(f"tools/check_layers.py: KNOWN lists {pair[0]} -> {pair[1]}, which is gone: delete the entry")
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} layer problem(s); the layers are in tools/check_layers.py (docs/architecture.md)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
