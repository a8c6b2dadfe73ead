# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when it is missing
# and installs the project into it with pip (uv/poetry do not see the local CPU torch build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAEWB := $(VENV)/bin/saewb
STAMP := $(VENV)/.installed-stamp
WORKSPACE ?= workspace.duckdb
DEMO_HOOK ?= blocks.3.hook_out
DEMO_TOKENS ?= 200000
export PIP_DISABLE_PIP_VERSION_CHECK = 1
export XLA_PYTHON_CLIENT_PREALLOCATE = false

.PHONY: install demo demo-harvest demo-train test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import activations, sae, saewb, torch, jax, duckdb, transformer_lens" || (echo "install failed"; exit 1)
	@touch $(STAMP)

install: $(STAMP)

## demo: harvest the built-in corpus through the bundled MiniLM, train a TopK SAE, analyse, serve.
demo: demo-harvest demo-train

demo-harvest: $(STAMP)
	$(SAEWB) harvest --model minilm --corpus stdlib-docs --hook $(DEMO_HOOK) --ctx-len 128 \
		--max-tokens $(DEMO_TOKENS) --workspace $(WORKSPACE)

demo-train: $(STAMP)
	@if $(PY) -c "import sae.cli" 2>/dev/null; then \
		$(SAEWB) train --workspace $(WORKSPACE) --hook $(DEMO_HOOK) --arch topk --n-latents 4096 --k 32 \
			--train-tokens 2000000 --batch-size 4096 --seed 0 --name demo-topk; \
	else echo "trainers not installed yet; skipping training"; fi

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/harvest.py

clean:
	rm -rf $(WORKSPACE) $(WORKSPACE).wal $(basename $(WORKSPACE)).runs .pytest_cache
