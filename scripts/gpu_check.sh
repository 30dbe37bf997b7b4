#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): writes gpu_check.json and prints the README table. Args: --dry-run, --out.
exec "${NA_PY:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
