#!/usr/bin/env bash
# First loads on networks that are not loopback, side by side in one run: curl,
# aria2c -x8 -s8 and imgcache's CLI, each cold (a fresh cache or output directory).
#
#   bash bench/network.sh                    # 200 MiB, both paths below
#   SIZE_MB=100 RUNS=3 bash bench/network.sh
#   OLD=/path/to/old/imgcache bash bench/network.sh   # an older imgcache binary beside
#
# Two paths, both nginx on 127.0.0.1 (installed from Debian if missing):
# - "capped": plain HTTP with `limit_rate 25m` per connection, as object stores, CDNs and
#   many servers cap one connection.
# - "h2+rtt": HTTPS speaking HTTP/2, through a proxy that adds 25 ms each way (50 ms of
#   round trip: examples/delay_proxy.rs), where HTTP/2's flow-control windows decide.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZE_MB=${SIZE_MB:-200}
RUNS=${RUNS:-1}
WORK=$(mktemp -d /tmp/imgcache-network.XXXXXX)
PROXY_PID=
. "$ROOT/bench/nginx.sh"
trap 'nginx_stop; [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

need_tools nginx curl openssl
if ! command -v aria2c >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq aria2 >/dev/null
fi
cargo build -q --release --bin imgcache --example delay_proxy
NEW="$ROOT/target/release/imgcache"

mkdir -p "$WORK/www"
head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > "$WORK/www/ct.nii.gz"
SHA=$(sha256sum "$WORK/www/ct.nii.gz" | cut -d' ' -f1)
# A CA of the run's own, and the server's certificate signed by it (rustls refuses a CA
# certificate presented by the server itself).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=imgcache bench CA" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$WORK/key.pem" \
  -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$WORK/server.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
  -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/cert.pem" 2>/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CAPPED=$(free_port)
TLS=$(free_port)
nginx_start "" "
  server { listen 127.0.0.1:$CAPPED; root $WORK/www; limit_rate 25m; access_log $WORK/logs/capped.log; }
  server { listen 127.0.0.1:$TLS ssl http2; root $WORK/www; access_log $WORK/logs/tls.log;
           ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; }"
"$ROOT/target/release/examples/delay_proxy" 0 "127.0.0.1:$TLS" 25 > "$WORK/proxy.out" &
PROXY_PID=$!
for _ in $(seq 50); do grep -q listening "$WORK/proxy.out" 2>/dev/null && break; sleep 0.1; done
RTT=$(sed -n 's/listening on 127.0.0.1://p' "$WORK/proxy.out")

# seconds CMD...: the wall time of one run, and a check of the bytes it left in $OUT_FILE.
seconds() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; echo "failed"; return; }
  [ -s "$(cat "$WORK/out_path")" ] || { cat "$WORK/err" >&2; echo "failed"; return; }
  t1=$(date +%s.%N)
  local got
  got=$(sha256sum "$(cat "$WORK/out_path")" | cut -d' ' -f1)
  [ "$got" = "$SHA" ] || { echo "wrong bytes"; return; }
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
run_curl() { rm -rf "$WORK/o"; mkdir "$WORK/o"; echo "$WORK/o/f" > "$WORK/out_path"; curl -sf "$@" -o "$WORK/o/f"; }
run_aria() { rm -rf "$WORK/o"; mkdir "$WORK/o"; echo "$WORK/o/f" > "$WORK/out_path"; aria2c -q -x8 -s8 -k1M --allow-overwrite=true --file-allocation=none "$@" -d "$WORK/o" -o f; }
run_imgcache() {
  local bin=$1; shift
  rm -rf "$WORK/c"
  local path
  path=$(CACHE_CA_CERT="$WORK/ca.pem" "$bin" --cache-dir "$WORK/c" --max-size-mb 4096 get "$@")
  echo "$path" > "$WORK/out_path"
}

echo "| path | tool | cold ${SIZE_MB} MiB (s), $RUNS run(s) |"
echo "|---|---|---|"
for run in $(seq "$RUNS"); do
  url="http://127.0.0.1:$CAPPED/ct.nii.gz"
  echo "| capped 25 MB/s per connection | curl | $(seconds run_curl "$url") |"
  echo "| capped 25 MB/s per connection | aria2c -x8 -s8 | $(seconds run_aria "$url") |"
  echo "| capped 25 MB/s per connection | imgcache get | $(seconds run_imgcache "$NEW" "$url") |"
  if [ -n "${OLD:-}" ]; then echo "| capped 25 MB/s per connection | imgcache get (OLD) | $(seconds run_imgcache "$OLD" "$url") |"; fi
  url="https://127.0.0.1:$RTT/ct.nii.gz"
  echo "| HTTPS HTTP/2, 50 ms RTT | curl --http2 | $(seconds run_curl --http2 --cacert "$WORK/ca.pem" "$url") |"
  echo "| HTTPS HTTP/2, 50 ms RTT | imgcache get | $(seconds run_imgcache "$NEW" "$url") |"
  if [ -n "${OLD:-}" ]; then echo "| HTTPS HTTP/2, 50 ms RTT | imgcache get (OLD) | $(seconds run_imgcache "$OLD" "$url") |"; fi
done
echo
echo "machine: $(nproc) cores, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(curl --version | head -1 | cut -d' ' -f1-2), $(aria2c --version | head -1); $(date -u +%Y-%m-%d)"
