# Every target sets itself up: the first command on a fresh clone creates .venv and installs
# what is missing; later runs reuse it (the stamp is newer than pyproject.toml).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kernel-club-installed
LAB    ?=
# pytest workers: the machine has 2 cores; notebooks and test files are spread whole (loadfile)
WORKERS ?= 2
# One time limit per lab cell: nbval's, with pytest-timeout (which would kill the whole run) a
# minute later, so a slow cell is reported by nbval, with its number, before anything is killed.
CELL_TIMEOUT ?= 900
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
	--timeout=$(shell echo $$(( $(CELL_TIMEOUT) + 60 )))

.PHONY: setup test lint unit nbval lab run-lab list-labs bench claims compile models clean distclean
.PHONY: gpu-check site

setup: $(STAMP)

# Before building .venv: Python must be 3.11 or newer and able to make a venv with pip. A .venv
# that has no pip, or was made by an older Python, is half-made: removed, never reused.
NEED_PY := import sys; sys.exit(sys.version_info < (3, 11))
$(STAMP): pyproject.toml
	@$(PYTHON) -c '$(NEED_PY)' 2>/dev/null || { \
	  echo "kernel-club needs Python 3.11 or newer; '$(PYTHON)' is: $$($(PYTHON) -V 2>&1)."; \
	  echo "Install one (Debian/Ubuntu: apt install python3.11 python3.11-venv; macOS: brew"; \
	  echo "install python@3.11) and run: make PYTHON=python3.11 setup"; exit 2; }
	@if [ -d $(VENV) ] && ! { $(BIN)/python -c '$(NEED_PY)' && $(BIN)/python -m pip --version; \
	  } >/dev/null 2>&1; then echo "removing a half-made $(VENV)"; rm -rf $(VENV); fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "'$(PYTHON) -m venv' failed: install the venv module (apt install python3.11-venv)"; \
	  exit 2; }
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); \
	  echo "the new $(VENV) has no pip: install python3-venv / ensurepip for $(PYTHON)"; exit 2; }
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# the labs' kernel: a named kernelspec inside .venv, which a user-level "python3" cannot shadow
	$(BIN)/python -m ipykernel install --sys-prefix --name kernel-club \
	  --display-name "Kernel Club (.venv)" >/dev/null
	@# the browser test drives Debian's chromium (playwright cannot download browsers here)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && \
	   apt-get install -y -q chromium >/dev/null)); } || \
	  echo "note: no chromium, so tests/test_browser.py will fail: install Debian's chromium"
	@touch $(STAMP)

# Unit tests spread over the cores; then the labs one at a time, so the wall-clock claims they
# record are not measured against a second notebook competing for the same two cores.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest tests -n $(WORKERS) --dist loadfile --durations=10
	$(BIN)/pytest labs $(NBVAL) --durations=10
	$(BIN)/kclub claims

lint: setup
	$(BIN)/ruff check .

unit: setup
	$(BIN)/pytest tests -n $(WORKERS) --dist loadfile

nbval: setup
	$(BIN)/pytest labs $(NBVAL)

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

# A static site of the executed labs (outputs and figures), the claims table, the cards, docs/
# and the GPU reports: build/site/index.html. A lab's page is its executed copy in build/<slug>/
# (nbval in `make test` and `kclub run` both write it); labs without a current one are run first.
# The build fails on a broken link or on a lab page missing a figure.
site: setup
	$(BIN)/python -m shared.site --run

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
