#!/usr/bin/env bash
# Time to first byte and total time of a cold file through the /files sidecar, beside nginx
# proxy_cache with proxy_cache_lock in front of the same origin (all on 127.0.0.1). Run by
# hand, not by CI (it installs nginx and moves gigabytes):
#
#   bash bench/streaming.sh              # 1 GiB, unthrottled and at 100 MB/s
#   SIZE_MB=200 RATES="100m" bash bench/streaming.sh
#
# For each origin rate: one client alone on the cold file, then four clients at once on
# another cold copy (first byte of the first and of the last, total of the last).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZE_MB=${SIZE_MB:-1024}
RATES=${RATES:-"0 100m"}
ORIGIN=${ORIGIN:-18951}
PROXY=${PROXY:-18952}
SIDECAR=${SIDECAR:-18953}
WORK=$(mktemp -d /tmp/imgcache-streaming.XXXXXX)
SERVE_PID=
stop() {
  nginx_stop
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
}
trap 'stop; rm -rf "$WORK"' EXIT

. bench/nginx.sh
need_tools nginx curl
cargo build -q --release --bin imgcache
CLI="$ROOT/target/release/imgcache"

mkdir -p "$WORK/www" "$WORK/proxy-cache"
head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > "$WORK/www/base.nii.gz"
for rate in $RATES; do
  for copy in one-nginx one-imgcache four-nginx four-imgcache; do
    ln -f "$WORK/www/base.nii.gz" "$WORK/www/r$rate-$copy.nii.gz"
  done
done

# The origin limits its rate per file name prefix (0: unlimited).
rate_rules=""
for rate in $RATES; do
  rate_rules+="    location ~ ^/r$rate- { limit_rate $( [ "$rate" = 0 ] && echo 0 || echo "$rate" ); }
"
done
nginx_start "  access_log $WORK/logs/access.log;
  proxy_cache_path $WORK/proxy-cache levels=1:2 keys_zone=imaging:10m max_size=8g inactive=1d use_temp_path=off;" "
  server {
    listen 127.0.0.1:$ORIGIN;
    root $WORK/www;
$rate_rules  }
  server {
    listen 127.0.0.1:$PROXY;
    location /files/ {
      proxy_pass http://127.0.0.1:$ORIGIN/;
      proxy_cache imaging;
      proxy_cache_valid 200 1d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10m;
      proxy_cache_lock_age 10m;
      proxy_max_temp_file_size 0;
      proxy_buffering on;
    }
  }"

CACHE_DIR="$WORK/imgcache" CACHE_MAX_SIZE_MB=16384 IMAGE_SERVER="http://127.0.0.1:$ORIGIN/" \
  RUST_LOG=warn "$CLI" serve --listen "127.0.0.1:$SIDECAR" >/dev/null 2>&1 &
SERVE_PID=$!
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$SIDECAR/api/stats" && break
  sleep 0.1
done

# fetch URL: prints "first_byte total" in seconds
fetch() { curl -sf -o /dev/null -w '%{time_starttransfer} %{time_total}\n' "$1"; }

echo "| origin rate | server | clients | first byte (first client) | first byte (last client) | total (last client) |"
echo "|---|---|---|---|---|---|"
for rate in $RATES; do
  shown=$([ "$rate" = 0 ] && echo "unlimited" || echo "${rate%m} MB/s")
  for server in nginx imgcache; do
    port=$([ $server = nginx ] && echo $PROXY || echo $SIDECAR)
    read -r ttfb total < <(fetch "http://127.0.0.1:$port/files/r$rate-one-$server.nii.gz")
    echo "| $shown | $server | 1 | ${ttfb} s | | ${total} s |"
    out="$WORK/four-$server-$rate"
    pids=()
    for i in 1 2 3 4; do
      fetch "http://127.0.0.1:$port/files/r$rate-four-$server.nii.gz" > "$out.$i" &
      pids+=($!)
      sleep 0.2
    done
    wait "${pids[@]}"
    first=$(cut -d' ' -f1 "$out.1"); last_ttfb=$(cut -d' ' -f1 "$out.4"); last_total=$(cut -d' ' -f2 "$out.4")
    echo "| $shown | $server | 4, 0.2 s apart | ${first} s | ${last_ttfb} s | ${last_total} s |"
  done
done
echo
echo "origin requests: $(grep -c 'GET /r' "$WORK/logs/access.log") (one per cold file and server expected)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); $(nginx -v 2>&1); $SIZE_MB MiB; $(date -u +%F)"
