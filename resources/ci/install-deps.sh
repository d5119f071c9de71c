#!/usr/bin/env bash
# Installs the host packages densevm's build and tests need (Debian), idempotently:
# gcc/binutils build the embedded workload guest; cpio packs the Linux test guest's
# initramfs (resources/linux/build-guest.sh); acpica-tools gives iasl, which the ACPI
# table test uses to disassemble the tables; rustfmt/clippy for the style checks.
set -euo pipefail
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null || need+=(binutils)
command -v cpio >/dev/null || need+=(cpio)
command -v iasl >/dev/null || need+=(acpica-tools)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: need ${need[*]} but not root; install them and retry" >&2
        exit 1
    fi
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" || true
done
