#!/usr/bin/env bash
# Builds densevm's small microVM kernel from Debian's kernel source package:
#   out/vmlinux       the uncompressed ELF kernel (densevm boots it at its ELF entry)
#   out/System.map    its symbol table (for `densevm run --system-map`)
#   out/config        the full .config it was built with
#   out/config-hash   what the build is cached by (see below)
#   out/kernel-version the kernel release string
#
# The configuration is `make tinyconfig` with resources/linux/microvm.config merged
# over it (scripts/kconfig/merge_config.sh): 64-bit KVM guest, 8250 console, gzip
# initramfs, virtio-mmio devices from the command line, virtio-balloon; no modules,
# ACPI, PCI, network, block layer or crypto. Every option the fragment sets is checked
# in the final .config (an option Kconfig dropped fails the build).
#
# The source is the Debian package linux-source-6.1 (apt-get download; the Debian
# archive is the only network used), kept with its unpacked tree in a cache directory
# (DENSEVM_LINUX_CACHE, default OUT/cache). The build is cached by the hash of the
# fragment, the package version and this script: with the same hash and out/vmlinux
# present it does nothing (FORCE=1 rebuilds).
#
# Needs: apt-get, dpkg-deb, tar, xz, make, gcc, bc, flex, bison, perl, libelf-dev
# (installed with apt-get when missing and run as root).
# Build: nice -n 10, -j2 (DENSEVM_LINUX_JOBS to change).
#
# Usage: resources/linux/build-microvm-kernel.sh [OUT_DIR]
#   default OUT_DIR: resources/linux/out-microvm
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out-microvm}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cache="${DENSEVM_LINUX_CACHE:-$out/cache}"
fragment="$here/microvm.config"
pkg="linux-source-6.1"
jobs="${DENSEVM_LINUX_JOBS:-2}"

log() { echo "build-microvm-kernel: $*" >&2; }

# Tools, and the packages that provide them.
declare -A provider=([apt-get]=apt [dpkg-deb]=dpkg [tar]=tar [xz]=xz-utils [make]=make
    [gcc]=gcc [bc]=bc [flex]=flex [bison]=bison [perl]=perl)
need=()
for tool in "${!provider[@]}"; do
    command -v "$tool" >/dev/null || need+=("${provider[$tool]}")
done
[ -e /usr/include/gelf.h ] || need+=(libelf-dev)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing packages: ${need[*]} (not root: install them and retry)"; exit 1
    fi
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The package version apt would fetch (the lists may need an update on a fresh host).
version="$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: *//p')"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    if [ "$(id -u)" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        version="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: *//p')"
    fi
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        log "no package list knows $pkg"; exit 1
    fi
fi

hash="$( (echo "$pkg $version"; cat "$fragment" "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
if [ -z "${FORCE:-}" ] && [ -s "$out/vmlinux" ] && [ "$(cat "$out/config-hash" 2>/dev/null)" = "$hash" ]; then
    log "already built in $out (config hash $hash; FORCE=1 to rebuild)"
    exit 0
fi

# The source package and its unpacked tree, cached by version.
mkdir -p "$cache"
deb="$(ls "$cache/${pkg}_${version}"_*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$deb" ]; then
    log "downloading $pkg $version"
    # apt-get download runs as _apt: let it write into the cache.
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$cache"; fi
    (cd "$cache" && apt-get download -qq "$pkg=$version")
    deb="$(ls "$cache/${pkg}_${version}"_*.deb | head -n1)"
fi
src="$cache/src-$version"
if [ ! -e "$src/.unpacked" ]; then
    log "unpacking $deb"
    rm -rf "$src" "$cache/pkg-$version"
    mkdir -p "$src" "$cache/pkg-$version"
    dpkg-deb -x "$deb" "$cache/pkg-$version"
    tarball="$(ls "$cache/pkg-$version"/usr/src/linux-source-*.tar.xz | head -n1)"
    tar -xJf "$tarball" -C "$src" --strip-components=1
    rm -rf "$cache/pkg-$version"
    touch "$src/.unpacked"
fi

# Configure in a build directory of its own (O=), keyed by the hash.
build="$cache/build-$hash"
mkdir -p "$build"
log "configuring in $build (tinyconfig + $(basename "$fragment"))"
make -s -C "$src" O="$build" ARCH=x86_64 tinyconfig >/dev/null
(cd "$build" && KCONFIG_CONFIG=.config "$src/scripts/kconfig/merge_config.sh" -m -O "$build" \
    .config "$fragment" >/dev/null)
make -s -C "$src" O="$build" ARCH=x86_64 olddefconfig >/dev/null

# Every option the fragment sets must have survived Kconfig.
bad=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want="$line" ;;
        "# CONFIG_"*" is not set") want="$line" ;;
        *) continue ;;
    esac
    opt="$(echo "$want" | grep -o 'CONFIG_[A-Za-z0-9_]*')"
    got="$(grep -E "^($opt=|# $opt is not set)" "$build/.config" || true)"
    if [ "$want" != "$got" ]; then
        # "not set" also holds when the option is absent (its dependencies are off).
        if [[ "$want" == "# "* ]] && [ -z "$got" ]; then continue; fi
        bad+=("$want (got: ${got:-absent})")
    fi
done < "$fragment"
if [ ${#bad[@]} -gt 0 ]; then
    log "Kconfig did not keep these options of $(basename "$fragment"):"
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
fi

log "building vmlinux (nice -n 10, -j$jobs)"
start=$(date +%s)
nice -n 10 make -s -C "$src" O="$build" ARCH=x86_64 -j"$jobs" vmlinux
log "built in $(( $(date +%s) - start )) s"

cp "$build/vmlinux" "$out/vmlinux.tmp"
cp "$build/System.map" "$out/System.map"
cp "$build/.config" "$out/config"
make -s -C "$src" O="$build" ARCH=x86_64 kernelrelease > "$out/kernel-version"
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$hash" > "$out/config-hash"
log "built $out/vmlinux ($(cat "$out/kernel-version"), config hash $hash)"
