# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test test-fast test-base demo app clean

install: $(STAMP)

# Re-run only when the package metadata changes. On a machine without an NVIDIA driver we take
# the CPU wheel of torch (a local file here, a ~200 MB download elsewhere) before anything can
# pull the multi-GB CUDA build; on a GPU machine pip resolves the normal torch.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0 || \
		$(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e '.[dev,app,bench]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

# ruff's rules and line length are in pyproject.toml.
lint: install
	$(PY) -m ruff check .

# Two test files at a time (pytest-xdist; a file's tests stay together, so its fixtures are built once): most tests
# are single-threaded subprocesses, which one core each keeps busy (docs/measurements.md has the suite's time). The
# base recipe at real sizes (GBs, minutes of CPU) has its own target.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not base_size" tests

# Before every commit: the units, without the tests marked slow (those that launch training scripts, torchrun, a fresh
# Python, a browser or Java); `make test` runs everything CI runs.
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not base_size" tests

test-base: install
	$(PY) -m pytest -q -m base_size tests

demo: install
	$(PY) -m demo

# A web page on the demo's models (after `make demo`): http://127.0.0.1:7860
app: install
	@test -d outputs/demo/vlm -a -d outputs/demo/qformer -a -d outputs/demo/data/validation || \
		{ echo "outputs/demo/ has no trained models or validation shards: run make demo first" >&2; exit 1; }
	$(PY) -m app --model outputs/demo/vlm --qformer outputs/demo/qformer --examples outputs/demo/data/validation

clean:
	rm -rf outputs/demo
