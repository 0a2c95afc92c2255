#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest.
# Real-data tests run when CYTOFM_DATA (or ../shared/data) contains the cytology images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
