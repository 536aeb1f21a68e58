#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp source vendored in the pinned llama-cpp-python sdist,
# so the peer we compare against runs the same llama.cpp our llama backend links. Installs one binary (llama.cpp
# and ggml linked in statically) into
#   ${XDG_CACHE_HOME:-~/.cache}/csdrafting/llama-server/<version>/llama-server
# and prints its path. Idempotent: a present, runnable binary is not rebuilt (pass --force to rebuild).
# Measured: 38 minutes (2291 s, sdist download included) at nice 19 on 2 cores shared with other test runs;
# 17-25 minutes expected on 2 idle cores (not measured). The binary links only system libraries (libstdc++,
# libgomp). Run it away from benchmarks, e.g.
#   flock -x /tmp/csd-cpu.lock nice -n 19 bash scripts/build_llama_server.sh
# Needs: a C/C++ compiler, cmake, network access to the package registry (PyPI) for the sdist.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # keep equal to the pin in pyproject.toml's `llama` extra
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/csdrafting"
DEST="$CACHE_ROOT/llama-server/$VERSION"
BIN="$DEST/llama-server"
JOBS="${JOBS:-$(nproc)}"

if [[ "${1:-}" != "--force" && -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/csd-llama-server.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

echo "downloading the llama-cpp-python $VERSION sdist ..." >&2
if ! "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WORK/sdist" "llama-cpp-python==$VERSION" >&2; then
    echo "error: could not download the llama-cpp-python==$VERSION sdist; the package registry must be reachable" >&2
    exit 2
fi
tar -xzf "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Static build: one self-contained binary, no shared libraries to install beside it. No curl/OpenSSL (the server
# is given local GGUF paths) and no web UI (its assets would be downloaded at build time).
echo "configuring llama.cpp in $SRC ..." >&2
cmake -S "$SRC" -B "$WORK/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON >&2
echo "building llama-server with $JOBS jobs ..." >&2
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >&2

# Install through a temporary name and a rename, so an interrupted copy never looks like a finished binary.
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$BIN.tmp.$$"
chmod 755 "$BIN.tmp.$$"
mv -f "$BIN.tmp.$$" "$BIN"
"$BIN" --version >&2 2>&1 || true
echo "built in $((SECONDS - START)) s" >&2
echo "$BIN"
