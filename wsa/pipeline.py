"""``wsa analyze`` as a function: store → space → analyzers → report, with the run echoed into it.

Why one function: the CLI, tests and notebooks all run the same pipeline, and the report records
exactly what produced it (command, resolved config, versions, input fingerprint, timings).
"""

from __future__ import annotations

import difflib
import platform
import re
import sys
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from wsa.analyses import AnalysisContext, Result, available_analyzers, get_analyzer, run_order
from wsa.analyses.base import MAX_INT, SkipAnalysis, short_repr, type_problem
from wsa.atomic import own_folder
from wsa.errors import ConfigError, FormatError
from wsa.store import Store, ingest, open_store
from wsa.store.store import MANIFEST
from wsa.text import terminal_safe


@dataclass
class AnalyzeConfig:
    """Run-level options; ``analyzer_params`` holds one table of parameters per analyzer name."""

    analyzers: list[str] | None = None
    n_components: int = 1000
    center: bool = True
    standardize: bool = False
    solver: str = "auto"
    space: str = "explicit"  # the geometry: explicit components of the stored rows, or the ΔW space (delta)
    repr: str = "auto"  # the storage: raw | canonical | delta (dense ΔW); auto: raw, or canonical for --space delta
    seed: int = 0
    device: str = "auto"
    labels: str | None = None
    engine: str = "local"  # local | dask
    scheduler: str | None = None  # Dask scheduler address; None: a local cluster of processes
    decode: bool = False
    base: str | None = None
    decode_steps: int = 25
    family: str | None = None  # analyse only this model family's adapters
    families: str = "split"  # a folder of several families: "split" (one space each) or "refuse"
    skip_bad: bool = False  # leave out unreadable files (listed in the report) instead of failing
    modules: str = "exact"  # exact | intersect | union (as `wsa ingest --modules`)
    analyzer_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> AnalyzeConfig:
        """From a parsed TOML document: an ``[analyze]`` table plus one table per analyzer.

        Everything is checked here, before any work, and each problem is one :class:`ConfigError` line
        naming ``source`` and the key: unknown keys (with the valid names), types (ints within range,
        finite numbers, lists of strings), choices, and every analyzer table against that analyzer's
        parameters. ``analyzers`` may be a list of names or one comma-separated string
        (``analyzers = "pca"`` is the analyzer ``pca``, not ``p``, ``c``, ``a``).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a config is a table ([analyze] plus one table per analyzer)")
        run_table = data.get("analyze", {})
        if not isinstance(run_table, Mapping):
            raise ConfigError(f"{source}: 'analyze' must be a [table] of run options")
        run = dict(run_table)
        known = [f.name for f in fields(cls) if f.name != "analyzer_params"]
        unknown = sorted(str(k) for k in set(run) - set(known))
        if unknown:
            names = ", ".join(terminal_safe(k, 60) for k in unknown[:5])
            raise ConfigError(f"{source}: unknown [analyze] key(s) {names} (valid: {', '.join(sorted(known))})")
        if "analyzers" in run:
            run["analyzers"] = _analyzer_names(run["analyzers"], f"{source}: [analyze] analyzers")
        hints = typing.get_type_hints(cls)
        for key, value in run.items():
            if key != "analyzers":
                _check_option(key, value, hints[key], f"{source}: [analyze] {key}")
        params: dict[str, dict[str, Any]] = {}
        valid = available_analyzers()
        for name, table in data.items():
            if name == "analyze":
                continue
            if name not in valid:
                raise ConfigError(
                    f"{source}: [{terminal_safe(name, 60)}] is not an analyzer (tables: analyze, {', '.join(valid)})"
                )
            if not isinstance(table, Mapping):
                raise ConfigError(f"{source}: {name} must be a [{name}] table of analyzer parameters")
            analyzer = get_analyzer(name)()
            try:
                analyzer.set_params(**{str(k): v for k, v in table.items()})
                analyzer._validate_params()
            except ConfigError as exc:
                raise ConfigError(f"{source}: [{name}] {exc}") from None
            params[name] = dict(table)
        return cls(**run, analyzer_params=params)

    def check(self, source: str = "options") -> None:
        """Validate the run options as :meth:`from_mapping` does (for configs built in Python or by the CLI)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "analyzers":
                if value is not None:
                    self.analyzers = _analyzer_names(value, f"{source}: analyzers")
            elif f.name == "analyzer_params":
                if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                    raise ConfigError(f"{source}: analyzer_params must map analyzer names to tables of parameters")
            else:
                _check_option(f.name, value, hints[f.name], f"{source}: {f.name}")
        refuse_geometry(self.space, storage_for(self.space, self.repr), self.standardize, source)


#: Why gauge-fixed factors are storage, not a geometry (measured on the shipped faces zoo, issue 13).
CANONICAL_NOT_A_GEOMETRY = (
    "gauge-fixed (canonical) factors are storage, not a geometry: fixing each LoRA's gauge (orthonormal down "
    "factors, the largest entry positive) flips whole factors between near-equal adapters, so a PCA of them is "
    "not linear in ΔW; use --space delta, the PCA of ΔW, which reads this storage"
)


def refuse_geometry(space: str, storage: str, standardize: bool | None, where: str = "options") -> None:
    """The storage/geometry pairs that mean nothing, refused with the reason before any work."""
    if space == "explicit" and storage == "canonical":
        raise ConfigError(f"{where}: --space explicit with --repr canonical: {CANONICAL_NOT_A_GEOMETRY}")
    if space == "delta" and standardize and storage in ("raw", "canonical"):
        raise ConfigError(
            f"{where}: --standardize with --space delta: the ΔW space is fitted from factor Grams, in which ΔW's "
            "entries are never formed to be z-scored; drop --standardize (or use --space explicit --repr delta)"
        )


#: ``[analyze]`` options with a fixed set of values.
_CHOICES = {
    "solver": ("auto", "exact", "randomized", "streaming"),
    "space": ("explicit", "delta"),
    "repr": ("auto", "raw", "canonical", "delta"),
    "engine": ("local", "dask"),
    "families": ("split", "refuse"),
    "modules": ("exact", "intersect", "union"),
}
#: ``[analyze]`` integer options and their inclusive ranges.
_INT_RANGES = {"n_components": (1, MAX_INT), "seed": (0, MAX_INT), "decode_steps": (1, 1000)}
#: A config file larger than this is not a config (and would be slow to parse).
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of arrays/inline tables and longest dotted key a config may have (tomllib recurses
#: per level and is quadratic in a dotted key's length).
MAX_CONFIG_DEPTH = 32


def _analyzer_names(value: Any, where: str) -> list[str]:
    """A list of analyzer names, or one comma-separated string of them; each must be registered."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ConfigError(
            f"{where} must be a list of analyzer names or a comma-separated string; got {short_repr(value)}"
        )
    valid = available_analyzers()
    bad = [n for n in names if n not in valid]
    if not names or bad:
        if not bad:
            raise ConfigError(f"{where}: no names (valid: {', '.join(valid)})")
        close = difflib.get_close_matches(bad[0], valid, n=1)
        hint = f"; did you mean {close[0]!r}" if close else ""
        shown = ", ".join(repr(terminal_safe(b, 60)) for b in bad[:5])
        raise ConfigError(f"{where}: unknown analyzer {shown}{hint} (valid: {', '.join(valid)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: an analyzer is named twice ({', '.join(names)})")
    return names


def _check_option(key: str, value: Any, hint: Any, where: str) -> None:
    problem = type_problem(value, hint)
    if problem is not None:
        raise ConfigError(f"{where} must be {problem}; got {short_repr(value)}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where} must be one of {', '.join(_CHOICES[key])}; got {short_repr(value)}")
    if key in _INT_RANGES:
        low, high = _INT_RANGES[key]
        if not low <= value <= high:
            raise ConfigError(f"{where} must be an int in [{low}, {high}]; got {value}")
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,3})?", value):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N; got {short_repr(value)}")


def _toml_shape_problem(text: str) -> str | None:
    """Nesting deeper than :data:`MAX_CONFIG_DEPTH` or a dotted key longer, found without parsing.

    Scans outside strings and comments only, in one pass; ``None`` when the text is shaped like a config.
    """
    depth = dots = i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            triple = text.startswith(ch * 3, i)
            quote = ch * 3 if triple else ch
            i += len(quote)
            while i < n:
                if ch == '"' and text[i] == "\\":
                    i += 2
                    continue
                if text.startswith(quote, i):
                    i += len(quote)
                    while triple and i < n and text[i] == ch:  # """"" ends a string with quotes in it
                        i += 1
                    break
                if not triple and text[i] == "\n":
                    break
                i += 1
            continue
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch in "[{":
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                return f"arrays or tables nested more than {MAX_CONFIG_DEPTH} deep"
        elif ch in "]}":
            depth = max(depth - 1, 0)
        if ch == ".":
            dots += 1
            if dots > MAX_CONFIG_DEPTH:
                return f"a dotted key of more than {MAX_CONFIG_DEPTH} parts"
        elif ch in "=,[]{}\n":
            dots = 0
        i += 1
    return None


def load_config(path: str | Path) -> AnalyzeConfig:
    """Read and validate a TOML config; any problem is one :class:`ConfigError` line naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} bytes of TOML", path)
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("no such config file", path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config ({exc.strerror or type(exc).__name__})", path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"over {MAX_CONFIG_BYTES:,} bytes; a config is at most that", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start}); a config is a TOML file", path) from None
    problem = _toml_shape_problem(text)
    if problem is not None:
        raise ConfigError(f"not a wsa config: {problem}", path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({terminal_safe(exc)})", path) from None
    except RecursionError:
        raise ConfigError("not a wsa config: nested too deeply", path) from None
    except (ValueError, TypeError, OverflowError) as exc:  # pragma: no cover - tomllib raises TOMLDecodeError
        raise ConfigError(f"not valid TOML ({type(exc).__name__}: {terminal_safe(exc)})", path) from None
    return AnalyzeConfig.from_mapping(data, str(path))


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


def storage_for(space: str, repr: str) -> str:
    """The storage ``--repr auto`` means: raw factors (w2w) for the explicit space, gauge-fixed factors for ΔW."""
    if repr != "auto":
        return repr
    return "canonical" if space == "delta" else "raw"


def uses_gram_route(inputs: Sequence[str | Path], space: str, repr: str = "auto") -> bool:
    """``--space delta`` on factors (adapter files, a raw/canonical store): PCA of ΔW from factor Grams.

    Why: ΔW is ~280× the factors at Stable Diffusion scale (7 TB for w2w's 65 k adapters), so wsa stores
    factors and takes ⟨ΔW_i, ΔW_j⟩ from them (:mod:`wsa.gram`). A store of dense ΔW (``--repr delta``
    storage) is the ΔW space already and is fitted with explicit components.
    """
    if space != "delta":
        return False
    store = _input_store(inputs)
    if store is not None:
        return open_store(store).repr in ("raw", "canonical")
    return storage_for(space, repr) in ("raw", "canonical")


def resolve_store(
    inputs: Sequence[str | Path],
    cache: Path,
    repr: str,
    progress: bool,
    client: Any = None,
    family: str | None = None,
    skip_bad: bool = False,
    modules: str = "exact",
) -> Store:
    """A store given as input is used as is; adapter files/folders are ingested into ``cache``.

    ``repr`` is the storage (``auto`` resolved by :func:`storage_for` before this).
    ``family`` keeps one model family's adapters (the others are listed as left out).
    """
    paths = [Path(p) for p in inputs]
    if _input_store(paths) is not None:
        store = open_store(paths[0])
        if family is not None and store.manifest.get("family", family) != family:
            raise ConfigError(f"{store.path}: this store holds family {store.manifest.get('family')!r}, not {family!r}")
        return store
    executor = None
    if client is not None:
        from wsa.dask_engine import ChunkedExecutor

        executor = ChunkedExecutor(client)
    return ingest(
        paths,
        cache,
        repr=repr,
        progress=progress,
        executor=executor,
        family=family,
        skip_bad=skip_bad,
        modules=modules,
    )


def families_of_inputs(
    inputs: Sequence[str | Path], progress: bool
) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """``({family: [paths]}, [(path, problem)])`` of adapter inputs, from their headers (no tensors read)."""
    from wsa.store.discover import discover
    from wsa.store.scan import family_groups, scan

    sources = discover(inputs)
    scanned = scan(sources, progress=progress)
    groups = {fam: [str(sources[i].path) for i in ix] for fam, ix in family_groups(scanned).items()}
    problems = [(str(src.path), s.problem) for src, s in zip(sources, scanned, strict=True) if s.problem]
    return groups, problems  # type: ignore[return-value]


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
    from wsa.analyses.pca import NO_VARIANCE, has_variance
    from wsa.labels import is_metadata_spec, load_labels, metadata_labels
    from wsa.reports import write_report

    config = config or AnalyzeConfig()
    config.check()
    out = Path(out)
    gram = uses_gram_route(inputs, config.space, config.repr)
    early_warnings: list[str] = []
    names = config.analyzers or [
        n for n in available_analyzers() if config.decode or not getattr(get_analyzer(n), "requires_decoder", False)
    ]
    needing = [n for n in names if getattr(get_analyzer(n), "requires_decoder", False)]
    if needing and not config.decode:
        raise ConfigError(f"analyzer(s) {needing} decode images; add --decode (and --base if it cannot be found)")
    # Construct and validate every analyzer before any heavy work: a typo fails in a second.
    analyzers = []
    for name in run_order(names):
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
    if config.family is None and _input_store(inputs) is None:
        groups, problems = families_of_inputs(inputs, progress)
        if len(groups) > 1:
            if config.families == "refuse":
                listing = "; ".join(
                    f"{fam}: {len(p)} file(s), e.g. {terminal_safe(p[0], 200)}" for fam, p in groups.items()
                )
                raise ConfigError(
                    f"the inputs hold {len(groups)} model families ({listing}); pass --family NAME for one, "
                    "or --families split for one space each"
                )
            return _run_per_family(inputs, out, config, groups, problems, cache=cache, argv=argv, progress=progress)
    timings: dict[str, float] = {}
    with _engine(config) as client:
        t0 = time.perf_counter()
        store = resolve_store(
            inputs,
            Path(cache) if cache else own_folder(out, "store"),
            storage_for(config.space, config.repr),
            progress,
            client,
            family=config.family,
            skip_bad=config.skip_bad,
            modules=config.modules,
        )
        timings["ingest"] = time.perf_counter() - t0
        refuse_geometry(config.space, store.repr, config.standardize, str(store.path))
        if len(store) < MIN_ADAPTERS:
            raise ConfigError(
                f"{len(store)} adapter(s); an analysis compares adapters and needs at least {MIN_ADAPTERS}", store.path
            )
        k = min(config.n_components, len(store) - 1, store.n_features)
        t0 = time.perf_counter()
        try:
            space = _fit(store, k, config, gram, client, progress)
        except ConfigError:
            _refuse_nonfinite_rows(store)  # names the rows when the data are the cause
            raise
    space.save(own_folder(out, "space"))
    _record_decoding(out / "space", store, config)  # either geometry: the applications open both
    timings["space"] = time.perf_counter() - t0
    label_path = config.labels
    labels = None
    if is_metadata_spec(label_path):
        # The adapters' own metadata may not vary (within one family it often does not): then the report is
        # written without attribute sections, with the reason as an alert, instead of no report.
        try:
            label_path = str(metadata_labels(store.rows, label_path, out / "metadata_labels.json"))
            labels = load_labels(label_path, list(space.ids))
        except (ConfigError, FormatError) as exc:
            early_warnings.append(f"labels: {exc}; analysed without labels")
    elif label_path:
        labels = load_labels(label_path, list(space.ids))
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
    results: list[Result] = [collection_result(store)]
    warnings: list[str] = list(early_warnings)
    no_variance = not has_variance(space)
    if no_variance:  # one alert, and a section per analyzer saying it was skipped
        warnings.append(f"{NO_VARIANCE}; every analyzer was skipped (check that the inputs are different adapters)")
    for analyzer in analyzers:
        if analyzer.requires_labels and labels is None:
            warnings.append(f"{analyzer.name}: skipped (needs --labels)")
            continue
        t0 = time.perf_counter()
        try:
            if no_variance:
                raise SkipAnalysis(NO_VARIANCE)
            analyzer.fit(ctx)
            result = analyzer.result()
            if ctx.out is not None:
                analyzer.write_artifacts(Path(ctx.out))
        except SkipAnalysis as exc:
            if not no_variance:
                warnings.append(f"{analyzer.name}: skipped ({exc})")
            results.append(skipped_result(analyzer, str(exc)))
            continue
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
        "store": {"path": str(store.path), "fingerprint": store.fingerprint, "repr": store.repr},
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


#: Fewest adapters ``wsa analyze`` accepts: one component needs two; analyzers that need more are skipped.
MIN_ADAPTERS = 2


def _fit(store: Store, k: int, config: AnalyzeConfig, gram: bool, client: Any, progress: bool) -> Any:
    """The space: from factor Grams (``--space delta`` on factors), on Dask, or in this process."""
    if gram:
        from wsa.devices import resolve_device
        from wsa.gram import fit_delta_gram

        return fit_delta_gram(store, k, device=str(resolve_device(config.device)), progress=progress)
    if client is not None:
        from wsa.dask_engine import fit_space_dask

        return fit_space_dask(
            store, k, client=client, center=config.center, standardize=config.standardize, random_state=config.seed
        )
    from wsa.space import fit_space

    return fit_space(
        store,
        k,
        center=config.center,
        standardize=config.standardize,
        solver=config.solver,
        random_state=config.seed,
        device=config.device,
        progress=progress,
    )


def nonfinite_rows(store: Store, block_rows: int = 256) -> list[str]:
    """Ids of the rows holding NaN or ±Inf (one pass over the matrix)."""
    bad: list[str] = []
    ids = store.ids
    for start, block in store.iter_blocks(block_rows):
        finite = np.isfinite(np.asarray(block)).all(axis=1)
        bad.extend(str(ids[start + i]) for i in np.flatnonzero(~finite))
    return bad


def _refuse_nonfinite_rows(store: Store) -> None:
    """Raise a :class:`ConfigError` naming the non-finite rows, if there are any; else return."""
    try:
        bad = nonfinite_rows(store)
    except Exception:  # the store itself is broken: the caller re-raises the original error
        return
    if bad:
        shown = ", ".join(repr(terminal_safe(b, 80)) for b in bad[:5])
        more = f", … ({len(bad)} in all)" if len(bad) > 5 else ""
        raise ConfigError(
            f"{len(bad)} adapter(s) hold NaN or Inf values: {shown}{more}; remove or re-export them and re-ingest",
            store.path,
        ) from None


def skipped_result(analyzer: Any, reason: str) -> Result:
    """A report section for an analyzer the collection cannot support, saying why."""
    return Result(
        analyzer.name,
        analyzer.title or analyzer.name,
        f"Skipped: {reason}.",
        notes=(f"{analyzer.name} did not run: {reason}.",),
        data={"skipped_because": reason},
        params=analyzer.get_params(),
    )


def collection_result(store: Store) -> Result:
    """The report's first section: what the store holds (family, formats) and every file left out, with why."""
    from collections import Counter

    from wsa.analyses.base import Metric, Table

    rows = store.rows
    formats = Counter((r.get("family") or "unknown", r.get("format") or "?") for r in rows)
    left = [(d["source"], "left out", d["reason"]) for d in store.manifest.get("left_out", [])]
    bad = [(d["source"], "unreadable or does not fit", d["reason"]) for d in store.manifest.get("problems", [])]
    tables = [
        Table(
            "formats",
            "Adapters in this space by model family and trainer format.",
            ("family", "format", "adapters"),
            tuple((f, fmt, n) for (f, fmt), n in sorted(formats.items())),
        )
    ]
    if left or bad:
        tables.append(
            Table(
                "left_out",
                "Files found in the inputs that are not in this space, each with its reason.",
                ("file", "status", "reason"),
                tuple(bad + left),
            )
        )
    family = store.manifest.get("family") or "unknown"
    summary = f"{len(rows)} adapters of family {family}"
    if left or bad:
        summary += f"; {len(left) + len(bad)} file(s) left out (listed below)"
    return Result(
        "collection",
        "The collection: family, formats and left-out files",
        summary,
        metrics=(Metric("adapters", len(rows)), Metric("left out", len(left) + len(bad))),
        tables=tuple(tables),
        warnings=tuple(f"{p}: {r}" for p, _, r in bad[:20]),
        data={"family": family, "left_out": [list(x) for x in bad + left]},
    )


def _run_per_family(
    inputs: Sequence[str | Path],
    out: Path,
    config: AnalyzeConfig,
    groups: Mapping[str, list[str]],
    problems: list[tuple[str, str]],
    *,
    cache: str | Path | None,
    argv: Sequence[str] | None,
    progress: bool,
) -> Path:
    """One space and report per family under ``out/<family>/``, and ``out/index.html`` with a section each."""
    from dataclasses import replace

    from wsa.errors import WsaError
    from wsa.reports.families import write_family_index

    entries = []
    for fam, paths in groups.items():
        sub = replace(config, family=fam, skip_bad=True)  # unreadable files are listed on the top page
        entry: dict[str, Any] = {"family": fam, "adapters": len(paths), "example": paths[0]}
        if len(paths) < MIN_ADAPTERS:
            entry["error"] = f"{len(paths)} adapter(s): an analysis needs at least {MIN_ADAPTERS}"
        else:
            try:
                index = run_analysis(
                    inputs,
                    out / fam,
                    sub,
                    cache=(Path(cache) / fam) if cache else None,
                    argv=argv,
                    progress=progress,
                )
                entry["report"] = f"{fam}/{index.name}"
                entry["headline"] = _read_headline(index.parent)
            except WsaError as exc:
                entry["error"] = str(exc)
        entries.append(entry)
    run = {"command": list(argv) if argv else None, "inputs": [str(p) for p in inputs]}
    index = write_family_index(out, entries, problems, run)
    if not any("report" in e for e in entries):
        reasons = "; ".join(f"{e['family']}: {e.get('error')}" for e in entries)
        raise ConfigError(f"{index}: no family could be analysed ({reasons})")
    return index


def _read_headline(folder: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((folder / "results.json").read_text())["run"].get("headline", {})
    except (OSError, ValueError, KeyError):
        return {}


def _record_decoding(folder: Path, store: Store, config: AnalyzeConfig) -> None:
    """``space/decoding.json``: what ``wsa sample/edit/invert/...`` need to turn points into models."""
    from wsa.decoding.decoder import find_base, zoo_prompt
    from wsa.workspace import write_decoding_info

    write_decoding_info(folder, store, config.base or find_base(store), zoo_prompt(store))


def _headline(store, space, results: Mapping[str, Result], warnings: list[str], labels) -> dict[str, Any]:
    head: dict[str, Any] = {
        "family": store.manifest.get("family") or "unknown",
        "adapters": len(store),
        "features": store.n_features,
        "representation": "delta (from factor Grams)" if space.geometry != "explicit" else store.repr,
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
