# Every target sets itself up: the first command on a fresh clone creates .venv and installs
# what is missing; later runs reuse it (the stamp is newer than pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kernel-club-installed
LAB    ?=
# pytest workers: the machine has 2 cores; notebooks and test files are spread whole (loadfile)
WORKERS ?= 2

.PHONY: setup test lint unit nbval lab run-lab list-labs bench claims compile models clean distclean
.PHONY: gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Unit tests spread over the cores; then the labs one at a time, so the wall-clock claims they
# record are not measured against a second notebook competing for the same two cores.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest tests -n $(WORKERS) --dist loadfile --durations=10
	$(BIN)/pytest labs --nbval-lax --nbval-current-env --nbval-cell-timeout=900 --durations=10
	$(BIN)/kclub claims

lint: setup
	$(BIN)/ruff check .

unit: setup
	$(BIN)/pytest tests -n $(WORKERS) --dist loadfile

nbval: setup
	$(BIN)/pytest labs --nbval-lax --nbval-current-env --nbval-cell-timeout=900

lab: setup
	$(BIN)/kclub lab

run-lab: setup
	@test -n "$(LAB)" || { echo "usage: make run-lab LAB=<slug>; labs:"; $(BIN)/kclub list; exit 2; }
	$(BIN)/kclub run $(LAB)

list-labs: setup
	@$(BIN)/kclub list

bench: setup
	$(BIN)/kclub bench $(LAB)

claims: setup
	@$(BIN)/kclub claims

# Every kernel compiled for sm_80/sm_90 and lowered for TPU, from this machine (no GPU needed):
# registers, spills, shared memory, instruction mix. make test runs it (tests/test_compile.py).
compile: setup
	$(BIN)/kclub compile $(if $(TARGET),--target $(TARGET))

# Retrain the tiny models into build/models/ (the labs use the checkpoints shipped in
# shared/models/checkpoints/; add ARGS=--ship to overwrite those). About 20-40 min on 2 cores.
models: setup
	$(BIN)/python -m shared.models.zoo --threads 1 $(ARGS)

# One prepared run on an NVIDIA machine with no network: the machine's own python3, torch,
# triton and jax (PYTHONPATH=., no venv, so no `setup`); report in $(OUT) (README, "On a GPU").
OUT ?= build/gpu-run
gpu-check:
	PYTHONPATH=. python3 scripts/gpu_check.py --out $(OUT)

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
