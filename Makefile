# Two commands do all the set-up on a fresh machine (Python 3.11+ with venv):
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
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,clients]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/perfkit demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check perfkit collectors analyzers reports tests bench

# mypy cannot follow setuptools' package-dir mapping: check a symlinked copy of the installed layout.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs "$(CURDIR)/perfkit" build/typecheck/perfkit
	for d in collectors analyzers reports; do cp -rs "$(CURDIR)/$$d" build/typecheck/perfkit/$$d; done
	cd build/typecheck && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" --cache-dir "$(CURDIR)/.mypy_cache" -p perfkit

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
