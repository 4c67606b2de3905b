#!/usr/bin/env bash
# The offline demo: test pattern → sdcam → out/demo.y4m (60 frames). Needs no camera, no model,
# no network. Play the result with `ffplay out/demo.y4m` or `mpv out/demo.y4m`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --locked
exec ./target/release/sdcam --profile profiles/demo.toml --frames 60 --no-stdin "$@"
