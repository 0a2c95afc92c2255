#!/usr/bin/env bash
# Create .venv (if missing) and install cytofm into it with the test tools.
# Usage: bash scripts/setup_env.sh [python executable]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch and torchvision first, so a machine with a local wheel cache or a CUDA-specific index
# configured in pip picks its own build; pyproject.toml only declares version ranges.
.venv/bin/python -m pip install --quiet "torch>=2.3,<3" "torchvision>=0.18"
.venv/bin/python -m pip install --quiet -e ".[dev,wsi]"
