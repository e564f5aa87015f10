#!/usr/bin/env bash
# The shared tier on loopback: a cold file from the tier against a cold file from the origin,
# and the memory of the host that downloads a file and publishes it (the multipart upload
# streamed from the committed file). One nginx (the origin) and one moto S3 server
# (the tier) on 127.0.0.1. Run by hand, not by CI (it installs packages and moves
# gigabytes):
#
#   bash bench/shared.sh              # 200 MB and 1 GiB; prints a Markdown table
#   SIZES=200 bash bench/shared.sh
#
# For each file: `imgcache get` with no tier (the origin alone); the first host of a fleet
# (the origin, then the upload its shutdown waits for); a second host (the tier alone).
# Wall time and peak RSS of each process come from /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZES=${SIZES:-"200 1024"}
PORT=${PORT:-18941}
S3_PORT=${S3_PORT:-18942}
WORK=$(mktemp -d /tmp/imgcache-shared.XXXXXX)
MOTO_PID=
trap 'nginx_stop; [ -n "$MOTO_PID" ] && kill "$MOTO_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

. bench/nginx.sh
need_tools nginx time curl
VENV="$ROOT/bench/.venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "moto[s3,server]>=5.1"

cargo build -q --release --bin imgcache
CLI="$ROOT/target/release/imgcache"

mkdir -p "$WORK/www"
for mb in $SIZES; do
  head -c $((mb * 1024 * 1024)) /dev/urandom > "$WORK/www/ct_${mb}mb.nii.gz"
done
nginx_start "  access_log $WORK/logs/access.log;" "  server { listen 127.0.0.1:$PORT; root $WORK/www; }"

"$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1 &
MOTO_PID=$!
for _ in $(seq 100); do
  curl -sf -X PUT "http://127.0.0.1:$S3_PORT/imaging-fleet" >/dev/null && break
  sleep 0.1
done

requests() { grep -c "GET /$1 " "$WORK/logs/access.log" 2>/dev/null || true; }

# get DIR URL [tier]: prints "seconds peak_kib"
get() {
  local dir=$1 url=$2 tier=${3:-}
  local env=(CACHE_DIR="$dir" CACHE_MAX_SIZE_MB=4096 RUST_LOG=warn)
  if [ -n "$tier" ]; then
    env+=(CACHE_SHARED_TIER=s3://imaging-fleet/bench AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
          AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench)
  fi
  env "${env[@]}" /usr/bin/time -f "%e %M" -o "$WORK/time" "$CLI" get "$url" >/dev/null
  cat "$WORK/time"
}

echo "| file | run | wall | peak RSS | origin requests |"
echo "|---|---|---|---|---|"
for mb in $SIZES; do
  name="ct_${mb}mb.nii.gz"
  url="http://127.0.0.1:$PORT/$name"
  before=$(requests "$name")
  read -r t m < <(get "$WORK/plain-$mb" "$url")
  echo "| $mb MB | origin alone (no tier) | ${t} s | $((m / 1024)) MiB | $(( $(requests "$name") - before )) |"
  before=$(requests "$name")
  read -r t m < <(get "$WORK/first-$mb" "$url" tier)
  echo "| $mb MB | first host: origin, then its upload to the tier | ${t} s | $((m / 1024)) MiB | $(( $(requests "$name") - before )) |"
  before=$(requests "$name")
  read -r t m < <(get "$WORK/second-$mb" "$url" tier)
  echo "| $mb MB | second host: from the tier | ${t} s | $((m / 1024)) MiB | $(( $(requests "$name") - before )) |"
  rm -rf "$WORK/plain-$mb" "$WORK/first-$mb" "$WORK/second-$mb"
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); moto $("$VENV/bin/pip" show moto 2>/dev/null | awk '/^Version/ {print $2}'); $(date -u +%F)"
