"""The HTML report as a reader meets it: files on disk, numbers in JSON, escaping, truncation, determinism,
and the page opened in a real (headless) browser with its script running without errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from wsa.analyses.base import Figure, Metric, Result, Table
from wsa.reports import write_report

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ATTR = '"onerror="alert(2)'
CHROMIUM = os.environ.get("WSA_CHROMIUM", "/usr/bin/chromium")


def _figure(seed: int = 0) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.cumsum(rng.normal(size=50)), color="#0072B2")
    ax.set_xlabel("component")
    ax.set_ylabel("cumulative variance")
    return Figure.from_matplotlib("scree", "Look for the elbow: variance beyond it is noise.", fig)


def _results(n_big: int = 260) -> list[Result]:
    """Two results: a clean one and one whose ids, labels and captions carry markup."""
    pca = Result(
        analyzer="pca",
        title="Spectrum",
        summary="The first 12 PCs explain 95% of the variance.\n\nA second paragraph.",
        metrics=(
            Metric("PCs for 95%", 12, higher_is_better=None),
            Metric("held-out reconstruction R²", 0.9134, higher_is_better=True, ci=(0.90, 0.925)),
        ),
        figures=(_figure(),),
        tables=(
            Table(
                "variance",
                "Explained variance per PC.",
                ("pc", "ratio"),
                tuple((i, float(0.5**i)) for i in range(1, 6)),
            ),
        ),
        notes=("Signs fixed by the svd_flip rule.",),
        data={"explained_variance_ratio": [0.5, 0.25, 0.125], "n_95": 12},
        params={"n_components": 100, "solver": "auto"},
    )
    ids = [f"adapter_{i:04d}" for i in range(n_big)]
    ids[3] = HOSTILE
    ids[4] = HOSTILE_ATTR
    probes = Result(
        analyzer="probes",
        title=f"Linear probes {HOSTILE}",
        summary=f"Probe for label {HOSTILE} and {HOSTILE_ATTR}.",
        metrics=(
            Metric(f"AUC {HOSTILE}", 0.8712, higher_is_better=True, chance=0.5, ci=(0.84, 0.9)),
            Metric("Brier", 0.1234, higher_is_better=False),
            Metric("failed", float("nan")),
        ),
        tables=(
            Table(
                "scores",
                f"One row per adapter ({HOSTILE_ATTR}).",
                ("id", "score", "label"),
                tuple((ids[i], float(np.sin(i)), "yes" if i % 2 else None) for i in range(n_big)),
                max_rows_in_report=50,
            ),
            Table("no_csv", "Kept out of CSV.", ("a",), ((1,), (2,)), write_csv=False),
        ),
        figures=(Figure.from_matplotlib("hist", f"Histogram {HOSTILE_ATTR}", _mpl_fig()),),
        notes=(f"note {HOSTILE}",),
        warnings=(f"label {HOSTILE} is imbalanced (3 positives)",),
        data={"auc": 0.8712, "per_label": {HOSTILE: 0.8712}},
        params={"cv": 5, "label": HOSTILE},
    )
    return [pca, probes]


def _mpl_fig():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.hist(np.random.default_rng(0).normal(size=200), bins=20, color="#E69F00")
    return fig


def _run_info() -> dict:
    return {
        "title": f"loras {HOSTILE}",
        "headline": {
            "adapters": 260,
            "features": 99648,
            "representation": "raw",
            "PCs for 95% variance": 12,
            "best probe": f"{HOSTILE}: 0.871",
            "warnings": 1,
        },
        "command": ["wsa", "analyze", "loras/", "--out", f"rep {HOSTILE}"],
        "config": {"n_components": 100, "labels": f"{HOSTILE}.csv"},
        "inputs": ["loras/"],
        "store": {"path": "loras/.wsa", "fingerprint": "sha256:abc123"},
        "versions": {"wsa": "0.1.0", "numpy": np.__version__},
        "timings_s": {"ingest": 1.5, "pca": 0.25, "probes": 0.75},
        "warnings": [f"probes: label {HOSTILE} is imbalanced (3 positives)"],
        "platform": "Linux x86_64",
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Result]]:
    results = _results()
    out = tmp_path_factory.mktemp("report")
    index = write_report(results, _run_info(), out)
    return index, results


def test_writes_index_json_and_csvs(report: tuple[Path, list[Result]]) -> None:
    index, _ = report
    out = index.parent
    assert index == out / "index.html"
    names = sorted(p.name for p in out.iterdir())
    # One CSV per table with write_csv=True, none for the other, no temp files left behind.
    assert names == ["index.html", "pca_variance.csv", "probes_scores.csv", "results.json"]
    rows = list(csv.reader((out / "probes_scores.csv").open(encoding="utf-8")))
    assert rows[0] == ["id", "score", "label"]
    assert len(rows) == 1 + 260
    assert rows[4][0] == HOSTILE  # the CSV holds the raw value; only HTML escapes
    assert float(rows[2][1]) == float(np.sin(1))  # full precision, not the rounded display
    assert rows[1][2] == ""  # None -> empty cell


def test_results_json_round_trips_numbers(report: tuple[Path, list[Result]]) -> None:
    index, results = report
    text = (index.parent / "results.json").read_text(encoding="utf-8")
    payload = json.loads(text)
    assert payload["run"] == json.loads(json.dumps(_run_info()))
    expected = [json.loads(json.dumps(r.to_json())) for r in results]
    # The NaN metric is never silent: its section gets a note saying how many values were non-finite.
    expected[1]["notes"].append(
        "1 non-finite value(s) (NaN/Inf) in this section are written as null in results.json, as empty CSV cells "
        "and as '\u2014' or 'n/a' on this page."
    )
    assert payload["results"] == expected
    assert all("non-finite" not in n for r in payload["results"][:1] + payload["results"][2:] for n in r["notes"])
    probes = payload["results"][1]
    assert probes["metrics"][0]["value"] == 0.8712
    assert probes["metrics"][0]["ci"] == [0.84, 0.9]
    assert probes["metrics"][2]["value"] is None  # NaN becomes null, the file stays strict JSON
    assert probes["tables"][0]["rows"][7][1] == float(np.sin(7))
    assert text == json.dumps(payload, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def test_escapes_every_input_string(report: tuple[Path, list[Result]]) -> None:
    page = report[0].read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert HOSTILE_ATTR not in page
    assert "&quot;onerror=&quot;alert(2)" in page
    assert "alert(2)" not in page.replace("&quot;onerror=&quot;alert(2)", "")
    # Only the report's own two inline scripts, no external resources of any kind.
    scripts = re.findall(r"<script\b[^>]*>", page, flags=re.IGNORECASE)
    assert scripts == ["<script>", "<script>"]
    assert "data-js-errors" in page.split("<script>")[1]  # error catcher first, in <head>
    assert "table.sortable" in page.split("<script>")[2]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_layout_summary_first_then_sections_then_reproduce(report: tuple[Path, list[Result]]) -> None:
    page = report[0].read_text(encoding="utf-8")
    order = [page.index(s) for s in ('id="summary"', 'id="contents"', 'id="r-pca"', 'id="r-probes"', 'id="reproduce"')]
    assert order == sorted(order)
    assert "wsa report \u2014 loras &lt;script&gt;" in page
    assert "99,648" in page  # headline card
    assert "0.8712" in page and "CI [0.84, 0.9]" in page and "chance 0.5" in page
    assert 'title="higher is better"' in page and 'title="lower is better"' in page
    assert page.count("<figure") == 2 and page.count("<figcaption>") == 2
    assert 'src="data:image/png;base64,' in page
    assert "wsa analyze loras/ --out &#x27;rep &lt;script&gt;" in page  # shlex-quoted, then escaped
    assert "sha256:abc123" in page
    assert "<details><summary>Parameters and timing</summary><p>Elapsed: 0.75 s</p>" in page
    assert 'class="warning"' in page and "Alerts (1)" in page


def test_large_table_truncated_with_csv_link(report: tuple[Path, list[Result]]) -> None:
    page = report[0].read_text(encoding="utf-8")
    table = page[page.index('id="r-probes-table-1"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + 50  # header + the first max_rows_in_report rows
    assert "Showing the first 50 of 260 rows; the full table is in" in page
    assert '<a href="probes_scores.csv">probes_scores.csv</a>' in page
    small = page[page.index('id="r-pca-table-1"') :]
    assert small[: small.index("</table>")].count("<tr>") == 1 + 5
    assert "Showing the first" not in small[: small.index("</div></div>")]


def test_same_inputs_same_bytes(tmp_path: Path, report: tuple[Path, list[Result]]) -> None:
    index, results = report
    again = write_report(results, _run_info(), tmp_path / "again")
    for name in ("index.html", "results.json", "probes_scores.csv", "pca_variance.csv"):
        assert (index.parent / name).read_bytes() == (again.parent / name).read_bytes(), name
    # Negative control: a changed number changes the bytes.
    other = write_report(results[:1], _run_info(), tmp_path / "other")
    assert other.read_bytes() != index.read_bytes()


def test_size_warning_and_no_alerts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsa.reports.html as report_html

    result = Result("pca", "Spectrum", "ok", metrics=(Metric("x", 1.0),))
    page = write_report([result], {"title": "t"}, tmp_path / "a").read_text(encoding="utf-8")
    assert "No alerts" in page and "may open slowly" not in page
    monkeypatch.setattr(report_html, "MAX_REPORT_BYTES", 1000)
    page = write_report([result], {"title": "t"}, tmp_path / "b").read_text(encoding="utf-8")
    assert "may open slowly" in page and "Alerts (1)" in page


def test_hostile_table_and_analyzer_names_stay_in_folder(tmp_path: Path) -> None:
    table = Table("../../evil name", "c", ("a",), ((1,),))
    results = [Result("../x", "t", "s", tables=(table,)), Result("../x", "t2", "s", tables=(table,))]
    out = tmp_path / "rep"
    write_report(results, {}, out)
    csvs = sorted(p.name for p in out.glob("*.csv"))
    assert csvs == ["_x__.._evil_name-2.csv", "_x__.._evil_name.csv"]  # one path component each, none hidden
    assert sorted(p.name for p in tmp_path.rglob("*.csv")) == csvs  # nothing escaped the folder
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'href="_x__.._evil_name-2.csv"' in page  # each section links its own CSV


# ---------------------------------------------------------------------------------------------- browser


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    if os.environ.get("WSA_SKIP_BROWSER") == "1":
        pytest.skip("WSA_SKIP_BROWSER=1")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"{CHROMIUM} not found: install chromium (`apt-get install -y chromium`) to test the report in a "
            "browser, or set WSA_SKIP_BROWSER=1 to skip this test"
        )
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def _page_errors(stderr: str, page: Path) -> list[str]:
    """Console lines the page produced. Chromium logs every console message (any level) as
    ``INFO:CONSOLE:<line>] "<message>", source: <url> (<line>)``; the report logs nothing, so any such
    line from the page, and any "Uncaught" exception, is an error."""
    return [
        line
        for line in stderr.splitlines()
        if "Uncaught" in line or (":CONSOLE" in line and f"source: {page.as_uri()}" in line)
    ]


def test_page_opens_in_headless_browser(report: tuple[Path, list[Result]], tmp_path: Path) -> None:
    index = report[0]
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", index.as_uri(), tmp=tmp_path)
    assert shot.is_file(), proc.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 20_000  # a blank 1280x2000 page compresses to a few KB
    assert _page_errors(proc.stderr, index) == []
    if os.environ.get("WSA_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["WSA_KEEP_SCREENSHOT"])

    # The DOM after the page's scripts ran: the error catcher saw nothing, the sort script finished,
    # and the hostile strings are text, not elements.
    proc = _chromium("--dump-dom", index.as_uri(), tmp=tmp_path)
    dom = proc.stdout
    assert 'data-js-ready="1"' in dom, proc.stderr[-2000:]
    assert 'data-js-errors="0"' in dom
    assert len(re.findall(r"<script\b", dom)) == 2
    assert "alert(1)" in dom and "<script>alert(1)" not in dom
    assert _page_errors(proc.stderr, index) == []


def test_browser_checks_catch_a_broken_script(report: tuple[Path, list[Result]], tmp_path: Path) -> None:
    """Negative control for the checks above: a page whose script throws and logs must be caught twice."""
    broken = tmp_path / "broken.html"
    bad = "<script>undefinedFunction();</script><script>console.error('boom')</script></body>"
    broken.write_text(report[0].read_text(encoding="utf-8").replace("</body>", bad), encoding="utf-8")
    proc = _chromium("--dump-dom", broken.as_uri(), tmp=tmp_path)
    assert 'data-js-errors="2"' in proc.stdout, proc.stderr[-2000:]
    errors = _page_errors(proc.stderr, broken)
    assert len(errors) == 2
    assert "Uncaught ReferenceError" in errors[0] and "boom" in errors[1]


def test_clicking_a_header_sorts_numerically(report: tuple[Path, list[Result]], tmp_path: Path) -> None:
    """Click "score" (twice) in a copy of the page and read the order back out of the dumped DOM."""
    page = report[0].read_text(encoding="utf-8")
    probe = """<script>(function(){
var t=document.querySelector('#r-probes-table-1 table');
var b=t.tHead.rows[0].cells[1].querySelector('button');
function col(){return Array.prototype.map.call(t.tBodies[0].rows,
  function(r){return r.cells[1].getAttribute('data-v');}).join(',');}
b.click();document.body.setAttribute('data-asc',col());
b.click();document.body.setAttribute('data-desc',col());
var l=t.tHead.rows[0].cells[2].querySelector('button');l.click();
document.body.setAttribute('data-label-last',t.tBodies[0].rows[t.tBodies[0].rows.length-1].cells[2].textContent);
})();</script></body>"""
    copy = tmp_path / "sorted.html"
    copy.write_text(page.replace("</body>", probe), encoding="utf-8")
    proc = _chromium("--dump-dom", copy.as_uri(), tmp=tmp_path)
    dom = proc.stdout
    assert 'data-js-errors="0"' in dom, proc.stderr[-2000:]
    asc = [float(v) for v in re.search(r'data-asc="([^"]*)"', dom).group(1).split(",")]
    desc = [float(v) for v in re.search(r'data-desc="([^"]*)"', dom).group(1).split(",")]
    shown = [float(np.sin(i)) for i in range(50)]
    assert asc == sorted(shown)
    assert desc == sorted(shown, reverse=True)
    assert asc != shown  # the unsorted order differs, so this could fail
    assert re.search(r'data-label-last="\u2014"', dom)  # empty cells sort last


def test_csv_cells_from_inputs_never_open_as_formulas():
    """File names, metadata values and label names reach the CSVs: a leading = + - @ must not make a formula."""
    from wsa.analyses.base import Table
    from wsa.reports.html import _csv_bytes

    table = Table(
        "t", "caption", ("=HYPERLINK()", "value"), (("=cmd|' /C calc'!A0", -1.5), ("@SUM(A1)", 3), ("+1", "ok"))
    )
    text = _csv_bytes(table).decode()
    assert text.splitlines() == ["'=HYPERLINK(),value", "'=cmd|' /C calc'!A0,-1.5", "'@SUM(A1),3", "'+1,ok"]
