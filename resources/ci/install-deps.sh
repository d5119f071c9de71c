#!/usr/bin/env bash
# Installs the host packages densevm's build and tests need (Debian). Idempotent.
set -euo pipefail
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need[@]}"
    else
        echo "install-deps: missing ${need[*]} and not root" >&2; exit 1
    fi
fi
rustup component list --installed 2>/dev/null | grep -q clippy || true
