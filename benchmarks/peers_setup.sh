#!/usr/bin/env bash
# Create the peer virtualenvs the benchmarks drive as subprocesses (idempotent; rerun to repair).
#
#   .bench-venvs/saelens   sae-lens (pins TransformerLens < 4, so it cannot share our .venv)
#   .bench-venvs/sparsify  eai-sparsify
#
# torch is pinned to the CPU build our .venv uses (torch==2.13.0; pip finds the local +cpu wheel via
# its find-links): unpinned, the resolver would pull a multi-GB CUDA build.
# Override the interpreter with PYTHON=..., the versions with SAELENS_SPEC=... / SPARSIFY_SPEC=...,
# and which venvs with PEERS="saelens sparsify" (`make test` needs only saelens, for the interop test).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="$ROOT/.bench-venvs"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
SAELENS_SPEC="${SAELENS_SPEC:-sae-lens==6.54.12}"
SPARSIFY_SPEC="${SPARSIFY_SPEC:-eai-sparsify==1.3.3}"

make_venv() {  # name, import-check module, pip specs...
  local name="$1" module="$2"
  shift 2
  local venv="$VENVS/$name"
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import $module, torch" 2>/dev/null; then
    echo "[$name] ok: $("$venv/bin/pip" list 2>/dev/null | grep -iE "^($module|sae-lens|eai-sparsify|torch) " | tr -s ' ' | paste -sd, -)"
    return
  fi
  echo "[$name] creating $venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "$TORCH_SPEC" "$@"
  "$venv/bin/python" -c "import $module, torch; print('[$name] installed, torch', torch.__version__)"
}

mkdir -p "$VENVS"
PEERS="${PEERS:-saelens sparsify}"
[[ " $PEERS " == *" saelens "* ]] && make_venv saelens sae_lens "$SAELENS_SPEC"
[[ " $PEERS " == *" sparsify "* ]] && make_venv sparsify sparsify "$SPARSIFY_SPEC"
exit 0
