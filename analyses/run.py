"""``wsa analyze`` as a function: store → space → analyzers → report, with the run echoed into it.

Why one function: the CLI, tests and notebooks all run the same pipeline, and the report records
exactly what produced it (command, resolved config, versions, input fingerprint, timings).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from wsa.analyses import AnalysisContext, Result, available_analyzers, get_analyzer
from wsa.errors import ConfigError
from wsa.store import Store, ingest, open_store
from wsa.store.store import MANIFEST


@dataclass
class AnalyzeConfig:
    """Run-level options; ``analyzer_params`` holds one table of parameters per analyzer name."""

    analyzers: list[str] | None = None
    n_components: int = 1000
    center: bool = True
    standardize: bool = False
    solver: str = "auto"
    repr: str = "raw"
    seed: int = 0
    device: str = "auto"
    labels: str | None = None
    engine: str = "local"  # local | dask
    scheduler: str | None = None  # Dask scheduler address; None: a local cluster of processes
    decode: bool = False
    base: str | None = None
    decode_steps: int = 25
    analyzer_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> AnalyzeConfig:
        """From a parsed TOML document: an ``[analyze]`` table plus one table per analyzer."""
        known = {f.name for f in fields(cls)} - {"analyzer_params"}
        run = dict(data.get("analyze", {}))
        unknown = set(run) - known
        if unknown:
            raise ConfigError(f"{source}: unknown [analyze] keys {sorted(unknown)} (known: {sorted(known)})")
        params = {k: dict(v) for k, v in data.items() if k != "analyze"}
        for name, value in data.items():
            if name != "analyze" and not isinstance(value, Mapping):
                raise ConfigError(f"{source}: top-level key {name!r} must be a [table] of analyzer parameters")
        return cls(**run, analyzer_params=params)


def load_config(path: str | Path) -> AnalyzeConfig:
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return AnalyzeConfig.from_mapping(data, str(path))


def store_fingerprint(store: Store) -> str:
    """sha256 over (id, content hash) of every row: changes iff the inputs change."""
    h = hashlib.sha256()
    for row in store.rows:
        h.update(f"{row['id']}\0{row.get('sha256')}\n".encode())
    h.update(store.repr.encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "wsa",
        "torch",
        "numpy",
        "scipy",
        "scikit-learn",
        "pandas",
        "matplotlib",
        "umap-learn",
        "diffusers",
        "peft",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _input_store(inputs: Sequence[str | Path]) -> Path | None:
    paths = [Path(p) for p in inputs]
    return paths[0] if len(paths) == 1 and (paths[0] / MANIFEST).is_file() else None


def uses_gram_route(inputs: Sequence[str | Path], repr: str) -> bool:
    """``--repr delta`` on adapter files or on a raw/canonical store: PCA of ΔW from factor Grams.

    Why: ΔW is ~280× the factors at Stable Diffusion scale (7 TB for w2w's 65 k adapters), so wsa
    ingests the gauge-fixed factors (``canonical``, same size as ``raw``) and takes ⟨ΔW_i, ΔW_j⟩ from
    them (:mod:`wsa.gram`). Only a store that already holds dense ΔW is fitted directly.
    """
    if repr != "delta":
        return False
    store = _input_store(inputs)
    return store is None or open_store(store).repr in ("raw", "canonical")


def resolve_store(inputs: Sequence[str | Path], cache: Path, repr: str, progress: bool, client: Any = None) -> Store:
    """A store given as input is used as is; adapter files/folders are ingested into ``cache``.

    ``repr="delta"`` ingests ``canonical`` factors (see :func:`uses_gram_route`), never dense ΔW.
    """
    paths = [Path(p) for p in inputs]
    if _input_store(paths) is not None:
        return open_store(paths[0])
    if repr == "delta":
        repr = "canonical"
    if client is not None:
        from wsa.dask_engine import ChunkedExecutor

        return ingest(paths, cache, repr=repr, progress=progress, executor=ChunkedExecutor(client))
    return ingest(paths, cache, repr=repr, progress=progress)


@contextmanager
def _engine(config: AnalyzeConfig) -> Iterator[Any]:
    """A Dask client for ``engine = "dask"`` (closed afterwards), else None."""
    if config.engine != "dask":
        yield None
        return
    from wsa.dask_engine import dask_client

    with dask_client(config.scheduler) as client:
        yield client


def run_analysis(
    inputs: Sequence[str | Path],
    out: str | Path,
    config: AnalyzeConfig | None = None,
    *,
    cache: str | Path | None = None,
    argv: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Run the configured analyzers on ``inputs`` and write the report folder ``out``; return index.html."""
    from wsa.labels import load_labels
    from wsa.reports import write_report
    from wsa.space import fit_space

    config = config or AnalyzeConfig()
    out = Path(out)
    gram = uses_gram_route(inputs, config.repr)
    early_warnings: list[str] = []
    names = config.analyzers or [
        n for n in available_analyzers() if config.decode or not getattr(get_analyzer(n), "requires_decoder", False)
    ]
    if gram:
        explicit_only = [n for n in names if getattr(get_analyzer(n), "requires_components", True)]
        if config.analyzers and explicit_only:
            raise ConfigError(
                f"analyzer(s) {explicit_only} need explicit components, which a ΔW space fitted from factor Grams "
                "(--repr delta) does not have; use --repr canonical (gauge-fixed factors) for them"
            )
        names = [n for n in names if n not in explicit_only]
        early_warnings += [
            f"{n}: skipped (needs explicit components; the ΔW space from factor Grams has none — "
            "run with --repr canonical for it)"
            for n in explicit_only
        ]
    needing = [n for n in names if getattr(get_analyzer(n), "requires_decoder", False)]
    if needing and not config.decode:
        raise ConfigError(f"analyzer(s) {needing} decode images; add --decode (and --base if it cannot be found)")
    # Construct and validate every analyzer before any heavy work: a typo fails in a second.
    analyzers = []
    for name in names:
        cls = get_analyzer(name)
        analyzer = cls().set_params(**config.analyzer_params.get(name, {}))
        analyzer._validate_params()
        analyzers.append(analyzer)
    unknown_tables = set(config.analyzer_params) - set(names) - set(available_analyzers())
    if unknown_tables:
        raise ConfigError(f"config has parameters for unknown analyzers {sorted(unknown_tables)}")

    if config.engine not in ("local", "dask"):
        raise ConfigError(f"engine must be 'local' or 'dask'; got {config.engine!r}")
    if config.scheduler and config.engine != "dask":
        raise ConfigError("a scheduler address needs engine 'dask'")
    timings: dict[str, float] = {}
    with _engine(config) as client:
        t0 = time.perf_counter()
        store = resolve_store(inputs, Path(cache) if cache else out / "store", config.repr, progress, client)
        timings["ingest"] = time.perf_counter() - t0
        if len(store) < 3:
            raise ConfigError(f"{store.path}: {len(store)} adapters; an analysis needs at least 3")
        k = min(config.n_components, len(store) - 1, store.n_features)
        t0 = time.perf_counter()
        if gram:
            from wsa.gram import fit_delta_gram
            from wsa.space import _resolve_device

            space = fit_delta_gram(store, k, device=str(_resolve_device(config.device)), progress=progress)
        elif client is not None:
            from wsa.dask_engine import fit_space_dask

            space = fit_space_dask(
                store,
                k,
                client=client,
                center=config.center,
                standardize=config.standardize,
                random_state=config.seed,
            )
        else:
            space = fit_space(
                store,
                k,
                center=config.center,
                standardize=config.standardize,
                solver=config.solver,
                random_state=config.seed,
                device=config.device,
                progress=progress,
            )
    space.save(out / "space")
    if space.explicit:
        _record_decoding(out / "space", store, config)
    timings["space"] = time.perf_counter() - t0
    labels = load_labels(config.labels, list(space.ids)) if config.labels else None
    decoder = None
    if config.decode and any(a.requires_decoder for a in analyzers):
        from wsa.decoding.decoder import decoder_for_store

        decoder = decoder_for_store(store, config.base, config.device, steps=config.decode_steps)

    ctx = AnalysisContext(
        store=store,
        space=space,
        labels=labels,
        random_state=config.seed,
        device=config.device,
        out=out,
        decoder=decoder,
        progress=progress,
    )
    results: list[Result] = []
    warnings: list[str] = list(early_warnings)
    for analyzer in analyzers:
        if analyzer.requires_labels and labels is None:
            warnings.append(f"{analyzer.name}: skipped (needs --labels)")
            continue
        t0 = time.perf_counter()
        analyzer.fit(ctx)
        result = analyzer.result()
        timings[analyzer.name] = time.perf_counter() - t0
        ctx.results[analyzer.name] = result
        results.append(result)
        warnings.extend(f"{analyzer.name}: {w}" for w in result.warnings)

    run_info = {
        "title": Path(inputs[0]).name if len(inputs) == 1 else f"{len(inputs)} inputs",
        "headline": _headline(store, space, ctx.results, warnings, labels),
        "command": list(argv) if argv is not None else None,
        "config": asdict(config) | {"n_components_used": k},
        "inputs": [str(p) for p in inputs],
        "store": {"path": str(store.path), "fingerprint": store_fingerprint(store), "repr": store.repr},
        "versions": _versions(),
        "timings_s": {key: round(v, 3) for key, v in timings.items()},
        "warnings": warnings,
        "platform": f"{platform.system()} {platform.machine()}, {sys.version.split()[0]}",
    }
    if labels is not None:
        run_info["labels"] = {
            "path": str(config.labels),
            "missing_ids": len(labels.attrs.get("missing_ids", [])),
            "extra_ids": len(labels.attrs.get("extra_ids", [])),
        }
    return write_report(results, run_info, out)


def _record_decoding(folder: Path, store: Store, config: AnalyzeConfig) -> None:
    """``space/decoding.json``: what ``wsa sample/edit/invert/...`` need to turn points into models."""
    from wsa.decoding.decoder import find_base, zoo_prompt
    from wsa.workspace import write_decoding_info

    write_decoding_info(folder, store, config.base or find_base(store), zoo_prompt(store))


def _headline(store, space, results: Mapping[str, Result], warnings: list[str], labels) -> dict[str, Any]:
    head: dict[str, Any] = {
        "adapters": len(store),
        "features": store.n_features,
        "representation": "delta (from factor Grams)" if not space.explicit else store.repr,
        "components kept": int(space.n_components),
        "PCs for 95% variance": space.n_components_for(0.95),
    }
    probes = results.get("probes")
    if probes is not None:
        scored = [m for m in probes.metrics if m.value is not None and m.higher_is_better]
        if scored:
            best = max(scored, key=lambda m: m.value)
            worst = min(scored, key=lambda m: m.value)
            head["best probe"] = f"{best.name}: {best.value:.3f}"
            head["worst probe"] = f"{worst.name}: {worst.value:.3f}"
    if labels is None:
        head["labels"] = "none given (probes skipped)"
    head["warnings"] = len(warnings)
    return head
