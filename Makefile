# Two commands on a fresh machine (README, "Install and quickstart"):
#   make quickstart   install into $(VENV) if needed, then train the quickstart run into runs/quickstart
#   make test         install into $(VENV) if needed, then lint (ruff check) and run the test suite
# VENV picks the virtual environment (make test VENV=.ci-venv); PYTHON and PMSERVE_TORCH pass through to
# scripts/install.sh. An environment counts as installed once it has bin/pmserve, which pip writes last.

VENV ?= .venv

.PHONY: quickstart test setup

quickstart: $(VENV)/bin/pmserve
	$(VENV)/bin/pmserve train builtin:wordnet-nouns --out runs/quickstart

test: $(VENV)/bin/pmserve
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest tests

setup: $(VENV)/bin/pmserve

$(VENV)/bin/pmserve:
	bash scripts/install.sh $(VENV)
