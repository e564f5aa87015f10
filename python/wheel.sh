#!/usr/bin/env bash
# Builds the release wheel that installs without a Rust toolchain: manylinux2014
# (glibc 2.17: CentOS/RHEL 7 and 8, Ubuntu 18.04 and 20.04, Debian 10 and 11), the
# extension stripped, for CPython 3.9 and later (abi3). Cross-links with zig from PyPI, so
# the build machine's own glibc does not matter. Prints the wheel's tag and sizes, and
# fails if the extension needs symbols newer than the tag allows.
#
#   bash python/wheel.sh [OUT_DIR]          # default: target/wheels
#   pip install target/wheels/imgcache-*.whl   # on the machine that runs it: no Rust
#
# The build tools go into a venv of their own (BUILD_VENV, default target/wheel-build).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/wheels}
VENV=${BUILD_VENV:-target/wheel-build}
if [ ! -x "$VENV/bin/maturin" ] || [ ! -x "$VENV/bin/auditwheel" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "maturin>=1.7,<2" "ziglang>=0.13,<0.14" "auditwheel>=6,<7"
fi
VENV=$(cd "$VENV" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/imgcache-*.whl
# maturin finds zig through the ziglang module of the Python it runs under.
(cd python && PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" build -q --release --strip \
  --zig --compatibility manylinux2014 --out "$OUT")
wheel=$(ls "$OUT"/imgcache-*.whl)
# What auditwheel reads off the extension's symbol versions: it must fit manylinux2014.
report=$("$VENV/bin/auditwheel" show "$wheel")
echo "$report"
if ! grep -q "manylinux_2_17_$(uname -m)" <<<"$report"; then
  echo "the wheel does not fit manylinux2014 (glibc 2.17)" >&2
  exit 1
fi
ext_bytes=$("$VENV/bin/python" - "$wheel" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print(sum(i.file_size for i in z.infolist() if i.filename.endswith(".so")))
PY
)
echo "wheel: $(basename "$wheel")"
echo "wheel size: $(( $(stat -c %s "$wheel") / 1024 )) KiB; extension: $(( ext_bytes / 1024 )) KiB uncompressed"
if [ "$ext_bytes" -gt $((24 * 1024 * 1024)) ]; then
  echo "the extension is over 24 MiB: not stripped?" >&2
  exit 1
fi
