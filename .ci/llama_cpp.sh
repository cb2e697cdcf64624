#!/usr/bin/env bash
# Builds, once, a real llama.cpp server (llama-server) and llama-cpp-python's server for
# tests/test_llama_cpp.py, and caches them in
#     ${LLAMA_CPP_CACHE:-~/.cache/llm-billing-proxy/llama-cpp}/<llama-cpp-python version>-<hash>
# (the hash covers the build recipe below). Prints, and writes to <cache>/env:
#     LLAMA_SERVER=<cache>/bin/llama-server
#     LLAMA_CPP_PYTHON=<cache>/venv/bin/python   (runs `-m llama_cpp.server`; has gguf)
#
# Source: llama-cpp-python's sdist from PyPI, which vendors llama.cpp. llama.cpp is compiled
# once, at -O0 (the test model is tiny; -O0 compiles in about 3/4 of Release's time), only
# llama-server and the shared libraries it links; llama-cpp-python is installed with
# LLAMA_BUILD=OFF (no second compile) and gets those same libraries in its lib directory.
# A fresh build takes ~6 min on 2 cores; with the cache present, a second.
# Idempotent and safe to interrupt: everything is built in a temporary directory that is
# renamed into place at the end. Progress goes to stderr, the two lines above to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

VERSION=0.3.36  # llama-cpp-python; its vendor/llama.cpp is what gets built
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release "-DCMAKE_C_FLAGS_RELEASE=-O0 -DNDEBUG"
    "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -DNDEBUG"
    -DLLAMA_ALL_WARNINGS=OFF -DGGML_OPENMP=OFF  # ~10% less compile time
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF  # no web UI (it would be downloaded)
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON "-DCMAKE_INSTALL_RPATH=\$ORIGIN"  # relocatable
)
# What llama-cpp-python's server runs on, as tested (a fresh build months later gets the same).
SERVER_PINS=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sse-starlette==3.7.0
             starlette-context==0.3.6 pydantic==2.14.4 pydantic-settings==2.16.3 numpy==2.4.6)
PYTHON=$(python3 -c 'import sys; print(sys.executable)')  # the repo's (.python-version)
RECIPE=2  # bump when this script changes how the cache is built

say() { echo "llama_cpp.sh: $*" >&2; }

HASH=$( { printf '%s\n' "${CMAKE_FLAGS[@]}" "${SERVER_PINS[@]}" "$RECIPE"
          "$PYTHON" --version; } | sha256sum | cut -c1-10)
ROOT=${LLAMA_CPP_CACHE:-$HOME/.cache/llm-billing-proxy/llama-cpp}
CACHE=$ROOT/$VERSION-$HASH

if [ -f "$CACHE/env" ] && [ -x "$CACHE/bin/llama-server" ] \
        && "$CACHE/venv/bin/python" -c 'import llama_cpp.server.app, gguf' 2> /dev/null; then
    cat "$CACHE/env"
    exit 0
fi

mkdir -p "$ROOT"
find "$ROOT" -maxdepth 1 -name '.build-*' -mmin +180 -exec rm -rf {} + # left by a kill -9
WORK=$(mktemp -d "$ROOT/.build-$VERSION-$HASH.XXXXXX")
PIP_PID=
cleanup() {
    [ -z "$PIP_PID" ] || kill "$PIP_PID" 2> /dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # so that EXIT cleans up
started=$SECONDS

say "building llama.cpp from llama-cpp-python $VERSION into $CACHE (~6 min on 2 cores)"
python3 -m pip download --quiet --no-binary :all: --no-deps --dest "$WORK/sdist" \
    "llama-cpp-python==$VERSION"
SDIST=$(echo "$WORK"/sdist/llama_cpp_python-*.tar.gz)
tar -xzf "$SDIST" -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/)

# llama-cpp-python and gguf (from the same sdist: the writer matching this llama.cpp) into
# a venv, in the background while llama.cpp compiles.
python3 -m uv venv --quiet --relocatable --python "$PYTHON" "$WORK/venv"
printf '%s\n' "${SERVER_PINS[@]}" > "$WORK/pins.txt"
CMAKE_ARGS="-DLLAMA_BUILD=OFF" python3 -m uv pip install --quiet \
    --python "$WORK/venv/bin/python" --constraint "$WORK/pins.txt" \
    "llama-cpp-python[server] @ file://$SDIST" "$SRC/vendor/llama.cpp/gguf-py" \
    > "$WORK/pip.log" 2>&1 &
PIP_PID=$!

# A machine without the build tools gets them: g++ from Debian, cmake from PyPI.
if ! command -v c++ > /dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++; } >&2
fi
CMAKE=cmake
if ! command -v cmake > /dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$WORK/cmake" cmake >&2
    CMAKE=$WORK/cmake/cmake/data/bin/cmake
fi

GENERATOR=()
command -v ninja > /dev/null && GENERATOR=(-G Ninja)
if ! { "$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$WORK/build" "${GENERATOR[@]}" "${CMAKE_FLAGS[@]}" \
        && "$CMAKE" --build "$WORK/build" --target llama-server -j "$(nproc)"; } \
        > "$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    say "llama.cpp did not build"
    exit 1
fi
say "llama.cpp built in $((SECONDS - started)) s"
if ! wait "$PIP_PID"; then
    PIP_PID=
    cat "$WORK/pip.log" >&2
    say "llama-cpp-python did not install"
    exit 1
fi
PIP_PID=

mkdir -p "$WORK/out/bin"
cp -P "$WORK"/build/bin/llama-server "$WORK"/build/bin/lib*.so* "$WORK/out/bin/"
mv "$WORK/venv" "$WORK/out/venv"
PACKAGE=$("$WORK/out/venv/bin/python" -c \
    'import importlib.util as u; print(u.find_spec("llama_cpp").submodule_search_locations[0])')
mkdir -p "$PACKAGE/lib"  # where llama_cpp loads libllama.so and libggml*.so from
cp -P "$WORK"/build/bin/libllama.so* "$WORK"/build/bin/libggml*.so* "$PACKAGE/lib/"

# Both servers answer a chat on the test model before the cache is kept.
"$WORK/out/venv/bin/python" "$REPO/tests/llama_model.py" "$WORK/model.gguf" > /dev/null
"$WORK/out/venv/bin/python" - "$WORK/out/bin/llama-server" "$WORK/model.gguf" <<'EOF' >&2
import json, socket, subprocess, sys, time, urllib.request

server, model = sys.argv[1:]
python = sys.executable
for name, command in [
        ("llama-server", [server, "-m", model, "-c", "512", "--host", "127.0.0.1", "--port"]),
        ("llama_cpp.server", [python, "-m", "llama_cpp.server", "--model", model,
                              "--n_ctx", "512", "--host", "127.0.0.1", "--port"])]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 3, "temperature": 0}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions", body,
                    {"Content-Type": "application/json"})
                usage = json.load(urllib.request.urlopen(request, timeout=30))["usage"]
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"{name} did not answer")
                time.sleep(0.2)
        assert usage["completion_tokens"] == 3, usage
        print(f"llama_cpp.sh: {name} answers: {usage}")
    finally:
        process.terminate()
        process.wait(10)
EOF

printf 'LLAMA_SERVER=%s\nLLAMA_CPP_PYTHON=%s\n' \
    "$CACHE/bin/llama-server" "$CACHE/venv/bin/python" > "$WORK/out/env"
rm -rf "$WORK/stale"
[ ! -e "$CACHE" ] || mv -T "$CACHE" "$WORK/stale"  # one that failed the check above
mv -T "$WORK/out" "$CACHE"
say "cached in $((SECONDS - started)) s ($(du -sh "$CACHE" | cut -f1))"
cat "$CACHE/env"
