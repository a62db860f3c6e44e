# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean engines

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch; the package itself only asks for a range
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,llamacpp]'
	# the z-lab reference implementation, used only as a test oracle
	$(PY) -m pip install --quiet --no-deps dflash==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dflash-lab demo $(ARGS)

# vLLM in its own managed environment (docs/serving-vllm.md): about 3 minutes and 3.5 GB the first
# time, nothing once installed. Where it cannot install, tests/integration/test_vllm.py skips and says why.
engines: $(STAMP)
	$(VENV)/bin/dflash-lab engines install vllm || echo "vLLM could not be installed here; its tests will be skipped"

test: $(STAMP) engines
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
