# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when it is missing
# and installs the project into it with pip (uv/poetry do not see the local CPU torch build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAEWB := $(VENV)/bin/saewb
STAMP := $(VENV)/.installed-stamp
WORKSPACE ?= workspace.duckdb
DEMO_HOOK ?= blocks.3.hook_out
DEMO_RUN ?= demo-topk
PORT ?= 8501
export PIP_DISABLE_PIP_VERSION_CHECK = 1
export XLA_PYTHON_CLIENT_PREALLOCATE = false
export TOKENIZERS_PARALLELISM = false

.PHONY: install browser demo demo-pipeline test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import activations, analysis, app, sae, saewb, torch, jax, duckdb, transformer_lens, streamlit, playwright" \
		|| (echo "install failed: see the pip output above"; exit 1)
	@touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's chromium (never a downloaded browser); install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

## demo: the whole pipeline on the built-in corpus and MiniLM, then serve the app on localhost.
demo: demo-pipeline
	$(SAEWB) app $(WORKSPACE) --port $(PORT)

demo-pipeline: $(STAMP)
	$(SAEWB) harvest --model minilm --corpus stdlib-docs --hook $(DEMO_HOOK) --ctx-len 128 --workspace $(WORKSPACE)
	$(SAEWB) train --workspace $(WORKSPACE) --hook $(DEMO_HOOK) --arch topk --n-latents 4096 --k 32 \
		--train-tokens 1000000 --batch-size 4096 --seed 0 --name $(DEMO_RUN)
	$(SAEWB) eval $(DEMO_RUN) --workspace $(WORKSPACE)
	$(SAEWB) analyze $(DEMO_RUN) --workspace $(WORKSPACE)

test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/harvest.py

clean:
	rm -rf $(WORKSPACE) $(WORKSPACE).wal $(basename $(WORKSPACE)).runs .pytest_cache test-artifacts
