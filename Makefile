# Two commands for newcomers:  `make demo`  and  `make test`.
# Each creates .venv with a Python >= 3.12 (found by scripts/find_python.sh, pyenv included),
# installs lrnnx-jax with the pinned versions of constraints.txt, and runs.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test gpu-test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@python_bin=$$(scripts/find_python.sh) && echo "using $$python_bin" && "$$python_bin" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	@touch $@

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q -n auto --durations=25 tests

# On the project's GPU machine, whose Python already has every package (nothing is installed there): the whole
# suite on the GPU, with the fixtures of .fixtures (a copy of ../shared/fixtures) when that folder exists. Several
# workers share the GPU, so none preallocates most of its memory.
gpu-test:
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(if $(wildcard .fixtures),LRNNX_FIXTURES=$(CURDIR)/.fixtures) \
		python3 -m pytest -q -n 4 -p no:cacheprovider --durations=25 tests

clean:
	rm -rf $(VENV)
