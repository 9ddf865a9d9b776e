# Two commands on a fresh machine (README, "Install and quickstart"):
#   make quickstart   install into $(VENV) if needed, then train the quickstart run into runs/quickstart
#   make test         install into $(VENV) if needed, then lint (ruff check, ruff format --check) and run the
#                     test suite
#   make bench-smoke  build the peers' environments if needed (benchmarks/*_env.sh), then run every comparison
#                     (PEFT, mergekit, Optimum, our server, KServe) at tiny sizes into $(SMOKE): that each still
#                     runs, not what it measures; a dependency's change shows the day it lands
# VENV picks the virtual environment (make test VENV=.ci-venv); PYTHON and PMSERVE_TORCH pass through to
# scripts/install.sh. An environment counts as installed once it has bin/pmserve, which pip writes last.

VENV ?= .venv

.PHONY: quickstart test setup bench-smoke

quickstart: $(VENV)/bin/pmserve
	$(VENV)/bin/pmserve train builtin:wordnet-nouns --out runs/quickstart

test: $(VENV)/bin/pmserve
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest tests

setup: $(VENV)/bin/pmserve

$(VENV)/bin/pmserve:
	bash scripts/install.sh $(VENV)

# Each peer environment counts as built once its script has finished in it (the stamp is written after).
SMOKE ?= /tmp/pmserve-bench-smoke
PEERS = .venv-mergekit/.bench-ready .venv-kserve/.bench-ready .venv-optimum/.bench-ready

.venv-%/.bench-ready:
	bash benchmarks/$*_env.sh .venv-$*
	touch $@

bench-smoke: $(VENV)/bin/pmserve $(PEERS)
	$(VENV)/bin/python benchmarks/merge_bench.py speed --smoke --methods avg --work $(SMOKE)/merge --json $(SMOKE)/merge_bench.json
	$(VENV)/bin/python benchmarks/mergekit_bench.py --smoke --methods linear --work $(SMOKE)/mergekit --json $(SMOKE)/mergekit_bench.json
	$(VENV)/bin/python benchmarks/optimum_bench.py --models embedder --batches 1 --seq 16 --torch-batch 1 \
		--runs 1 --block 2 --warmup 1 --reexport --work $(SMOKE)/optimum --json $(SMOKE)/optimum_bench.json
	rm -rf $(SMOKE)/bundle
	$(VENV)/bin/pmserve export $(SMOKE)/optimum/merged --out $(SMOKE)/bundle
	$(VENV)/bin/python benchmarks/serve_bench.py --bundle $(SMOKE)/bundle --inputs words --batches 1,8 \
		--concurrency 2 --requests 20 --seconds 2 --warmup 2 --out $(SMOKE)/serve_bench.json
	$(VENV)/bin/python benchmarks/kserve_bench.py --bundle $(SMOKE)/bundle --servers pmserve,kserve \
		--inputs words --concurrency 2 --repeats 1 --seconds 2 --requests 20 --warmup 2 --raw-seconds 0.2 \
		--wait-load 0 --out $(SMOKE)/kserve_bench.json
