#!/usr/bin/env bash
# Full size, by hub id, offline (issue 10): writes full-size random-weight copies of
# stabilityai/sd-turbo, madebyollin/taesd, runwayml/stable-diffusion-v1-5 and
# latent-consistency/lcm-lora-sdv1-5 into a Hugging Face cache (real configs and file names, fp16
# variants, refs/snapshots/blobs; about 14 GB), then
#   1. compares one stream per shipped profile (anime, watercolor-lcm) at 256² with the
#      streamdiffusion/diffusers reference output on the same weights (tests/full_size_hub.rs,
#      goldens from scripts/reference/make_full_size_goldens.py), and
#   2. streams the unchanged profiles through the sdcam binary from Y4M to Y4M with
#      HF_HUB_OFFLINE=1 and HF_HUB_CACHE set to that cache.
#
# Usage: scripts/full-size-check.sh [--keep] [--cache DIR] [--frames N]
#   --cache DIR  where the cache goes (default target/full-size-hub; SDCAM_FULL_SIZE_CACHE too)
#   --keep       reuse an existing cache instead of writing it again, and keep it afterwards
#                (by default it is deleted at the end: it is 14 GB)
#   --frames N   frames each profile streams through the binary (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${SDCAM_FULL_SIZE_CACHE:-$PWD/target/full-size-hub}"
keep=0
frames=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) keep=1 ;;
        --cache) cache="$2"; shift ;;
        --frames) frames="$2"; shift ;;
        *) echo "usage: $0 [--keep] [--cache DIR] [--frames N]" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$(dirname "$cache")"
cache="$(cd "$(dirname "$cache")" && pwd)/$(basename "$cache")"

secs() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(secs)" 'BEGIN { printf "%.1f", b - a }'; }

t0=$(secs)
cargo build --locked --release --bin sdcam
cargo test --locked --release --test full_size_hub --no-run
echo "full-size: build $(elapsed "$t0") s"
sdcam=target/release/sdcam

tw=$(secs)
if [[ $keep == 1 && -d "$cache" ]]; then
    echo "full-size: reusing $cache"
else
    rm -rf "$cache"
    "$sdcam" dev write-random-hub --cache "$cache"
fi
echo "full-size: cache written in $(elapsed "$tw") s, $(du -sh "$cache" | cut -f1) on disk"

tt=$(secs)
SDCAM_FULL_SIZE_CACHE="$cache" cargo test --locked --release --test full_size_hub -- \
    --ignored --nocapture
echo "full-size: parity test $(elapsed "$tt") s"

# The binary, profiles unchanged, sources and outputs overridden to Y4M files.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$sdcam" --source pattern --transform identity --output "$work/in.y4m" --frames "$((frames + 1))" \
    --no-stdin --status-interval 0
for profile in anime watercolor-lcm; do
    tb=$(secs)
    HF_HUB_OFFLINE=1 HF_HUB_CACHE="$cache" "$sdcam" --profile "profiles/$profile.toml" \
        --source "$work/in.y4m" --output "$work/$profile.y4m" --frames "$frames" --no-stdin \
        --status-interval 0 2> "$work/$profile.log" || { cat "$work/$profile.log"; exit 1; }
    n=$(grep -ao FRAME "$work/$profile.y4m" | wc -l)
    grep -a "loaded in\|RANDOM" "$work/$profile.log" | head -3
    done_line=$(grep -a "INFO done:" "$work/$profile.log" | tail -1)
    echo "full-size: $profile: ${done_line#*INFO }"
    # Every frame written must be the model's, not the placeholder shown while it loads.
    if [[ "$done_line" != *" 0 placeholders"* ]]; then
        cat "$work/$profile.log"
        echo "full-size: $profile wrote placeholder frames" >&2
        exit 1
    fi
    if [[ "$n" != "$frames" ]]; then
        cat "$work/$profile.log"
        echo "full-size: $profile wrote $n frames, expected $frames" >&2
        exit 1
    fi
    echo "full-size: sdcam --profile profiles/$profile.toml streamed $n frames by hub id offline" \
        "in $(elapsed "$tb") s"
done

if [[ $keep != 1 ]]; then
    rm -rf "$cache"
fi
echo "full-size: all done in $(elapsed "$t0") s"
