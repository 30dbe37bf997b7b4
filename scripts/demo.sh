#!/usr/bin/env bash
# Demo: run example_workflows/01 (single subject) and example_workflows/05 (attention map preview) headless on a real
# ComfyUI with this pack installed, through comfy-cli, and copy the results to ./outputs.
#
#   bash scripts/demo.sh                         # the bundled 2024 ComfyUI (made by setup_env.sh)
#   COMFYUI_PATH=~/ComfyUI bash scripts/demo.sh  # your ComfyUI and, if present, its real models
#
# If the files workflow 01 names are not all in $COMFYUI_PATH/models/..., random-weight
# placeholders are generated (once, ~3.5 GB in $NA_CACHE/models) and the images are noise.
# Then, from the study's miniature models committed in study/weights (docs/STUDY.md), it puts held-out
# products into new scenes through `python -m na_engine generate`: outputs/study/grid.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh >/dev/null
exec "$NA_PY" scripts/demo.py "$@"
