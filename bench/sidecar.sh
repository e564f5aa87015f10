#!/usr/bin/env bash
# Hits through the /files sidecar over keep-alive connections, beside nginx serving the same
# files from disk: 1 KiB and 512 KiB files, 1 and 16 connections, wrk for 5 s each. Run by
# hand, not by CI (it installs nginx and wrk):
#
#   bash bench/sidecar.sh          # prints a Markdown table
#   DURATION=10s bash bench/sidecar.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-5s}
NGINX_PORT=${NGINX_PORT:-18941}
WORK=$(mktemp -d /tmp/imgcache-sidecar.XXXXXX)
SERVE_PID=
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
  nginx_stop
  rm -rf "$WORK"
}
trap cleanup EXIT

. bench/nginx.sh
need_tools nginx wrk curl
cargo build -q --release --bin imgcache

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom > "$WORK/www/small.nii.gz"
head -c $((512 * 1024)) /dev/urandom > "$WORK/www/medium.nii.gz"
nginx_start "  access_log off;
  keepalive_requests 1000000;" "  server { listen 127.0.0.1:$NGINX_PORT; root $WORK/www; }"

IMAGE_SERVER="http://127.0.0.1:$NGINX_PORT/" "$ROOT/target/release/imgcache" --cache-dir "$WORK/cache" --quiet serve --listen 127.0.0.1:0 \
  2> "$WORK/serve.log" &
SERVE_PID=$!
export IMAGE_SERVER="http://127.0.0.1:$NGINX_PORT/"
for _ in $(seq 100); do
  grep -q "dashboard on" "$WORK/serve.log" 2>/dev/null && break
  sleep 0.1
done
SIDECAR=$(sed -n 's/^imgcache: dashboard on \(http:[^ ]*\)\/ .*/\1/p' "$WORK/serve.log")
[ -n "$SIDECAR" ] || { cat "$WORK/serve.log"; exit 1; }
for f in small medium; do
  curl -sf -o /dev/null "$SIDECAR/files/$f.nii.gz"    # warm: every request below is a hit
done

rps() { wrk -t"$1" -c"$2" -d"$DURATION" "$3" | awk '/Requests\/sec/ {print $2}'; }
echo "| file | connections | nginx (req/s) | imgcache /files (req/s) | imgcache / nginx |"
echo "|---|---|---|---|---|"
for f in small medium; do
  for c in 1 16; do
    t=$([ "$c" = 1 ] && echo 1 || echo 2)
    n=$(rps "$t" "$c" "http://127.0.0.1:$NGINX_PORT/$f.nii.gz")
    i=$(rps "$t" "$c" "$SIDECAR/files/$f.nii.gz")
    label=$([ "$f" = small ] && echo "1 KiB" || echo "512 KiB")
    ratio=$(awk -v a="$i" -v b="$n" 'BEGIN { printf "%.2fx", a / b }')
    echo "| $label | $c | $n | $i | $ratio |"
  done
done
