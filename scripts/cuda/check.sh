#!/usr/bin/env bash
# Runs on a GPU machine, in the repository root, with target/cuda-carry/ from
# scripts/cuda/build.sh carried there (the device tool: `carry: ["target/cuda-carry"]`):
#   1. the model-component goldens and the stream-pipeline goldens on CUDA in f32, f16 and bf16
#      (the same tests as on the CPU; SDCAM_TEST_DEVICE / SDCAM_TEST_DTYPE pick the target);
#   2. `sdcam bench` on the full-size sd-turbo architecture (random weights) in f16 and f32.
# Logs go to $OUT (or ./cuda-check-out) as well as the terminal. Exit status 1 if a test failed.
#
#   bash scripts/cuda/check.sh [--quick]      # --quick: f16 only, 256² bench only
set -uo pipefail
cd "$(dirname "$0")/../.."
quick=0
[[ "${1:-}" == --quick ]] && quick=1
packed=target/cuda-carry
out="${OUT:-cuda-check-out}"
mkdir -p "$out"
[[ -f "$packed/sdcam.xz" ]] || { echo "error: $packed/sdcam.xz missing: run scripts/cuda/build.sh on the build machine and carry $packed" >&2; exit 2; }
cat "$packed/BUILD_INFO"
carry="$(mktemp -d)"
for f in sdcam sdcam-core-lib-tests stream_golden; do
    python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$packed/$f.xz" "$carry/$f"
    chmod +x "$carry/$f"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# The CUDA 13 libraries the binaries link (cuBLAS, cuRAND, NVRTC, runtime): from the system's
# toolkit, or from the nvidia-* Python packages that PyTorch brings.
libdirs="$(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for r in roots:
    for so in glob.glob(os.path.join(r, "nvidia", "**", "libcublas.so.13"), recursive=True):
        dirs.add(os.path.dirname(so))
    for so in glob.glob(os.path.join(r, "nvidia", "**", "libcurand.so.10"), recursive=True):
        dirs.add(os.path.dirname(so))
    for so in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so.13"), recursive=True):
        dirs.add(os.path.dirname(so))
    for so in glob.glob(os.path.join(r, "nvidia", "**", "libcudart.so.13"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$carry/sdcam" | grep -q "not found"; then
    echo "error: libraries missing for $carry/sdcam:" >&2
    ldd "$carry/sdcam" | grep "not found" >&2
    exit 2
fi

export SDCAM_REPO="$PWD" SDCAM_TEST_DEVICE=cuda RUST_BACKTRACE=1
status=0
dtypes=(f32 f16 bf16)
((quick)) && dtypes=(f16)
for dt in "${dtypes[@]}"; do
    echo "== goldens on cuda, $dt"
    SDCAM_TEST_DTYPE=$dt "$carry/sdcam-core-lib-tests" model:: --test-threads 1 2>&1 |
        tee "$out/lib-tests-$dt.log" | grep -E "^test |test result|panicked|rel err" || true
    grep -q "test result: ok" "$out/lib-tests-$dt.log" || status=1
    SDCAM_TEST_DTYPE=$dt "$carry/stream_golden" --nocapture 2>&1 | tee "$out/stream-golden-$dt.log" |
        grep -E "stream goldens on|test result|panicked|cases over" || true
    grep -q "test result: ok" "$out/stream-golden-$dt.log" || status=1
done

sizes=(512x512 256x256)
((quick)) && sizes=(256x256)
for dt in f16 f32; do
    ((quick)) && [[ $dt == f32 ]] && continue
    for size in "${sizes[@]}"; do
        echo "== sdcam bench: random sd-turbo, cuda $dt, $size"
        "$carry/sdcam" bench --set 'model.id="random:sd-turbo"' --set 'model.device="cuda"' \
            --set "model.dtype=\"$dt\"" --size "$size" --frames 20 --warmup 3 --json \
            > "$out/bench-$dt-$size.json" 2> "$out/bench-$dt-$size.err" || status=1
        tail -3 "$out/bench-$dt-$size.err"
        python3 -c 'import json,sys; [print(json.dumps(json.loads(l))) for l in open(sys.argv[1]) if l.strip()]' \
            "$out/bench-$dt-$size.json" | head -c 4000
        echo
    done
done
echo "cuda check: $([[ $status == 0 ]] && echo PASSED || echo FAILED)"
exit $status
