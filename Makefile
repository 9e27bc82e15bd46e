# Short entry points. Each target sets itself up on a fresh machine (CPU torch from the
# local wheel; GPU users install their own CUDA torch first and `pip install -e .`).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sau-installed

.PHONY: setup test test-fast test-compat test-interpreter compile-lane demo demo-quick sweep-quick durability-study bench bench-gpu-smoke bench-memory bench-memory-gpu-smoke lint format

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The whole suite: the PyTorch lane, then the Triton kernels in the CPU interpreter and
# the compile lane over the launches the interpreter recorded (`compile-lane` below).
# TEST_WORKERS: pytest-xdist processes for the PyTorch and compatibility lanes (one
# intra-op thread each, tests/conftest.py; work stealing, so the few long tests do not
# leave one worker idle at the end); 0 runs them in this process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal
	$(MAKE) compile-lane

# The Triton interpreter lane, recording every kernel launch, then the compile lane: the
# recorded specializations compiled for sm_80/90/100/120 without a GPU. A table on stdout,
# JSON in runs/compile-lane/report.json; `LANE_FLAGS=--all` compiles every specialization.
compile-lane: setup
	TRITON_INTERPRET=1 SAU_BACKEND=triton $(BIN)/python -m pytest -q -p tests.compile.recorder --record-launches=runs/compile-lane/launches.json tests/kernels tests/sau/test_optim.py tests/sau/test_optim_in_backward.py tests/sau/test_optim_lowbit.py tests/sau/test_optim_hooks.py tests/sau/test_plan.py tests/sau/test_layouts.py
	$(BIN)/python -m tests.compile.lane runs/compile-lane/launches.json --out runs/compile-lane/report.json $(LANE_FLAGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The compatibility lane: the lowest versions pyproject.toml declares, in its own venv
# (.venv-compat), so "declared" means "tested". torch is the CPU wheel (the only one this
# machine installs); every other pin is the floor pyproject.toml declares.
COMPAT_VENV ?= .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.sau-compat-installed
COMPAT_PINS ?= torch==2.13.0 triton==3.9.0 numpy==1.26.4 transformers==5.3.0 \
	tokenizers==0.22.2 scipy==1.11.4 rouge-score==0.1.2 tqdm==4.66.1 matplotlib==3.8.4 pyyaml==6.0.1 \
	pytest==7.4.4 pytest-benchmark==4.0.0 pytest-xdist==3.8.0 accelerate==1.4.0
COMPAT_TESTS ?= tests/sau tests/kernels

$(COMPAT_STAMP): pyproject.toml Makefile
	test -x $(COMPAT_BIN)/python || $(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install -q --upgrade pip
	# Exactly the floors pyproject.toml declares (keep the two in step).
	$(COMPAT_BIN)/python -m pip install -q $(COMPAT_PINS)
	$(COMPAT_BIN)/python -m pip install -q -e . --no-deps
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_BIN)/python -c "import torch, transformers, tokenizers; print('compat lane: torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
	$(COMPAT_BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(COMPAT_TESTS)

demo: setup
	$(BIN)/sau demo --out runs/demo

demo-quick: setup
	$(BIN)/sau demo --quick --out runs/demo-quick

sweep-quick: setup
	$(BIN)/sau sweep --preset quick --out runs/sweep-quick

# The durability study of docs/results.md, one command per corpus and dtype: both pruning
# methods side by side (one thread each; resumable), then the summary and plot in
# runs/durability-$(CORPUS)-$(DTYPE)/. CORPUS=tofu for the TOFU-scale corpus.
CORPUS ?= default
DTYPE ?= float32
DURABILITY_LRS ?= 1e-4 2e-4 5e-4 1e-3 2e-3 4e-3
DURABILITY_MAX_EPOCHS ?= 60
DURABILITY_OUT := runs/durability-$(CORPUS)-$(DTYPE)
durability-study: setup
	pids=; for p in magnitude wanda; do \
		OMP_NUM_THREADS=1 $(BIN)/sau sweep --out $(DURABILITY_OUT)-$$p --corpus $(CORPUS) \
			--dtype $(DTYPE) --sparsity 0.5 --prune $$p \
			--variant dense masked sau-update sau-durable --lr $(DURABILITY_LRS) \
			--seed 0 1 2 --stop-at retain --max-epochs $(DURABILITY_MAX_EPOCHS) --bits 4 nf4 --no-progress & \
		pids="$$pids $$!"; \
	done; fail=0; for pid in $$pids; do wait $$pid || fail=1; done; exit $$fail
	$(BIN)/python -m sau.lab.durability_study $(DURABILITY_OUT)-magnitude \
		$(DURABILITY_OUT)-wanda --out $(DURABILITY_OUT)

# CPU microbenchmarks (< 5 minutes on 2 cores): JSON in benchmarks/results/cpu.json.
bench: setup
	$(BIN)/python -m pytest benchmarks/cpu -q -p no:cacheprovider --benchmark-only \
		--benchmark-json=benchmarks/results/cpu-raw.json
	$(BIN)/python benchmarks/summarize_cpu.py benchmarks/results/cpu-raw.json benchmarks/results/cpu.json

# Peak memory of one unlearning step per configuration, ~1B-shaped fp32 model on the CPU,
# each configuration in a fresh process: benchmarks/results/memory-cpu.json + a table.
bench-memory: setup
	$(BIN)/python benchmarks/memory.py

# The GPU mode of the memory benchmark at a tiny size on the CPU: proves its code path.
bench-memory-gpu-smoke: setup
	$(BIN)/python benchmarks/memory.py --gpu --tiny --out runs/memory-gpu-smoke.json

# The whole GPU session script at tiny sizes under the interpreter: every step runs and
# writes the JSON the README's GPU table is built from (runs/gpu-session-smoke/).
bench-gpu-smoke: setup
	OUT=runs/gpu-session-smoke SMOKE=1 PY=$(BIN)/python bash benchmarks/gpu_session.sh

lint: setup
	$(BIN)/ruff check sau sau_kernels tests benchmarks
	$(BIN)/ruff format --check sau sau_kernels tests benchmarks

format: setup
	$(BIN)/ruff format sau sau_kernels tests benchmarks
