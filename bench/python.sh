#!/usr/bin/env bash
# The warm path from Python: imgcache's package beside os.stat, fsspec and pooch, one run.
# Run by hand, not by CI (it installs packages):
#
#   bash bench/python.sh          # prints a Markdown table (bench/python_hit.py)
#
# Cold downloads from Python are in bench/peers.sh:
#   SIZES=200 TOOLS="imgcache-python pooch fsspec" bash bench/peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d /tmp/imgcache-python-bench.XXXXXX)
SERVER_PID=
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

VENV="$ROOT/bench/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q pooch fsspec aiohttp requests
# The wheel users install (release, manylinux2014, stripped).
bash python/wheel.sh "$WORK/wheels" >/dev/null
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$WORK"/wheels/imgcache-*.whl

mkdir -p "$WORK/www"
head -c $((10 * 1024 * 1024)) /dev/urandom > "$WORK/www/ct_010mb.nii.gz"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(cd "$WORK/www" && exec "$VENV/bin/python" -m http.server -b 127.0.0.1 "$PORT" >/dev/null 2>&1) &
SERVER_PID=$!
for _ in $(seq 50); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/ct_010mb.nii.gz" && break
  sleep 0.1
done

"$VENV/bin/python" "$ROOT/bench/python_hit.py" "http://127.0.0.1:$PORT/ct_010mb.nii.gz" "$WORK/cache" "${CALLS:-100000}"
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); python $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'); $(date -u +%Y-%m-%d)"
