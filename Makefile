# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   profile the bundled trainer on its default and print where the output is
#   make test   lint, type-check and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.perfkit-installed

.PHONY: demo test lint typecheck pytest install clean

# Re-install only when the declared dependencies or pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/perfkit demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check perfkit collectors analyzers reports tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
