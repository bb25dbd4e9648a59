# Two entry points, both doing all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on local disk (an unpinned torch pulls a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: the shipped faces zoo (1,000 rank-1 LoRAs fine-tuned on the
# shipped base model) unpacked as PEFT folders and analysed, with decoded image galleries scored by the
# attribute oracle, into reports/demo/index.html (open it from disk). No GPU needed.
demo: $(STAMP)
	$(VENV)/bin/wsa world unpack faces --out demo/faces
	$(VENV)/bin/wsa analyze demo/faces --labels demo/faces/attributes.csv --decode --out reports/demo --quiet
	$(VENV)/bin/wsa info reports/demo/store
	@echo "report: reports/demo/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/check_layers.py

# The report test opens index.html in headless Chromium (Debian's `chromium`); WSA_SKIP_BROWSER=1 skips it.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will fail (or set WSA_SKIP_BROWSER=1)"

test: $(STAMP) lint browser
	$(PY) -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) demo build *.egg-info
