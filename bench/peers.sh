#!/usr/bin/env bash
# imgcache side by side with the Python peers (pooch, fsspec, cached-path) and curl, all
# fetching the same files from one nginx on 127.0.0.1. Run by hand, not by CI (it installs
# packages and moves gigabytes):
#
#   bash bench/peers.sh            # 200 MB and 1 GiB files; prints a Markdown table
#   SIZES="200" TOOLS="curl imgcache-lib" bash bench/peers.sh   # a subset
#   SIZES="200" TOOLS="imgcache-python pooch fsspec" bash bench/peers.sh   # from Python
#
# Measured for each tool and file: cold download time, warm hit time per call, 16 concurrent
# cold requests for one file (wall time and the requests nginx saw), and the peak RSS of the
# cold run (/usr/bin/time). Caches live in a temporary directory removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZES=${SIZES:-"200 1024"}
TOOLS=${TOOLS:-"curl curl-sync imgcache-lib imgcache-cli imgcache-python pooch pooch-nohash fsspec cached-path"}
PORT=${PORT:-18931}
WORK=$(mktemp -d /tmp/imgcache-peers.XXXXXX)
trap 'nginx_stop; rm -rf "$WORK"' EXIT

. bench/nginx.sh
need_tools nginx time curl

VENV="$ROOT/bench/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q pooch fsspec aiohttp requests cached-path
fi
PY="$VENV/bin/python"
case " $TOOLS " in
  *" imgcache-python "*)
    # The Python package, built in release into the same venv as the peers.
    "$VENV/bin/pip" install -q "maturin>=1.7,<2"
    (cd python && VIRTUAL_ENV="$VENV" "$VENV/bin/maturin" develop -q --release) ;;
esac

cargo build -q --release --bin imgcache --example peer_harness
CLI="$ROOT/target/release/imgcache"
LIB="$ROOT/target/release/examples/peer_harness"

mkdir -p "$WORK/www"
for mb in $SIZES; do
  head -c $((mb * 1024 * 1024)) /dev/urandom > "$WORK/www/ct_${mb}mb.nii.gz"
done
nginx_start "  access_log $WORK/logs/access.log;" "  server { listen 127.0.0.1:$PORT; root $WORK/www; }"

calc() { awk "BEGIN { printf \"%.9f\", $1 }"; }
requests() { grep -c "GET /$1 " "$WORK/logs/access.log" 2>/dev/null || true; }

# run TOOL MODE URL DIR N SHA: prints seconds
run() {
  local tool=$1 mode=$2 url=$3 dir=$4 n=$5 sha=$6
  case $tool in
    curl-sync)
      # curl, then fsync the file as the cache does before it commits.
      case $mode in
        cold) local t0 t1; t0=$(date +%s.%N); curl -sf -o "$dir/out" "$url"; sync "$dir/out"; t1=$(date +%s.%N); calc "$t1 - $t0" ;;
        concurrent)
          local t0 t1
          t0=$(date +%s.%N)
          seq "$n" | xargs -P "$n" -I{} sh -c 'curl -sf -o "$1/out$2" "$3" && sync "$1/out$2"' _ "$dir" {} "$url"
          t1=$(date +%s.%N)
          calc "$t1 - $t0" ;;
        warm) echo "" ;;
      esac ;;
    curl)
      case $mode in
        cold) curl -sf -o "$dir/out" -w '%{time_total}\n' "$url" ;;
        concurrent)
          local t0 t1
          t0=$(date +%s.%N)
          seq "$n" | xargs -P "$n" -I{} curl -sf -o "$dir/out{}" "$url"
          t1=$(date +%s.%N)
          calc "$t1 - $t0" ;;
        warm) echo "" ;;
      esac ;;
    imgcache-cli)
      case $mode in
        cold) local t0 t1; t0=$(date +%s.%N); "$CLI" --cache-dir "$dir" --max-size-mb 4096 get "$url" >/dev/null; t1=$(date +%s.%N); calc "$t1 - $t0" ;;
        warm)
          "$CLI" --cache-dir "$dir" --max-size-mb 4096 get "$url" >/dev/null
          local t0 t1; t0=$(date +%s.%N)
          for _ in $(seq 20); do "$CLI" --cache-dir "$dir" --max-size-mb 4096 get "$url" >/dev/null; done
          t1=$(date +%s.%N); calc "($t1 - $t0) / 20" ;;
        concurrent)
          local urls=(); for _ in $(seq "$n"); do urls+=("$url"); done
          local t0 t1; t0=$(date +%s.%N); "$CLI" --cache-dir "$dir" --max-size-mb 4096 get "${urls[@]}" >/dev/null; t1=$(date +%s.%N)
          calc "$t1 - $t0" ;;
      esac ;;
    imgcache-lib)
      case $mode in
        warm) "$LIB" warm "$url" "$dir" 10000 ;;
        *) "$LIB" "$mode" "$url" "$dir" "$n" ;;
      esac ;;
    pooch) "$PY" "$ROOT/bench/peers.py" pooch "$mode" "$url" "$dir" "$n" "$sha" ;;
    *) "$PY" "$ROOT/bench/peers.py" "$tool" "$mode" "$url" "$dir" "$n" "$sha" ;;
  esac
}

fmt_time() {
  if [ -z "$1" ]; then echo "-"; return; fi
  awk -v s="$1" 'BEGIN { if (s < 0.001) printf "%.1f µs", s * 1e6; else if (s < 1) printf "%.1f ms", s * 1e3; else printf "%.2f s", s }'
}

echo
echo "| file | tool | cold | warm hit per call | 16 concurrent cold: wall | origin requests | peak RSS (cold) |"
echo "|---|---|---|---|---|---|---|"
for mb in $SIZES; do
  name="ct_${mb}mb.nii.gz"
  url="http://127.0.0.1:$PORT/$name"
  sha=$(sha256sum "$WORK/www/$name" | cut -d' ' -f1)
  for tool in $TOOLS; do
    # Warm calls: pooch with a hash re-hashes the file every call, so few calls suffice.
    case $tool in pooch) warm_n=3 ;; cached-path|fsspec) warm_n=50 ;; imgcache-python) warm_n=100000 ;; *) warm_n=200 ;; esac
    d=$(mktemp -d "$WORK/c.XXXX")
    cold=$(/usr/bin/time -f %M -o "$WORK/rss" bash -c "$(declare -f run calc); CLI=$CLI LIB=$LIB PY=$PY ROOT=$ROOT WORK=$WORK run $tool cold $url $d 1 $sha" | tail -1)
    rss_kib=$(tail -1 "$WORK/rss")
    warm=$(run "$tool" warm "$url" "$d" "$warm_n" "$sha" | tail -1)
    rm -rf "$d"; d=$(mktemp -d "$WORK/c.XXXX")
    before=$(requests "$name")
    conc=$(run "$tool" concurrent "$url" "$d" 16 "$sha" | tail -1)
    after=$(requests "$name")
    rm -rf "$d"
    printf '| %s MB | %s | %s | %s | %s | %s | %.0f MiB |\n' "$mb" "$tool" "$(fmt_time "$cold")" \
      "$(fmt_time "$warm")" "$(fmt_time "$conc")" "$((after - before))" "$(calc "$rss_kib / 1024")"
  done
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); $(date -u +%Y-%m-%d)"
