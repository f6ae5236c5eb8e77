#!/usr/bin/env bash
# Create (or refresh) the isolated virtual environment for the `speculators` 0.9.0 peer benchmark.
# Idempotent: re-running only installs what is missing. See /work/shared/DESIGN.md §6.
# CPU torch comes from the machine's wheel cache; never install an unpinned torch (it pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-speculators
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install torch==2.13.0
# speculators declares torchvision/torchaudio/vllm etc.; install it alone and add its light deps.
"$PIP" install --no-deps speculators==0.9.0
"$PIP" install aiohttp click "datasets>=4.0.0,<=5.1.0" httpx huggingface-hub \
    "loguru>=0.7.2,<=0.7.3" "numpy>=2.0.0,<=2.5.4" "openai>=2.0.0" protobuf psutil \
    "pydantic>=2" "pydantic-settings>=2" rich safetensors "tqdm>=4.66.3,<=4.70.1" \
    "transformers>=5.0.0,<=5.19.0" "typer>=0.12.0" "hs-connectors==0.9.0"
# Packaged chat data used when no --data folder is given (data only, no imports of its deps).
"$PIP" install --no-deps chitchat-dataset
# Guard: the torch must still be the CPU build.
"$VENV/bin/python" -c "import torch, sys; assert torch.version.cuda is None, torch.version.cuda; print('torch', torch.__version__, 'ok')"
