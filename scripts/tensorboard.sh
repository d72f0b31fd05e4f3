#!/usr/bin/env bash
# Open TensorBoard on outputs/ (or the folder given), bound to 127.0.0.1 only, on a free port it prints first.
#   scripts/tensorboard.sh                      # every run and sweep under outputs/
#   scripts/tensorboard.sh outputs/runs/<date>  # one day's runs
#   scripts/tensorboard.sh outputs --port 6006  # a fixed port
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cmd="$repo/.venv/bin/cifarlab-tensorboard"
[ -x "$cmd" ] || { echo "error: $cmd not found; run 'make test' or 'make train' once to set up .venv" >&2; exit 2; }
exec "$cmd" "${@:-$repo/outputs}"
