#!/usr/bin/env bash
# U-Net forward time, sdcam vs diffusers, side by side (random weights, f32, CPU).
#
#   scripts/bench/unet.sh [--arch sd-turbo|sd15]... [--latent N]... [--batch B] [--iters K] [--warmup W]
#
# Runs `sdcam bench-unet --json` and `scripts/bench/unet_peer.py --json` (with the U-Net config
# sdcam prints, so both build the same architecture) for every --arch, then prints a markdown
# table with the ratios sdcam/diffusers. Both tools wait for an idle machine before every timed
# forward; this script also waits for a low load average before starting each of them.
#
# Environment: SDCAM (binary; default $CARGO_TARGET_DIR or target, /release/sdcam),
# PEER_PY (default /opt/peer/bin/python), OUT (folder for the JSONL; default a temp dir),
# LOAD_MAX (1-minute load average to wait for, default 1.0), LOAD_WAIT (max seconds, default 120).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
SDCAM=${SDCAM:-${CARGO_TARGET_DIR:-$root/target}/release/sdcam}
PEER_PY=${PEER_PY:-/opt/peer/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/bench-unet.XXXXXX)}
LOAD_MAX=${LOAD_MAX:-1.0}
LOAD_WAIT=${LOAD_WAIT:-120}

archs=()
common=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --arch) archs+=("$2"); shift 2 ;;
        --batch)
            # unet_peer.py takes one batch size; sdcam bench-unet would run several
            [[ " ${common[*]} " != *" --batch "* ]] || { echo "unet.sh: one --batch at a time" >&2; exit 2; }
            common+=("$1" "$2"); shift 2 ;;
        --latent | --iters | --warmup | --timestep | --seed) common+=("$1" "$2"); shift 2 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unet.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ ${#archs[@]} -gt 0 ]] || archs=(sd-turbo)

[[ -x $SDCAM ]] || { echo "unet.sh: no sdcam binary at $SDCAM (cargo build --release)" >&2; exit 1; }
[[ -x $PEER_PY ]] || { echo "unet.sh: no Python at $PEER_PY (see the peer set-up)" >&2; exit 1; }
mkdir -p "$OUT"
results=$OUT/results.jsonl

# Waits until the 1-minute load average is below LOAD_MAX (at most LOAD_WAIT seconds).
wait_load() {
    local start=$SECONDS load
    while :; do
        read -r load _ </proc/loadavg
        if awk -v l="$load" -v m="$LOAD_MAX" 'BEGIN { exit !(l < m) }'; then return; fi
        if ((SECONDS - start > LOAD_WAIT)); then
            echo "unet.sh: load average still $load after ${LOAD_WAIT}s; going on" >&2
            return
        fi
        sleep 5
    done
}

for arch in "${archs[@]}"; do
    cfg=$OUT/unet-$arch.json
    "$SDCAM" bench-unet --arch "$arch" --print-config >"$cfg"
    wait_load
    echo "unet.sh: sdcam $arch ${common[*]}" >&2
    "$SDCAM" bench-unet --arch "$arch" "${common[@]}" --json | tee -a "$results"
    wait_load
    echo "unet.sh: diffusers $arch ${common[*]}" >&2
    "$PEER_PY" "$here/unet_peer.py" --config "$cfg" --arch "$arch" "${common[@]}" --json | tee -a "$results"
done

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
key = lambda r: (r["arch"], r["latent"], r["batch"])
by = {}
for r in rows:
    by.setdefault(key(r), {})[(r["impl"], r["mode"])] = r
def cell(r):
    return f"{r['median_ms']:.0f} ({r['min_ms']:.0f})" if r else "–"
def ratio(a, b):
    return f"{a['median_ms'] / b['median_ms']:.2f}" if a and b else "–"
print("| arch | latent | batch | sdcam forward_with_kv, ms | sdcam forward, ms | diffusers forward, ms "
      "| kv / diffusers | forward / diffusers | iters (idle) |")
print("|---|---|---|---|---|---|---|---|---|")
for k in sorted(by):
    g = by[k]
    kv, fw, py = g.get(("sdcam", "forward_with_kv")), g.get(("sdcam", "forward")), g.get(("diffusers", "forward"))
    idle = " / ".join(f"{r['iters']} ({r['idle_iters']})" for r in (kv, fw, py) if r)
    print(f"| {k[0]} | {k[1]} | {k[2]} | {cell(kv)} | {cell(fw)} | {cell(py)} | {ratio(kv, py)} "
          f"| {ratio(fw, py)} | {idle} |")
print("\nmedian (min) ms per U-Net forward; ratios of medians; f32 CPU,",
      f"{rows[0]['threads']} threads" if rows else "", file=sys.stdout)
EOF
echo "unet.sh: results in $results" >&2
