#!/usr/bin/env bash
# Installs the Debian packages sdcam needs to build (and, with --test, to run its tests).
# Idempotent: installs only what is missing. Uses sudo when not root.
set -euo pipefail
pkgs=(libclang1-14 pkg-config)            # libclang: bindgen for the v4l crate
if [[ "${1:-}" == "--test" ]]; then
    pkgs+=(xvfb)                           # the screen-capture test runs under a real Xvfb
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "installing: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust from https://rustup.rs (stable, 1.85 or newer)" >&2
    exit 1
fi
