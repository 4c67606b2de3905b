#!/usr/bin/env bash
# Builds sdcam with `--features cuda` on a machine without a GPU and packs what a GPU machine
# with no Rust toolchain needs into target/cuda-carry/ (stripped and xz-compressed, about 26 MB:
# each binary embeds candle's CUDA kernels, ~60 MB uncompressed, over the device tool's 64 MiB
# carry limit together):
#   sdcam                    the program (`sdcam bench --set model.device="cuda" ...`)
#   sdcam-core-lib-tests     the model/stream core's unit tests (component goldens)
#   stream_golden            the stream-pipeline golden test
# scripts/cuda/check.sh runs them there with SDCAM_TEST_DEVICE=cuda.
#
#   bash scripts/cuda/build.sh [COMPUTE_CAP]   # default 90 (H100/H200)
set -euo pipefail
cd "$(dirname "$0")/../.."
CAP="${1:-90}"
PREFIX="${SDCAM_CUDA_PREFIX:-/opt/sdcam-cuda13}"
[[ -f "$PREFIX/env.sh" ]] || bash scripts/cuda/toolkit.sh "$PREFIX"
# shellcheck disable=SC1091
source "$PREFIX/env.sh"
export CUDA_COMPUTE_CAP="$CAP"
TARGET_DIR="${SDCAM_CUDA_TARGET:-target/cuda}"

cargo build --release --locked --features cuda --target-dir "$TARGET_DIR" --bin sdcam
tests_json="$(cargo test --release --locked --features cuda --target-dir "$TARGET_DIR" \
    -p sdcam-core -p sdcam --lib --test stream_golden --no-run --message-format json 2>/dev/null)"
executables="$(printf '%s\n' "$tests_json" | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])')"

out=target/cuda-carry
rm -rf "$out"
mkdir -p "$out"
strip -o "$out/sdcam" "$TARGET_DIR/release/sdcam"
while read -r kind name exe; do
    case "$kind" in
        lib) [[ $name == sdcam_core ]] && strip -o "$out/sdcam-core-lib-tests" "$exe" ;;
        test) strip -o "$out/$name" "$exe" ;;
    esac
done <<<"$executables"
for f in "$out"/*; do
    xz -T0 -6 "$f"
done
echo "CUDA_COMPUTE_CAP=$CAP" > "$out/BUILD_INFO"
"$CUDA_ROOT/bin/nvcc" --version | grep release >> "$out/BUILD_INFO"
git rev-parse HEAD >> "$out/BUILD_INFO"
ls -la "$out"
du -sh "$out"
