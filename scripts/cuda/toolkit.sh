#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain for `--features cuda` from PyPI (nvcc, headers, cuBLAS,
# cuRAND, NVRTC), without a driver or a GPU, so a machine with no GPU can build the binaries
# that scripts/cuda/build.sh carries to one. Prints the environment to source.
#
#   bash scripts/cuda/toolkit.sh [PREFIX]      # default PREFIX: /opt/sdcam-cuda13
#   source PREFIX/env.sh
#
# The driver library (libcuda.so) comes with the NVIDIA driver, which a build machine without
# a GPU lacks; the linker only needs its symbols, so a stub with the driver API's function
# names (taken from cudarc's bindings) stands in for it at link time, as the toolkit's own
# lib/stubs/libcuda.so does. At run time the GPU machine's real libcuda.so.1 is used.
set -euo pipefail
PREFIX="${1:-/opt/sdcam-cuda13}"
CUDA_SERIES="13.0.*"

if [[ ! -x "$PREFIX/bin/python" ]]; then
    python3 -m venv "$PREFIX"
fi
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$CUDA_SERIES" "nvidia-nvvm==$CUDA_SERIES" "nvidia-cuda-crt==$CUDA_SERIES" \
    "nvidia-cuda-runtime==$CUDA_SERIES" "nvidia-cuda-cccl==$CUDA_SERIES" \
    "nvidia-cuda-nvrtc==$CUDA_SERIES" "nvidia-cublas==13.0.*" "nvidia-curand>=10.4,<10.5"

ROOT="$("$PREFIX/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
[[ -x "$ROOT/bin/nvcc" ]] || { echo "error: no nvcc under $ROOT" >&2; exit 1; }

# Unversioned names for the linker (`-lcublas` etc.), as a toolkit install has them.
for lib in cublas cublasLt nvrtc curand cudart; do
    real="$(cd "$ROOT/lib" && ls "lib$lib.so."* | grep -E "^lib$lib\.so\.[0-9]+$" | head -1)"
    [[ -n "$real" ]] || { echo "error: lib$lib.so.* missing under $ROOT/lib" >&2; exit 1; }
    ln -sf "$real" "$ROOT/lib/lib$lib.so"
done

# Link-time stub of the driver library.
bindings="$(cargo metadata --format-version 1 --features cuda --manifest-path "$(dirname "$0")/../../Cargo.toml" 2>/dev/null |
    "$PREFIX/bin/python" -c 'import json,sys,os
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "src/driver/sys/mod.rs"))' | head -1)"
if [[ -z "$bindings" || ! -f "$bindings" ]]; then
    # cudarc is only in the lock file's graph with the cuda feature; fetch it first.
    echo "error: cudarc sources not found; run 'cargo fetch' first" >&2
    exit 1
fi
mkdir -p "$ROOT/lib/stubs"
grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$bindings" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
    awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$ROOT/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda_stub.c"

cat > "$PREFIX/env.sh" <<EOF
# CUDA build environment for sdcam --features cuda (made by scripts/cuda/toolkit.sh).
export CUDA_ROOT="$ROOT"
export CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
echo "CUDA $("$ROOT/bin/nvcc" --version | grep -o 'release [0-9.]*') ready: source $PREFIX/env.sh"
