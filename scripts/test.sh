#!/usr/bin/env bash
# The test command: set up the environment from nothing (cached in $NA_CACHE), lint, run every test.
#
#   bash scripts/test.sh                 # against the bundled 2024 ComfyUI
#   COMFYUI_PATH=~/ComfyUI bash scripts/test.sh   # against yours
#   bash scripts/test.sh tests/core -x   # arguments go to pytest (default: tests)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/setup_env.sh >/dev/null  # exports NA_PY, COMFYUI_PATH (defaults to the 2024 ComfyUI copy)
echo "[test] python: $NA_PY; ComfyUI: $COMFYUI_PATH"

"$NA_PY" -m ruff check .
rc=0
"$NA_PY" -m pytest -q "${@:-tests}" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test] FAILED: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
