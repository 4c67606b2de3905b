#!/usr/bin/env bash
# The one command for the real-device end-to-end test:
#   bash tests/vm/run.sh [--quick] [OUT_DIR]
# builds sdcam (release) and the VM image (Debian kernel + vivid + v4l2loopback, cached outside
# the repository), boots it under qemu (TCG), and runs tests/vm/vm-test.sh inside: vivid camera →
# sdcam (tint) → v4l2loopback → ffmpeg / v4l2-ctl. Exits non-zero with the failing check's
# message. Frames (PNG), sdcam's logs and the console log land in OUT_DIR (default tests/vm/out).
# CPU model qemu64 (SSE2): TCG emulates AVX2 slowly; sdcam's relay runs 2.4x faster without it.
# --quick (CI): the debug binary (`cargo build`, which `cargo test` has already built) at 320x180 10 fps
#   instead of a release build at 640x360 (a debug build cannot convert 640x360 at 15 fps under TCG).
# Env: SDCAM_VM_SIZE (WxH, camera and virtual camera), SDCAM_VM_FPS (15; --quick: 10),
#      SDCAM_VM_ENV (extra KEY=VALUE words for the guest's environment), SDCAM_VM_CPU (qemu CPU model), SDCAM_BIN (use this binary, skip the build), SDCAM_VM_CACHE, SDCAM_VM_TIMEOUT (s, 600),
#      SDCAM_RUST_LOG (sdcam's RUST_LOG inside the VM).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
QUICK=
if [ "${1:-}" = --quick ]; then QUICK=1; shift; fi
OUT=${1:-$HERE/out}
CACHE=${SDCAM_VM_CACHE:-$HOME/.cache/sdcam-vm}
TIMEOUT=${SDCAM_VM_TIMEOUT:-600}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '[vm-test] %s\n' "$*"; }
T_ALL=$(now)
SIZE=${SDCAM_VM_SIZE:-$([ -n "$QUICK" ] && echo 320x180 || echo 640x360)}
FPS=${SDCAM_VM_FPS:-$([ -n "$QUICK" ] && echo 10 || echo 15)}

t=$(now)
"$HERE/build-image.sh" >/dev/null
say "stage image-build: $(took "$t") s"

t=$(now)
if [ -n "${SDCAM_BIN:-}" ]; then
  BIN=$SDCAM_BIN
else
  if [ -n "$QUICK" ]; then
    (cd "$ROOT" && cargo build --quiet --bin sdcam)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/sdcam
  else
    (cd "$ROOT" && cargo build --release --quiet --bin sdcam)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/sdcam
  fi
fi
[ -x "$BIN" ] || { say "FAIL: no sdcam binary at $BIN"; exit 1; }
say "stage sdcam-build: $(took "$t") s ($BIN)"

SHARE=$CACHE/share
rm -rf "$SHARE"; mkdir -p "$SHARE"
cp "$BIN" "$SHARE/sdcam"
cp "$HERE/vm-test.sh" "$HERE/vivid-tint.toml" "$HERE/vivid-diffusion.toml" "$SHARE/"
# the tiny random-weight models for the diffusion case (symlinks into the fixture HF cache resolved)
mkdir -p "$SHARE/models"
cp -rL "$ROOT/tests/fixtures/models/tiny-sd15" "$ROOT/tests/fixtures/models/tiny-taesd" "$SHARE/models/"
rm -f "$OUT"/*.png "$OUT"/*.log "$OUT"/*.txt "$OUT/rc"

t=$(now)
say "booting the VM (TCG, 2 cpus; log: $OUT/console.log)"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 \
  -accel tcg,thread=multi -cpu "${SDCAM_VM_CPU:-qemu64}" -smp 2 -m 2048 \
  -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio" \
  -append "console=ttyS0 quiet loglevel=4 panic=-1 SDCAM_RUST_LOG=${SDCAM_RUST_LOG:-info} SDCAM_VM_SIZE=$SIZE SDCAM_VM_FPS=$FPS ${SDCAM_VM_ENV:-}" \
  -nographic -no-reboot -nic none \
  -virtfs "local,path=$SHARE,mount_tag=host,security_model=none,readonly=on" \
  -virtfs "local,path=$OUT,mount_tag=out,security_model=none" \
  </dev/null 2>&1 | tee "$OUT/console.log" | grep --line-buffered -E '^(VMTEST|INIT|PASS|FAIL|\[)'
qrc=${PIPESTATUS[0]}
set -e
say "stage vm (boot + checks): $(took "$t") s"
boot=$(sed -n 's/^INIT: up after \([0-9.]*\)s.*/\1/p' "$OUT/console.log" | tail -1)
[ -n "$boot" ] && say "  boot to init: ${boot} s (guest clock)"
if [ -f "$OUT/results.txt" ]; then sed 's/^/[vm-test]   /' "$OUT/results.txt"; fi
say "total: $(took "$T_ALL") s"
if [ "$qrc" = 124 ]; then say "FAIL: the VM did not finish within $TIMEOUT s"; exit 1; fi
if [ ! -f "$OUT/rc" ]; then say "FAIL: the VM ended without running the test (see $OUT/console.log)"; exit 1; fi
rc=$(cat "$OUT/rc")
if [ "$rc" != 0 ]; then
  say "FAIL: $(grep '^FAIL' "$OUT/results.txt" | head -1)"; exit 1
fi
say "all checks passed; frames in $OUT"
