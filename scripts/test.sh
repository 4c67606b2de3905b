#!/usr/bin/env bash
# Everything CI checks: formatting, clippy, and the whole test suite (unit, end-to-end, Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh --test
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
CI="${CI:-}" cargo test --locked "$@"
