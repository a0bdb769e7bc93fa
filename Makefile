# The two commands: `make demo` and `make test`. Both create .venv on first use; each installs
# only what it needs (a stamp file per set of extras).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
DOCS_STAMP := $(VENV)/.docs-installed
SOURCES := jaxce tests benchmarks examples notebooks/execute.py
# pip without its progress output, and without setuptools' "Editable installation" notice (a
# warning the build backend gives on every `pip install -e`): that one warning is filtered by
# its message; errors and every other warning still show.
PIP_INSTALL := PYTHONWARNINGS="$${PYTHONWARNINGS:+$$PYTHONWARNINGS,}ignore:Editable installation" $(BIN)/pip install --quiet
# pytest ends each line of results with the suite's progress, `[ 42%]`; at 80 columns that is
# every 72 tests, where a terminal or CI log reporting thousands of columns would show it only
# at the end.
PYTEST := COLUMNS=80 $(BIN)/pytest -o console_output_style=progress -n 2 --doctest-modules

.PHONY: test test-all demo docs lint typecheck bench bench-quick notebooks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Everything: the test suite, the notebooks, the benchmarks.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[test]'
	touch $(STAMP)

# The demo only: jaxce, optax, tqdm, scikit-learn, equinox and flax.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[demo]'
	touch $(DEMO_STAMP)

# The documentation site: Sphinx only (the docs extra), warnings are errors; open
# docs/_build/html/index.html. The notebooks are rendered from their committed outputs.
$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy jaxce examples benchmarks

# The suite without the tests marked slow (the notebooks re-executed, the wheel built, ...):
# about seven minutes on two idle cores with ruff and mypy. `make test-all` runs those too.
test: lint typecheck
	$(PYTEST) -m "not slow" jaxce tests

test-all: lint typecheck
	$(PYTEST) jaxce tests

demo: $(DEMO_STAMP)
	$(BIN)/python -m examples.demo

# Re-executes the notebooks in place (then commit them): tests/repository/test_notebooks.py
# fails when a committed notebook's outputs differ from a fresh execution's.
notebooks: $(STAMP)
	$(BIN)/python notebooks/execute.py

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
