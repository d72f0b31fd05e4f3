#!/usr/bin/env bash
# Open TensorBoard on outputs/ (or the folder given), bound to 127.0.0.1 only, on a free port it prints first.
#   scripts/tensorboard.sh                      # every run and sweep under outputs/
#   scripts/tensorboard.sh outputs/runs/<date>  # one day's runs
#   PORT=6006 scripts/tensorboard.sh            # a fixed port
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
logdir="${1:-$repo/outputs}"
tb="$repo/.venv/bin/tensorboard"
[ -x "$tb" ] || { echo "error: $tb not found; run 'make test' or 'make train' once to set up .venv" >&2; exit 2; }
[ -d "$logdir" ] || { echo "error: log folder $logdir does not exist" >&2; exit 2; }
port="${PORT:-$("$repo/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
echo "TensorBoard for $logdir at http://127.0.0.1:$port/  (Ctrl-C stops it)"
exec "$tb" --logdir "$logdir" --host 127.0.0.1 --port "$port"
