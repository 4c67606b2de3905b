#!/usr/bin/env bash
# Everything CI checks: formatting, clippy, the whole test suite (unit, end-to-end, Xvfb) and
# the real-device VM test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --test
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
CI="${CI:-}" cargo test --locked --workspace "$@"
# The same component and stream goldens in f16 (half-precision tolerance,
# sdcam::model::testing): the dtype a GPU runs in, exercised on the CPU.
SDCAM_TEST_DTYPE=f16 cargo test --locked -p sdcam-core -p sdcam --lib --test stream_golden "$@" -- model:: stream_
# And with bf16 products (model.dtype = "bf16" on the CPU) where the CPU has AVX512-BF16.
if grep -qw avx512_bf16 /proc/cpuinfo; then
    SDCAM_TEST_DTYPE=bf16 cargo test --locked -p sdcam-core -p sdcam --lib --test stream_golden "$@" -- model:: stream_
    # Where AMX takes the bf16 products (model::packed_gemm), once more on the AVX-512 BF16
    # kernel, which CPUs with AVX512-BF16 but without AMX run.
    if grep -qw amx_bf16 /proc/cpuinfo; then
        SDCAM_AMX=0 SDCAM_TEST_DTYPE=bf16 cargo test --locked -p sdcam-core -p sdcam --lib --test stream_golden "$@" -- model:: stream_
    fi
else
    echo "test.sh: this CPU lacks AVX512-BF16; the bf16-products goldens are skipped"
fi
# And on candle's f32 products (what CPUs without AVX2 run) where the packed f32 kernel
# (model::packed_gemm) takes them otherwise; on AVX-512 CPUs, once more on that kernel's AVX2
# copy (what CPUs with AVX2 but without AVX-512 run).
if grep -qw avx2 /proc/cpuinfo; then
    SDCAM_F32_KERNEL=0 cargo test --locked -p sdcam-core -p sdcam --lib --test stream_golden "$@" -- model:: stream_
fi
if grep -qw avx512f /proc/cpuinfo; then
    SDCAM_F32_KERNEL=avx2 cargo test --locked -p sdcam-core -p sdcam --lib --test stream_golden "$@" -- model:: stream_
fi
# Real devices: a qemu VM with vivid and v4l2loopback, sdcam in between, ffmpeg/v4l2-ctl as
# clients (tests/vm/README.md). Needs apt and about 2 minutes; SDCAM_SKIP_VM=1 skips it.
if [[ "${SDCAM_SKIP_VM:-}" != 1 ]]; then
    bash tests/vm/run.sh --quick
fi
