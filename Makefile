# Two commands for newcomers:  `make demo`  and  `make test`.
# Each creates .venv with a Python >= 3.12 (found by scripts/find_python.sh, pyenv included),
# installs lrnnx-jax with the pinned versions of constraints.txt, and runs.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@python_bin=$$(scripts/find_python.sh) && echo "using $$python_bin" && "$$python_bin" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $@

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q -n auto --durations=25 tests

clean:
	rm -rf $(VENV)
